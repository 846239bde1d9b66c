"""The process from outside: a port that is already served, out-of-range flags and settings,
`| head`, SIGTERM with open heartbeat streams. Each is a real `supervisor-service` process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
from tests.support.readiness import says_it_leads
from tests.support.servers import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env.update(GRPC_VERBOSITY="NONE", SUPERVISOR_LOG_FORMAT="json", **extra)
    return env


def _cli(*argv: str, env: dict[str, str] | None = None, cwd=None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_service.cli", *argv], env=env or _env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The stderr lines that are not JSON log records: exactly one, the CLI's error."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("supervisor-service: error:"), proc.stderr
    return lines[0]


# ---------------------------------------------------------------- the gRPC port is not shared


@pytest.mark.realtime
def test_a_second_instance_on_the_same_grpc_port_is_refused(tmp_path):
    first = ServiceProcess({"SUPERVISOR_DATA_DIR": str(tmp_path / "first"), "GRPC_VERBOSITY": "NONE"},
                           str(tmp_path / "first.log"))
    try:
        first.wait_serving()
        second = subprocess.Popen(
            [sys.executable, "-m", "supervisor_service.cli", "serve", "--grpc-addr", first.addr, "--metrics-addr", ""],
            env=_env(SUPERVISOR_DATA_DIR=str(tmp_path / "second")), cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            _, stderr = second.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate()
            pytest.fail(f"a second supervisor started on {first.addr}, the port of the first")
        proc = subprocess.CompletedProcess(second.args, second.returncode, "", stderr)
        line = _one_error_line(proc)
        assert proc.returncode == 69, proc.stderr
        assert "grpc_addr" in line and first.addr in line
        # The first is still the one answering.
        with SupervisorClient(first.addr, timeout=5) as client:
            assert client.maintenance_status().is_leader
    finally:
        first.stop()


# ---------------------------------------------------------------- out-of-range flags: one line, exit 2


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["dump", "--datanode", "-1"], "--datanode"),
        (["dump", "--datanode", str(2**64)], "--datanode"),
        (["maintenance", "on", "--datanode", "abc"], "--datanode"),
        (["maintenance", "on", "--ttl", "nan"], "--ttl"),
        (["maintenance", "on", "--ttl", "inf"], "--ttl"),
        (["maintenance", "on", "--ttl", "1e16"], "--ttl"),
        (["maintenance", "on", "--ttl", "-5"], "--ttl"),
        (["maintenance", "on", "--ttl", "0.0004"], "--ttl"),  # below the millisecond: not "no expiry"
        (["journal", "--limit", "-1"], "--limit"),
        (["journal", "--limit", str(2**32)], "--limit"),
        (["dump", "--at", "99999999999999999999"], "--at"),
        (["dump", "--at", "-1"], "--at"),
        (["dump", "--timeout", "nan"], "--timeout"),
        (["dump", "--timeout", "0"], "--timeout"),
        (["dump", "--addr", " , "], "--addr"),
        (["serve", "--tick-interval-ms", "abc"], "--tick-interval-ms"),
        (["evaluate", "--hours", "nan"], "--hours"),
        (["evaluate", "--pauses", "inf"], "--pauses"),
        (["evaluate", "--datanodes", "-3"], "--datanodes"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_out_of_range_flags_are_one_line_usage_errors(argv, names):
    unreachable = ["--addr", f"127.0.0.1:{free_port()}"] if argv[0] in ("dump", "maintenance", "journal") else []
    if "--addr" in argv:
        unreachable = []
    proc = _cli(*argv, *unreachable)
    line = _one_error_line(proc)
    assert proc.returncode == 2, proc.stderr
    assert names in line, line
    assert proc.stdout == ""


def test_a_client_command_parses_without_loading_the_settings_or_the_evaluation():
    # serve's and evaluate's flags are built from those modules, when one of them is the command.
    probe = ("import sys; from supervisor_service.cli.main import _parser; _parser().parse_args(['dump']); "
             "print(sorted(m for m in ('pydantic', 'supervisor_service.app.settings', 'supervisor_service.evaluate')"
             " if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=30)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_setting_that_cannot_be_held_is_one_line_exit_78_not_a_traceback():
    for name, value in [("ACCEPTABLE_HEARTBEAT_PAUSE_MS", "inf"), ("PHI_THRESHOLD", "nan"),
                        ("MIGRATION_BASE_TIMEOUT_MS", str(2**64)), ("MAX_MESSAGE_BYTES", str(2**31))]:
        proc = _cli("serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "",
                    env=_env(**{f"SUPERVISOR_{name}": value, "SUPERVISOR_STORE": "memory"}), timeout=20)
        line = _one_error_line(proc)
        assert proc.returncode == 78, proc.stderr
        assert f"SUPERVISOR_{name}" in line, line


# ---------------------------------------------------------------- | head


@pytest.mark.realtime
def test_dump_into_a_pipe_closed_early_exits_quietly(service):
    svc = service()
    with SupervisorClient(svc.addresses.grpc, timeout=30) as client:
        client.register([(d, r) for d in range(1, 4) for r in range(1000)])  # some 300 KB of table
    proc = subprocess.Popen([sys.executable, "-m", "supervisor_service.cli", "dump", "--addr", svc.addresses.grpc],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does once it has its line
    _, stderr = proc.communicate(timeout=30)
    assert first.startswith(b"# at ")
    assert stderr == b"", stderr.decode()
    assert proc.returncode == 141  # as a tool stopped by SIGPIPE


# ---------------------------------------------------------------- data_dir, SIGTERM with open streams


@pytest.mark.realtime
def test_sigterm_with_open_heartbeat_streams_ends_well_under_the_grace(tmp_path, caplog):
    """The default data_dir (./data) is resolved once, at start, against the working directory
    and logged; SIGTERM ends the heartbeat streams instead of waiting the grace out for them."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor_service.cli", "serve", "--grpc-addr", f"127.0.0.1:{port}",
             "--metrics-addr", ""],
            env=_env(SUPERVISOR_SHUTDOWN_TIMEOUT_MS="10000"), cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT,
        )
    addr = f"127.0.0.1:{port}"
    beaters = []
    caplog.set_level(logging.WARNING, logger="supervisor_service.client")
    try:
        deadline = time.monotonic() + 20
        while True:  # serving, so that the streams' first failure is the one that matters
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            if says_it_leads(addr):
                break
            time.sleep(0.05)
        for d in (1, 2, 3):
            beaters.append(DatanodeHeartbeater(addr, d, lambda d=d: [d], interval_s=0.2,
                                               on_response=lambda a, r: None).start())
        deadline = time.monotonic() + 20
        while not all(b.accepted >= 2 for b in beaters):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        begun = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        took = time.monotonic() - begun
        deadline = time.monotonic() + 5
        while not all(b.errors for b in beaters) and time.monotonic() < deadline:
            time.sleep(0.05)  # each stream's next heartbeat finds it ended
    finally:
        for b in beaters:
            b.stop()
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log_path.read_text()
    assert took < 2.5, f"SIGTERM took {took:.1f} s with a grace of 5 s"  # grace = half of 10 s
    # How each stream ended (the first failure each datanode logged): told, not cut off.
    ended = {}
    for record in caplog.records:
        if record.getMessage() == "heartbeat_stream_failed":
            ended.setdefault(record.fields["datanode_id"], (record.fields["kind"], record.fields["error"]))
    assert sorted(ended) == [1, 2, 3], ended
    assert all(kind == "UNAVAILABLE" and "shutting down" in error for kind, error in ended.values()), ended
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    started = next(r for r in records if r["event"] == "service_started")
    assert started["data_dir"] == str(tmp_path / "data")
    assert (tmp_path / "data" / "supervisor.sqlite3").exists()


