"""The container image, built and run for real: `deploy/image/build.sh` (what `make image` runs) with
buildah, then the image's own entrypoint under `buildah run --isolation chroot` (no daemon, no
container runtime: the host's network, so the ports are reached on 127.0.0.1).

Checked: the image's configuration (exec-form entrypoint, numeric non-root user, SIGTERM as the stop
signal, the health check, the two ports, the data volume, the OCI labels, settings that exist); the
runtime stage holds no compiler and no pip; the entrypoint serves (SERVING through the image's own
HEALTHCHECK command inside, and over the network from outside, metrics too); it runs as a non-root
user that can write its data directory; SIGTERM ends it with exit 0, having reached the Python
process itself.

The first build from nothing takes a few minutes (the Debian base, the packages); later ones are
cached. Without buildah the tests skip, and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from supervisor_service.app.settings import ENV_PREFIX, Settings
from tests.support.readiness import free_port, wait_ready
from tests.support.servers import require_binary

pytestmark = [pytest.mark.image, pytest.mark.realtime, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/region-supervisor:image-test"
DATA_DIR = "/var/lib/supervisor"


def _run(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def image() -> dict:
    """The image built by deploy/image/build.sh with buildah; its docker-format configuration."""
    require_binary("buildah", "buildah")
    env = dict(os.environ, IMAGE_TOOL="buildah", IMAGE=IMAGE)
    started = time.monotonic()
    build = subprocess.run([str(REPO / "deploy/image/build.sh")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, f"the image build failed ({build.returncode}):\n{(build.stdout + build.stderr)[-5000:]}"
    print(f"image built in {time.monotonic() - started:.0f} s")
    inspected = json.loads(_run("buildah", "inspect", "--type", "image", IMAGE).stdout)
    return inspected["Docker"]["config"]


@pytest.fixture(scope="module")
def container(image) -> str:
    """A working container of the image (its rootfs, as `buildah run` uses it)."""
    name = _run("buildah", "from", "--pull=false", IMAGE).stdout.strip()
    yield name
    _run("buildah", "rm", name, check=False)


def _inside(container: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 60):
    """`argv` in the container, as the image's user, with the image's environment (and `env`)."""
    flags = [f for k, v in (env or {}).items() for f in ("--env", f"{k}={v}")]
    return subprocess.run(["buildah", "run", "--isolation", "chroot", *flags, container, "--", *argv],
                          capture_output=True, text=True, timeout=timeout)


def _env(config: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config["Env"])


# ---------------------------------------------------------------- the configuration


def test_the_image_configuration(image):
    # Exec form: the process is supervisor-service itself, not a shell that would swallow SIGTERM.
    assert image["Entrypoint"] == ["supervisor-service"] and image["Cmd"] == ["serve"]
    assert image["StopSignal"] == "SIGTERM"
    uid, _, gid = image["User"].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, image["User"]
    assert image["Healthcheck"]["Test"][:3] == ["CMD", "supervisor-service", "health"], image.get("Healthcheck")
    assert set(image["ExposedPorts"]) == {"50051/tcp", "9464/tcp"}
    assert set(image["Volumes"]) == {DATA_DIR} and image["WorkingDir"] == DATA_DIR
    env = _env(image)
    assert env["SUPERVISOR_GRPC_ADDR"] == "0.0.0.0:50051" and env["SUPERVISOR_METRICS_ADDR"] == "0.0.0.0:9464"
    assert env["SUPERVISOR_DATA_DIR"] == DATA_DIR
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= settings
    labels = image["Labels"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.title"] == "region-supervisor"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")


def test_the_runtime_has_no_compiler_pip_or_build_tool(container):
    found = _inside(container, "sh", "-c", "for t in gcc cc c++ make pip pip3 protoc; do command -v $t; done; "
                    "ls /opt/venv/lib/python3.11/site-packages | grep -iE '^(pip|setuptools|grpc_tools|wheel)' ; true")
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr


def test_the_image_user_is_not_root_and_owns_the_data_dir(container):
    ids = _inside(container, "sh", "-c", f"id -u; id -g; stat -c %u {DATA_DIR}; touch {DATA_DIR}/probe && echo ok")
    assert ids.returncode == 0, ids.stderr
    uid, gid, owner, ok = ids.stdout.split()
    assert uid != "0" and gid != "0" and owner == uid and ok == "ok", ids.stdout
    # An arbitrary uid of the root group (how OpenShift runs images) may use the data directory too.
    other = subprocess.run(["buildah", "run", "--isolation", "chroot", "--user", "123456:0", container, "--", "sh",
                            "-c", f"touch {DATA_DIR}/other && echo ok"], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "ok", other.stderr
    # Nothing else is the user's to write: the installed code is root's.
    denied = _inside(container, "sh", "-c", "touch /opt/venv/probe 2>/dev/null && echo writable || echo denied")
    assert denied.stdout.strip() == "denied"


# ---------------------------------------------------------------- the entrypoint, run


def _processes_under(root: int) -> list[int]:
    """Every process below `root`, found through /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def test_the_entrypoint_serves_and_sigterm_ends_it_with_exit_0(image, container, tmp_path):
    started = time.time() - 1  # mtimes have a coarser grain than this clock on some filesystems
    grpc_port, metrics_port = free_port(), free_port()
    # The image's own listen addresses with other ports: the host's network is shared.
    env = {"SUPERVISOR_GRPC_ADDR": f"0.0.0.0:{grpc_port}", "SUPERVISOR_METRICS_ADDR": f"0.0.0.0:{metrics_port}"}
    flags = [f for k, v in env.items() for f in ("--env", f"{k}={v}")]
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["buildah", "run", "--isolation", "chroot", *flags, container, "--",
                                 *image["Entrypoint"], *image["Cmd"]], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_ready(f"127.0.0.1:{grpc_port}", 90, gone=lambda: "" if proc.poll() is None else f"exited {proc.returncode}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log: {log_path.read_text()[-3000:]}") from None

        # The image's HEALTHCHECK command, as a runtime runs it: inside, with the image's environment.
        check = _inside(container, *image["Healthcheck"]["Test"][1:], env=env)
        assert (check.returncode, check.stdout) == (0, "SERVING\n"), check.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert resp.status == 200 and b"supervisor_" in resp.read()

        # The service is one Python process below buildah's own processes (buildah-chroot-runtime, then
        # buildah-chroot-exec, which starts the entrypoint), running as the image's user, with no shell
        # in between: what a runtime signals is Python itself.
        below = [(pid, _cmdline(pid)) for pid in _processes_under(proc.pid)]
        services = [pid for pid, argv in below if argv[:1] and Path(argv[0]).name.startswith("python")]
        assert len(services) == 1, below
        pid = services[0]
        assert _cmdline(pid)[1:] == ["/opt/venv/bin/supervisor-service", "serve"], _cmdline(pid)
        assert not any(argv[:1] and Path(argv[0]).name in ("sh", "bash", "dash") for _, argv in below), below
        assert _uid(pid) == int(image["User"].partition(":")[0]) != 0
        # Its state is in the data volume, written by that user.
        listing = _inside(container, "sh", "-c", f"ls -n {DATA_DIR}")
        assert ".sqlite" in listing.stdout or ".db" in listing.stdout, listing.stdout

        # SIGTERM, as a container runtime sends it to the container's first process: the service itself.
        # (`buildah run` does not pass a SIGTERM of its own on: it kills its children.) Its exit status
        # comes back through buildah-chroot-exec and buildah.
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
        assert not Path(f"/proc/{pid}").exists()
    finally:
        if proc.poll() is None:
            # buildah's child processes and the service outlive a killed `buildah run`: end them first.
            for child in reversed(_processes_under(proc.pid)):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait(30)
    events = [json.loads(line).get("event") for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert "service_started" in events, log_path.read_text()[-3000:]
    assert "service_stopped" in events, events[-10:]
    # A read-only root filesystem (the Kubernetes manifests' readOnlyRootFilesystem) is enough: it
    # wrote nothing but its data directory (and /tmp, an emptyDir there).
    root = Path(_run("buildah", "mount", container).stdout.strip())
    try:
        changed = [str(p.relative_to(root)) for p in root.rglob("*")
                   if not p.is_symlink() and p.stat().st_mtime >= started and p.is_file()]
    finally:
        _run("buildah", "umount", container, check=False)
    allowed = (DATA_DIR.lstrip("/") + "/", "tmp/", "run/", "etc/hosts", "etc/resolv.conf", "etc/hostname")
    assert [p for p in changed if not p.startswith(allowed)] == [], changed
