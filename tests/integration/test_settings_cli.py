"""Settings (defaults, environment, TOML, precedence, errors) and the operator CLI, in-process."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from supervisor_service import cli
from supervisor_service.app.service import Service
from supervisor_service.app.settings import ConfigError, Settings, load_settings
from supervisor_service.client import SupervisorClient
from supervisor_service.core import FailoverPolicy, GuardSettings, PhiAccrualOptions


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No SUPERVISOR_* variable of the calling environment leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("SUPERVISOR_"):
            monkeypatch.delenv(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- settings: defaults


def test_defaults_match_the_design_table():
    s = load_settings()
    assert s.grpc_addr == "127.0.0.1:50051"
    assert s.metrics_addr == "127.0.0.1:9464"
    assert s.selector_endpoint == s.peer_lookup_endpoint == s.region_migration_endpoint == ""
    assert s.tick_interval_ms == 1000
    assert s.phi_threshold == 8.0
    assert s.min_std_deviation_ms == 100
    assert s.acceptable_heartbeat_pause_ms == 10_000
    assert s.max_sample_size == 1000
    assert s.heartbeat_clock == "server"
    assert s.event_queue_size == 1024
    assert s.data_dir == Path.cwd() / "data"  # the contract's ./data, resolved once at start
    assert s.store == "sqlite"
    assert s.store_prefix == "/region-supervisor/default"
    assert s.advertise_addr == "" and s.advertised == s.grpc_addr
    assert 2000 <= s.leader_lease_ttl_ms <= 10_000  # "a few seconds"
    assert s.max_local_pause_ms == 5000
    assert s.max_failed_datanode_fraction == 0.5
    opts = s.detector_options()
    assert (opts.threshold, opts.min_std_deviation_ms, opts.acceptable_heartbeat_pause_ms, opts.max_sample_size) == (
        8.0, 100, 10_000, 1000
    )


def test_a_setting_of_a_core_option_is_that_options_declaration():
    # The declarations themselves (supervisor_service.core.options), not the public API.
    from dataclasses import fields

    from supervisor_service.app.settings import CORE_OPTIONS
    from supervisor_service.core import settable_fields
    from supervisor_service.core.options import OPTION

    seen = []
    for cls in CORE_OPTIONS:
        assert all(f.metadata[OPTION].doc for f in fields(cls)), f"{cls.__name__}: a field without a doc"
        for f, setting, opt in settable_fields(cls):
            field = Settings.model_fields[setting]
            assert field.annotation.__name__ == f.type, setting
            assert field.default == (f.default if opt.setting_default is None else opt.setting_default), setting
            assert field.description == opt.doc, setting
            bounds = {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le") if hasattr(m, name)}
            assert bounds == {k: v for k, v in (("ge", opt.ge), ("gt", opt.gt), ("le", opt.le)) if v is not None}
            seen.append(setting)
    assert len(seen) == len(set(seen)), "two core options share a setting"
    assert all(field.description for field in Settings.model_fields.values())


def test_default_settings_build_the_default_options():
    s = load_settings()
    assert s.detector_options() == PhiAccrualOptions()
    assert s.guard_settings() == GuardSettings()
    # The one default of its own: the service forgets failover counts after 30 min, a plain policy never;
    # and with the embedded dry-run RegionMigration (no endpoint) a success moved nothing to watch on a target.
    assert s.failover_policy() == FailoverPolicy(failover_count_decay_ms=1_800_000, watch_target_on_success=False)


def test_serve_flags_say_what_their_settings_say(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in ("tick_interval_ms", "phi_threshold", "grpc_addr"):
        assert f"--{name.replace('_', '-')}" in out
        assert " ".join(Settings.model_fields[name].description.split()) in out


# ---------------------------------------------------------------- settings: sources


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("SUPERVISOR_GRPC_ADDR", "0.0.0.0:6000")
    monkeypatch.setenv("SUPERVISOR_TICK_INTERVAL_MS", "250")
    monkeypatch.setenv("SUPERVISOR_PHI_THRESHOLD", "9.5")
    monkeypatch.setenv("SUPERVISOR_HEARTBEAT_CLOCK", "client")
    monkeypatch.setenv("SUPERVISOR_METRICS_ADDR", "")
    monkeypatch.setenv("SUPERVISOR_STORE_PREFIX", "/region-supervisor/cluster-a")
    monkeypatch.setenv("SUPERVISOR_MAX_FAILED_DATANODE_FRACTION", "0.25")
    s = load_settings()
    assert s.grpc_addr == "0.0.0.0:6000"
    assert s.tick_interval_ms == 250
    assert s.phi_threshold == 9.5
    assert s.heartbeat_clock == "client"
    assert s.metrics_addr == ""
    assert s.store_prefix == "/region-supervisor/cluster-a"
    assert s.max_failed_datanode_fraction == 0.25
    assert s.event_queue_size == 1024  # untouched


def test_toml_file_and_precedence(tmp_path, monkeypatch):
    config = tmp_path / "supervisor.toml"
    config.write_text(
        'grpc_addr = "127.0.0.1:7000"\n'
        "tick_interval_ms = 2000\n"
        "phi_threshold = 9.0\n"
        "max_sample_size = 500\n"
        'heartbeat_clock = "client"\n'
    )
    s = load_settings(config)
    assert (s.grpc_addr, s.tick_interval_ms, s.phi_threshold, s.max_sample_size, s.heartbeat_clock) == (
        "127.0.0.1:7000", 2000, 9.0, 500, "client"
    )
    assert s.event_queue_size == 1024  # default where the file is silent

    # environment > TOML
    monkeypatch.setenv("SUPERVISOR_PHI_THRESHOLD", "10")
    monkeypatch.setenv("SUPERVISOR_MAX_SAMPLE_SIZE", "600")
    s = load_settings(str(config))
    assert (s.tick_interval_ms, s.phi_threshold, s.max_sample_size) == (2000, 10.0, 600)

    # CLI flags / init arguments > environment > TOML; None means "flag not given"
    s = load_settings(config, max_sample_size=700, tick_interval_ms=None, grpc_addr="127.0.0.1:0")
    assert (s.grpc_addr, s.tick_interval_ms, s.phi_threshold, s.max_sample_size) == (
        "127.0.0.1:0", 2000, 10.0, 700
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("tick_interval_ms", 0),
        ("tick_interval_ms", 5),
        ("phi_threshold", 0),
        ("phi_threshold", "abc"),
        ("heartbeat_clock", "wall"),
        ("grpc_addr", "nope"),
        ("metrics_addr", "127.0.0.1:99999"),
        ("selector_endpoint", "10.0.0.1:0"),
        ("event_queue_size", 0),
        ("store", "postgres://x"),
        ("store_prefix", "relative/prefix"),
        ("store_prefix", "/trailing/"),
        ("max_failed_datanode_fraction", 1.5),
        ("max_sample_size", 1),
    ],
)
def test_invalid_values_name_the_setting_and_its_env_var(name, value, monkeypatch):
    with pytest.raises(ConfigError) as info:
        load_settings(**{name: value})
    message = str(info.value)
    assert name in message and f"SUPERVISOR_{name.upper()}" in message
    assert "\n" not in message

    # The same from the environment.
    monkeypatch.setenv(f"SUPERVISOR_{name.upper()}", str(value))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"SUPERVISOR_{name.upper()}" in str(info.value)


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(ConfigError) as info:
        load_settings(tick_interval_ms=0, heartbeat_clock="wall")
    assert "tick_interval_ms" in str(info.value) and "heartbeat_clock" in str(info.value)


def test_invalid_value_in_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("tick_interval_ms = 5\n")
    with pytest.raises(ConfigError, match="tick_interval_ms"):
        load_settings(config)


def test_unknown_key_in_toml_is_rejected(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("tick_interval_ms = 2000\ntick_intervall_ms = 3000\n")
    with pytest.raises(ConfigError, match="tick_intervall_ms"):
        load_settings(config)


def test_malformed_toml_is_a_config_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("tick_interval_ms = = 2000\n")
    with pytest.raises(ConfigError):
        load_settings(config)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_settings(missing)
    with pytest.raises(ConfigError):
        load_settings(tmp_path)  # a directory is not a config file


# ---------------------------------------------------------------- CLI: settings and serve errors


def test_settings_markdown_lists_every_field(capsys):
    assert cli.main(["settings", "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `SUPERVISOR_")]
    names = [row.split("`")[1] for row in rows]
    assert names == [f"SUPERVISOR_{name.upper()}" for name in Settings.model_fields]
    for row in rows:
        cells = row.strip("|").split(" | ")
        assert len(cells) == 3, row  # a '|' in a docstring would break the table
        assert cells[2].strip(), f"no description: {row}"


def test_settings_plain_lists_every_field(capsys):
    assert cli.main(["settings"]) == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"SUPERVISOR_{name.upper()}" in out


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("supervisor-service: error:"), stderr
    return lines[0]


def test_serve_with_missing_config_exits_78(capsys):
    assert cli.main(["serve", "--config", "/nonexistent/supervisor.toml"]) == 78
    line = _one_error_line(capsys.readouterr().err)
    assert "/nonexistent/supervisor.toml" in line


def test_serve_with_bad_flag_value_exits_78(capsys):
    assert cli.main(["serve", "--tick-interval-ms", "0", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", ""]) == 78
    line = _one_error_line(capsys.readouterr().err)
    assert "tick_interval_ms" in line


def test_serve_with_bad_env_exits_78(capsys, monkeypatch):
    monkeypatch.setenv("SUPERVISOR_HEARTBEAT_CLOCK", "wall")
    assert cli.main(["serve"]) == 78
    assert "SUPERVISOR_HEARTBEAT_CLOCK" in _one_error_line(capsys.readouterr().err)


def _serve_process(tmp_path, *flags, data_dir=None, timeout: float = 20) -> tuple[int, list[str]]:
    """Run `serve` in its own process (it configures logging and uses the global registry);
    returns the exit code and the stderr lines that are not JSON log records."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env.update(SUPERVISOR_DATA_DIR=str(data_dir or tmp_path / "data"), SUPERVISOR_LOG_FORMAT="json",
               GRPC_VERBOSITY="NONE", SUPERVISOR_SHUTDOWN_TIMEOUT_MS="2000")
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor_service.cli", "serve", *flags],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    return proc.returncode, lines


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.realtime
def test_serve_grpc_port_in_use_is_one_line_exit_69(tmp_path):
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        code, lines = _serve_process(tmp_path, "--grpc-addr", f"127.0.0.1:{port}", "--metrics-addr", "")
    assert "Traceback" not in "\n".join(lines), "\n".join(lines)
    assert code == 69, "\n".join(lines)
    assert len(lines) == 1 and lines[0].startswith("supervisor-service: error:"), lines
    assert "grpc_addr" in lines[0] and str(port) in lines[0]


