"""Scale benchmark: `python -m supervisor_service.bench [--quick]`, or `make bench`.

Starts the service in-process, drives it from separate load-generator
processes over real gRPC on loopback, runs a naive per-region baseline in a
child process, and prints one table (see `runner` for the scenarios).
Kept free of imports, so the spawned load-generator processes start light.
"""
