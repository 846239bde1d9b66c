"""The README's mTLS walk-through, from outside: `certs` makes the files, a `serve` process takes them
through SUPERVISOR_TLS_*, and the CLI's client commands reach it with --tls-* flags or the
SUPERVISOR_CLIENT_TLS_* variables; without them, or with a stranger's certificate, they are refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervisor_service.cli.main import EXIT_UNAVAILABLE, EXIT_USAGE, main
from supervisor_service.security.tls import ClientTLS
from tests.support.servers import ServiceProcess

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(90)]


def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_service.cli", *argv], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_certs_then_serve_then_the_cli_over_mtls(tmp_path, other_ca_files):
    out = tmp_path / "pki"
    made = _cli("certs", "--out", str(out), "--datanodes", "2", "--operator", "bob")
    assert made.returncode == 0, made.stderr
    assert (out / "ops-bob.pem").exists() and oct((out / "ops-bob-key.pem").stat().st_mode & 0o777) == "0o600"
    env = {"SUPERVISOR_TLS_CERT_FILE": str(out / "server.pem"), "SUPERVISOR_TLS_KEY_FILE": str(out / "server-key.pem"),
           "SUPERVISOR_TLS_CLIENT_CA_FILE": str(out / "ca.pem"), "SUPERVISOR_STORE": "memory",
           "SUPERVISOR_METRICS_ADDR": ""}
    proc = ServiceProcess(env, str(tmp_path / "service.log"),
                          client_tls=ClientTLS(str(out / "ca.pem"), str(out / "admin.pem"), str(out / "admin-key.pem")))
    try:
        proc.wait_serving(30, leader=True)
        flags = ["--addr", proc.addr, "--tls-ca", str(out / "ca.pem"), "--tls-cert", str(out / "ops-bob.pem"),
                 "--tls-key", str(out / "ops-bob-key.pem")]
        assert main(["maintenance", "status", *flags]) == 0
        assert main(["health", *flags]) == 0
        # The same through the environment, as a shell profile would set it.
        by_env = _cli("maintenance", "status", "--addr", proc.addr, env={
            "SUPERVISOR_CLIENT_TLS_CA_FILE": str(out / "ca.pem"),
            "SUPERVISOR_CLIENT_TLS_CERT_FILE": str(out / "admin.pem"),
            "SUPERVISOR_CLIENT_TLS_KEY_FILE": str(out / "admin-key.pem")})
        assert by_env.returncode == 0, by_env.stderr
        plain = _cli("maintenance", "status", "--addr", proc.addr, "--timeout", "3")
        assert plain.returncode == EXIT_UNAVAILABLE and "UNAVAILABLE" in plain.stderr
        no_cert = _cli("dump", "--addr", proc.addr, "--timeout", "3", "--tls-ca", str(out / "ca.pem"))
        assert no_cert.returncode == EXIT_UNAVAILABLE
        stranger = _cli("dump", "--addr", proc.addr, "--timeout", "3", "--tls-ca", str(out / "ca.pem"),
                        "--tls-cert", str(other_ca_files["admin"]), "--tls-key", str(other_ca_files["admin-key"]))
        assert stranger.returncode == EXIT_UNAVAILABLE
        assert proc.proc.poll() is None  # refused handshakes do not hurt the service
    finally:
        proc.stop()


def test_a_serve_with_half_a_tls_configuration_exits_naming_the_setting(tmp_path):
    made = _cli("certs", "--out", str(tmp_path / "pki"))
    assert made.returncode == 0
    result = _cli("serve", env={"SUPERVISOR_TLS_CERT_FILE": str(tmp_path / "pki" / "server.pem"),
                                "SUPERVISOR_STORE": "memory", "SUPERVISOR_GRPC_ADDR": "127.0.0.1:0"})
    assert result.returncode == 78
    assert "SUPERVISOR_TLS_KEY_FILE is not" in result.stderr


@pytest.mark.parametrize("argv", [
    ["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent-key.pem"],
    ["--tls-key", "/x-key.pem"],
    ["--tls-server-name", "example"],
    ["--tls-ca", "/dev/null"],
])
def test_bad_client_tls_flags_are_usage_errors_before_any_call(capsys, argv):
    assert main(["dump", "--addr", "127.0.0.1:1", *argv]) == EXIT_USAGE
    assert "--tls" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--operator", "Bob"], ["--operator", "a b"], ["--operator=-x"], ["--datanodes=-1"],
    ["--datanodes", "100001"], ["--days", "0"], ["--server-name", "bad name"],
])
def test_certs_refuses_names_no_certificate_can_carry(tmp_path, capsys, argv):
    assert main(["certs", "--out", str(tmp_path / "pki"), *argv]) == EXIT_USAGE
    assert not (tmp_path / "pki" / "ca.pem").exists()


def test_certs_does_not_replace_a_ca_unless_forced(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--datanodes", "0"]) == 0
    before = (tmp_path / "ca.pem").read_bytes()
    assert main(["certs", "--out", str(tmp_path), "--datanodes", "0"]) == EXIT_USAGE
    assert (tmp_path / "ca.pem").read_bytes() == before
    assert main(["certs", "--out", str(tmp_path), "--datanodes", "0", "--force"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != before