@pytest.mark.realtime
def test_serve_metrics_port_in_use_is_one_line_exit_69(tmp_path):
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        code, lines = _serve_process(tmp_path, "--grpc-addr", "127.0.0.1:0", "--metrics-addr", f"127.0.0.1:{port}")
    assert code == 69, "\n".join(lines)
    assert len(lines) == 1 and lines[0].startswith("supervisor-service: error:"), lines
    assert "metrics_addr" in lines[0]  # which of the two addresses is taken


@pytest.mark.realtime
def test_serve_data_dir_in_use_by_another_process_is_one_line(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with open(data_dir / "supervisor.lock", "a+") as lock:  # what a running replica holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, lines = _serve_process(tmp_path, "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "")
    assert "Traceback" not in "\n".join(lines), "\n".join(lines)
    assert code in (69, 75, 78), code
    assert len(lines) == 1 and lines[0].startswith("supervisor-service: error:"), lines
    assert "data_dir" in lines[0]


@pytest.mark.realtime
def test_serve_unusable_data_dir_is_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code, lines = _serve_process(tmp_path, "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "", data_dir=not_a_dir)
    assert "Traceback" not in "\n".join(lines), "\n".join(lines)
    assert code in (69, 73, 78), code
    assert len(lines) == 1 and lines[0].startswith("supervisor-service: error:"), lines
    assert "data_dir" in lines[0]


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2


# ---------------------------------------------------------------- CLI: against a running service


@pytest.fixture(scope="module")
def service_addr():
    service = Service(
        load_settings(grpc_addr="127.0.0.1:0", metrics_addr="", store="memory", tick_interval_ms=600_000,
                      shutdown_timeout_ms=2000),
        registry=CollectorRegistry(),
    )
    started = threading.Event()

    async def main() -> int:
        await service.start()
        started.set()
        return await service.wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(15), "service did not start"
    deadline = time.monotonic() + 10
    while not service.supervisor.status.is_leader:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    addr = service.addresses.grpc
    with SupervisorClient(addr) as client:
        assert client.register([(3, (5 << 32) | 7), (3, 1), (4, 2)]) == 3
    yield addr
    service.request_stop()
    thread.join(15)


def test_cli_dump_table(service_addr, capsys):
    assert cli.main(["dump", "--addr", service_addr]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# at ") and "3 detectors" in out[0] and "leader=yes" in out[0]
    assert "maintenance=off" in out[0]
    for column in ("DATANODE", "REGION_ID", "TABLE/REGION", "PHI", "AVAIL", "LAST_HB_MS", "FAILOVERS"):
        assert column in out[1]
    rows = out[2:]
    assert len(rows) == 3
    row = next(r for r in rows if str((5 << 32) | 7) in r)
    fields = row.split()
    assert fields[0] == "3" and fields[1] == str((5 << 32) | 7) and fields[2] == "5/7"
    assert fields[4] == "yes"
    assert any(r.split()[2] == "0/1" for r in rows)


def test_cli_dump_filters(service_addr, capsys):
    assert cli.main(["dump", "--addr", service_addr, "--datanode", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "1 detectors" in out[0] and len(out) == 3 and out[2].split()[0] == "4"
    assert cli.main(["dump", "--addr", service_addr, "--only-failed"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "0 detectors" in out[0] and len(out) == 2


def test_cli_dump_json(service_addr, capsys):
    assert cli.main(["dump", "--addr", service_addr, "--json", "--datanode", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2
    by_region = {r["region_id"]: r for r in records}
    r = by_region[(5 << 32) | 7]
    assert r["region"] == "5/7" and r["datanode_id"] == 3
    for key in ("last_heartbeat_millis", "phi", "available", "sample_count", "mean_interval_millis",
                "std_deviation_millis", "failover_count", "migrating"):
        assert key in r
    assert r["available"] is True and r["sample_count"] == 2 and r["failover_count"] == 0


def test_cli_dump_json_far_future_is_valid_json(service_addr, capsys):
    future = int(time.time() * 1000) + 10 * 365 * 86_400_000
    assert cli.main(["dump", "--addr", service_addr, "--json", "--only-failed", "--at", str(future)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines:
        record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
        assert record["available"] is False
        assert record["phi"] == "inf" or record["phi"] >= 8.0


def test_cli_maintenance(service_addr, capsys):
    assert cli.main(["maintenance", "status", "--addr", service_addr]) == 0
    assert capsys.readouterr().out.strip() == "maintenance mode: off"
    try:
        assert cli.main(["maintenance", "on", "--addr", service_addr]) == 0
        assert capsys.readouterr().out.strip() == "maintenance mode: on"
        assert cli.main(["maintenance", "status", "--addr", service_addr]) == 0
        assert capsys.readouterr().out.strip() == "maintenance mode: on"
        assert cli.main(["dump", "--addr", service_addr]) == 0
        assert "maintenance=on" in capsys.readouterr().out.splitlines()[0]
    finally:
        assert cli.main(["maintenance", "off", "--addr", service_addr]) == 0
    assert capsys.readouterr().out.strip() == "maintenance mode: off"


def test_cli_maintenance_per_datanode_with_ttl(service_addr, capsys):
    try:
        assert cli.main(["maintenance", "on", "--datanode", "9", "--ttl", "600", "--addr", service_addr]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "maintenance mode: off"
        assert out[1].startswith("datanode 9: maintenance on until ")
        assert cli.main(["maintenance", "status", "--addr", service_addr]) == 0
        assert "datanode 9: maintenance on" in capsys.readouterr().out
    finally:
        assert cli.main(["maintenance", "off", "--datanode", "9", "--addr", service_addr]) == 0
    assert capsys.readouterr().out.strip() == "maintenance mode: off"
    assert cli.main(["maintenance", "off", "--ttl", "5", "--addr", service_addr]) == 2
    assert "--ttl" in _one_error_line(capsys.readouterr().err)


def test_cli_hold_status(service_addr, capsys):
    assert cli.main(["hold", "status", "--addr", service_addr]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("failover held: no") and "answered by the leader" in out


def test_cli_journal_empty(service_addr, capsys):
    assert cli.main(["journal", "--addr", service_addr]) == 0
    assert "journal is empty" in capsys.readouterr().out
    assert cli.main(["journal", "--json", "--addr", service_addr]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "argv", [["dump"], ["dump", "--json"], ["maintenance", "status"], ["maintenance", "on"], ["journal"]]
)
def test_cli_unreachable_service_exits_69(argv, capsys):
    addr = f"127.0.0.1:{free_port()}"
    begun = time.monotonic()
    assert cli.main([*argv, "--addr", addr, "--timeout", "3"]) == 69
    assert time.monotonic() - begun < 5
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert "UNAVAILABLE" in line and addr in line
    assert captured.out == ""
