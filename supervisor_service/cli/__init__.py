"""The `supervisor-service` command: serve, the admin calls, settings, evaluate (README "CLI")."""

from supervisor_service.cli.main import main

__all__ = ["main"]
