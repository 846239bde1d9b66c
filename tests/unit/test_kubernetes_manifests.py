"""deploy/kubernetes/ against the code: the image, ports, probes and settings the manifests name are
the ones the Dockerfile, the Makefile, the proto and `Settings` define. No cluster applies them here;
this is what can be checked without one."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from supervisor_service.app.settings import ENV_PREFIX, Settings
from supervisor_service.proto import pb

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/kubernetes"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegionSupervisor"].full_name


def _docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and doc.get("kind"), f"{path.name}: an empty document or one without kind"
            key = doc["kind"]
            assert key not in docs, f"two {key} documents"
            docs[key] = doc
    return docs


DOCS = _docs()
POD = DOCS["Deployment"]["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
ENV = {e["name"]: e for e in CONTAINER["env"]}


def _dockerfile(instruction: str) -> list[str]:
    """The arguments of every `instruction` line of the Dockerfile's final stage."""
    final = (REPO / "Dockerfile").read_text().split("\nFROM ")[-1]
    return [line.split(None, 1)[1] for line in final.splitlines() if line.startswith(instruction + " ")]


def _ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}


# The oldest Kubernetes the manifests are for (gRPC probes are GA from 1.27); kubernetes-validate's
# floor in pyproject.toml bundles its schema.
KUBERNETES_VERSION = "1.30.0"


@pytest.mark.parametrize("kind", sorted(set(DOCS) - {"Kustomization"}))
def test_each_manifest_is_valid_for_the_kubernetes_api(kind):
    # strict: a field the API does not have (a misspelt `servce:` under a probe) is an error, not ignored.
    kubernetes_validate.validate(DOCS[kind], KUBERNETES_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    import copy

    broken = copy.deepcopy(DOCS["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = SERVICE_NAME
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_file_is_in_the_kustomization():
    listed = set(DOCS["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_three_replicas_on_etcd():
    assert DOCS["Deployment"]["spec"]["replicas"] == 3
    store = ENV["SUPERVISOR_STORE"]["value"]
    assert store.startswith("etcd://") and len(store.removeprefix("etcd://").split(",")) == 3


def test_the_image_is_the_one_make_image_tags():
    makefile = (REPO / "Makefile").read_text()
    (tag,) = re.findall(r"^IMAGE \?= (\S+)$", makefile, re.M)
    assert CONTAINER["image"] == tag
    assert CONTAINER.get("command") is None, "the image's ENTRYPOINT runs (exec form, SIGTERM reaches Python)"
    assert CONTAINER["args"] == ["serve"]


def test_ports_are_the_images_and_the_settings():
    (exposed,) = _dockerfile("EXPOSE")
    assert sorted(_ports().values()) == sorted(int(p) for p in exposed.split())
    assert ENV["SUPERVISOR_GRPC_ADDR"]["value"].rpartition(":")[2] == str(_ports()["grpc"])
    assert ENV["SUPERVISOR_METRICS_ADDR"]["value"].rpartition(":")[2] == str(_ports()["metrics"])
    assert ENV["SUPERVISOR_ADVERTISE_ADDR"]["value"] == f"$(POD_IP):{_ports()['grpc']}"
    service_ports = {p["name"]: p for p in DOCS["Service"]["spec"]["ports"]}
    assert set(service_ports) == set(_ports())
    for name, port in service_ports.items():
        assert port["targetPort"] == name and port["port"] == _ports()[name]


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_ask_grpc_health_of_the_service_on_the_grpc_port(probe):
    spec = CONTAINER[probe]
    assert spec["grpc"] == {"port": _ports()["grpc"], "service": SERVICE_NAME}


def test_liveness_is_slower_to_give_up_than_readiness():
    ready, live = CONTAINER["readinessProbe"], CONTAINER["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 4 * ready["periodSeconds"] * ready["failureThreshold"]


def test_every_env_name_is_a_setting_and_every_value_is_valid():
    settings = {ENV_PREFIX + name.upper(): name for name in Settings.model_fields}
    ours = {name for name in ENV if name.startswith(ENV_PREFIX)}
    unknown = ours - set(settings)
    assert not unknown, f"not settings: {sorted(unknown)}"
    values = {settings[name]: ENV[name]["value"].replace("$(POD_IP)", "10.1.2.3") for name in ours
              if "value" in ENV[name]}
    Settings(**values)  # raises on any value the service would refuse at start
    others = set(ENV) - ours
    assert others == {"POD_IP"}
    assert ENV["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # The token, if any, from a Secret: never in the manifest.
    assert "value" not in ENV["SUPERVISOR_AUTH_TOKEN"]


def test_non_root_read_only_root_and_writable_data_and_tmp():
    (user,) = _dockerfile("USER")
    uid, _, gid = user.partition(":")
    pod, container = POD["securityContext"], CONTAINER["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(uid) and pod["runAsGroup"] == int(gid)
    assert container["readOnlyRootFilesystem"] is True and container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in CONTAINER["volumeMounts"]}
    volumes = {v["name"]: v for v in POD["volumes"]}
    data_dir = ENV["SUPERVISOR_DATA_DIR"]["value"]
    assert data_dir in mounts and "/tmp" in mounts
    (volume_line,) = _dockerfile("VOLUME")
    assert data_dir in volume_line
    for path in (data_dir, "/tmp"):
        assert "emptyDir" in volumes[mounts[path]]


def test_resources_and_the_shutdown_budget():
    resources = CONTAINER["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "cpu" not in resources.get("limits", {}), "a CPU limit throttles the supervisor thread: a local pause"

    def mib(text: str) -> int:
        number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", text).groups()
        return int(number) * (1024 if unit == "Gi" else 1)

    assert mib(resources["limits"]["memory"]) >= 2 * mib(resources["requests"]["memory"]) >= 512
    grace_ms = POD["terminationGracePeriodSeconds"] * 1000
    assert grace_ms > Settings.model_fields["shutdown_timeout_ms"].default


def test_the_service_and_the_budget_select_the_pods():
    labels = DOCS["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert DOCS["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert DOCS["Service"]["spec"]["selector"].items() <= labels.items()
    assert DOCS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert DOCS["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
