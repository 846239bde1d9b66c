"""The Dockerfile against the code, without building it (tests/integration/test_image.py builds and
runs it): the protobuf steps are the Makefile's, the health check is a command the CLI has and
answers within the check's own timeout, the environment names settings, the ports are the ones
exposed."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from supervisor_service.app.settings import ENV_PREFIX, Settings
from supervisor_service.cli.main import _parser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
# Continuation lines joined: one string per instruction.
INSTRUCTIONS = [line for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
FINAL_STAGE = INSTRUCTIONS[max(i for i, line in enumerate(INSTRUCTIONS) if line.startswith("FROM ")):]


def _final(instruction: str) -> list[str]:
    return [line.split(None, 1)[1] for line in FINAL_STAGE if line.startswith(instruction + " ")]


def test_the_build_stage_generates_the_protos_as_the_makefile_does():
    makefile = (REPO / "Makefile").read_text()
    (sed,) = re.findall(r"sed -i '([^']+)'", makefile)
    assert f"sed -i '{sed}' supervisor_service/_proto/supervisor/v1/supervisor_pb2_grpc.py" in DOCKERFILE
    assert "-Iprotos" in DOCKERFILE and "protos/supervisor/v1/supervisor.proto" in DOCKERFILE
    assert "touch supervisor_service/_proto/supervisor/__init__.py supervisor_service/_proto/supervisor/v1/__init__.py" \
        in DOCKERFILE


def test_two_stages_and_the_runtime_one_installs_no_build_tool():
    assert sum(line.startswith("FROM ") for line in INSTRUCTIONS) == 2
    runs = " ".join(_final("RUN"))
    for tool in ("pip ", "python3-venv", "python3-pip", "build-essential", "gcc", "grpcio-tools"):
        assert tool not in runs, f"the runtime stage installs {tool.strip()}"


def test_the_health_check_is_the_cli_health_command_within_the_checks_timeout():
    (check,) = _final("HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    argv = json.loads(command)
    assert argv[0] == "supervisor-service"
    args = _parser().parse_args(argv[1:])
    assert args.command == "health"
    check_timeout = float(re.search(r"--timeout=(\d+)s", options).group(1))
    assert args.timeout < check_timeout, "the command must answer before the runtime gives up on it"


def test_exec_form_entrypoint_and_sigterm():
    (entrypoint,) = _final("ENTRYPOINT")
    assert entrypoint.startswith("["), "shell form would put sh between the runtime's signal and Python"
    assert _final("STOPSIGNAL") == ["SIGTERM"]


def test_numeric_non_root_user():
    (user,) = _final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()


def test_the_environment_names_settings_and_the_exposed_ports():
    env = dict(item.split("=", 1) for line in _final("ENV") for item in shlex.split(line))
    settings = {ENV_PREFIX + name.upper(): name for name in Settings.model_fields}
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert set(ours) <= set(settings), set(ours) - set(settings)
    Settings(**{settings[k]: v for k, v in ours.items()})
    (exposed,) = _final("EXPOSE")
    ports = {env["SUPERVISOR_GRPC_ADDR"].rpartition(":")[2], env["SUPERVISOR_METRICS_ADDR"].rpartition(":")[2]}
    assert ports == set(exposed.split())
    (volume,) = _final("VOLUME")
    assert env["SUPERVISOR_DATA_DIR"] in volume
    (workdir,) = _final("WORKDIR")
    assert workdir == env["SUPERVISOR_DATA_DIR"]


@pytest.mark.parametrize("label", ["title", "description", "version", "revision", "licenses"])
def test_oci_labels(label):
    assert f"org.opencontainers.image.{label}=" in " ".join(_final("LABEL"))


def test_the_build_context_holds_what_the_build_copies():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {src for line in INSTRUCTIONS if line.startswith("COPY ") and "--from=" not in line
              for src in line.split()[1:-1]}
    assert copied <= allowed, copied - allowed
