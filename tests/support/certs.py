"""Certificates made in the test run (`supervisor_service.security.certs`): a CA, a server
certificate for loopback and client certificates, as files a service's settings can name."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor_service.security.certs import write_bundle

OPERATORS = ("alice",)


@pytest.fixture
def cert_files(tmp_path: Path) -> dict[str, Path]:
    """`ca`, `server`, `datanode-1..3`, `metasrv`, `ops-alice`, `admin` (each with its `-key`)."""
    return write_bundle(tmp_path / "certs", datanodes=3, operators=OPERATORS)


@pytest.fixture
def other_ca_files(tmp_path: Path) -> dict[str, Path]:
    """The same names from an unrelated CA: what a stranger's certificates look like."""
    return write_bundle(tmp_path / "other-certs", datanodes=3, operators=OPERATORS)