def test_settings_shows_where_data_dir_resolves(tmp_path):
    proc = _cli("settings", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("SUPERVISOR_DATA_DIR"))
    assert "./data" in line and str(tmp_path / "data") in line


# ---------------------------------------------------------------- README: make run, then the CLI


def test_readme_quick_start_puts_the_cli_on_path_verbatim():
    """After `make run` the README's own words put `supervisor-service` on PATH."""
    readme = (REPO / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):readme.index("### Generated code")]
    shell_lines = [line for block in quick.split("```sh")[1:] for line in block.split("```")[0].splitlines()]
    activate = next(line.split("#")[0].strip() for line in shell_lines if "activate" in line)
    venv_bin = str(REPO / ".venv" / "bin")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    proc = subprocess.run(["bash", "-c", f"{activate} && command -v supervisor-service && supervisor-service settings"],
                          cwd=REPO, env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str(REPO / ".venv" / "bin" / "supervisor-service")


# ---------------------------------------------------------------- every numeric setting is bounded


def _numeric_fields():
    from supervisor_service.app.settings import Settings

    for name, field in Settings.model_fields.items():
        if field.annotation in (int, float):
            yield name, field


def test_every_numeric_setting_has_bounds_the_code_can_hold():
    from annotated_types import Ge, Gt, Le, Lt

    from supervisor_service.app.settings import load_settings

    unbounded = []
    for name, field in _numeric_fields():
        kinds = {type(m) for m in field.metadata}
        if not kinds & {Ge, Gt} or not kinds & {Le, Lt}:
            unbounded.append(name)
    assert not unbounded, f"numeric settings without a lower and an upper bound: {unbounded}"
    # Each at its largest: the service's derived settings are built without an overflow.
    for name, field in _numeric_fields():
        high = next(m.le for m in field.metadata if isinstance(m, Le))
        settings = load_settings(**{name: high})
        settings.detector_options(), settings.failover_policy(), settings.guard_settings()
        assert settings.selector_alive_window >= 0


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", str(2**64), "-1e30"])
def test_every_numeric_setting_refuses_what_it_cannot_hold(value, monkeypatch):
    from supervisor_service.app.settings import ConfigError, load_settings

    for name in list(os.environ):
        if name.startswith("SUPERVISOR_"):
            monkeypatch.delenv(name)
    for name, _ in _numeric_fields():
        monkeypatch.setenv(f"SUPERVISOR_{name.upper()}", value)
        with pytest.raises(ConfigError) as info:
            load_settings()
        message = str(info.value)
        assert f"SUPERVISOR_{name.upper()}" in message and "\n" not in message, message
        monkeypatch.delenv(f"SUPERVISOR_{name.upper()}")


# ---------------------------------------------------------------- a token no header can carry


@pytest.mark.parametrize("command", [["maintenance", "status"], ["dump"], ["hold", "status"]])
@pytest.mark.parametrize("token", ["a\nb", "tok en", "\u00e9t\u00e9"])
def test_a_token_no_header_can_carry_is_a_usage_error_before_any_call(command, token):
    # Nothing listens on port 1: a call would end UNAVAILABLE (69); the token is refused before it.
    proc = _cli(*command, "--addr", "127.0.0.1:1", "--token", token)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert "--token" in line and "printable ASCII" in line and "INTERNAL" not in line
