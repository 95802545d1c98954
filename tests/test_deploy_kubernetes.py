"""deploy/kubernetes: the manifests are valid and fit the exporter.

The core objects are validated offline against the Kubernetes OpenAPI schemas with
kubernetes-validate (strict: unknown fields fail); the Prometheus Operator's ServiceMonitor and
PrometheusRule, which those schemas do not have, against the subset of their CRD schemas the
manifests use. Then the wiring: probes on the endpoints the exporter serves, its default port,
the config in the ConfigMap valid for the exporter, the Service and ServiceMonitor selecting the
pods, the PrometheusRule carrying deploy/prometheus's rules, and a locked-down pod.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import ExporterProcess

from exporter import __version__
from exporter.cli import KNOWN_NAMES
from exporter.config import DEFAULT_PORT, parse_config, split_listen_address

REPO = Path(__file__).resolve().parent.parent
K8S_DIR = REPO / "deploy" / "kubernetes"
RULES = REPO / "deploy" / "prometheus" / "nvml-exporter.rules.yml"

# Kubernetes versions the manifests must be valid for: the oldest still commonly supported by
# the managed offerings, and a recent one. kubernetes-validate ships their schemas.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
MONITORING_API = "monitoring.coreos.com/v1"
EXPORTER_UID = 65532
CONFIG_KEY = "exporter.yaml"


def required_module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(
            f"the Python package `{package}` is required to validate the Kubernetes manifests: "
            "pip install -e '.[test]'"
        )


@pytest.fixture(scope="module")
def kubernetes_validate() -> ModuleType:
    return required_module("kubernetes_validate", "kubernetes-validate")


@pytest.fixture(scope="module")
def jsonschema() -> ModuleType:
    return required_module("jsonschema", "jsonschema")


@cache
def manifests() -> dict[str, dict[str, Any]]:
    """Every manifest file but the kustomization, by file name; one object per file."""
    found = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        assert len(documents) == 1, f"{path.name}: one object per file"
        found[path.name] = documents[0]
    assert found, f"no manifests in {K8S_DIR}"
    return found


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    return data


def one(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in manifests().values() if doc["kind"] == kind]
    return found


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (found,) = pod_spec()["containers"]
    assert isinstance(found, dict)
    return found


def container_port(name_or_number: str | int) -> int:
    """What a probe's or Service's port refers to in the exporter's container."""
    for port in container()["ports"]:
        if name_or_number in (port.get("name"), port["containerPort"]):
            number = port["containerPort"]
            assert isinstance(number, int)
            return number
    raise AssertionError(f"the container has no port {name_or_number!r}")


def exporter_config_text() -> str:
    text = one("ConfigMap")["data"][CONFIG_KEY]
    assert isinstance(text, str)
    return text


def core_manifests() -> list[str]:
    return [name for name, doc in manifests().items() if doc["apiVersion"] != MONITORING_API]


def test_kustomization_lists_every_manifest_in_one_namespace() -> None:
    kz = kustomization()
    assert kz["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kz["kind"] == "Kustomization"
    assert sorted(kz["resources"]) == sorted(manifests()), "resources vs. files in the folder"
    namespace = kz["namespace"]
    assert one("Namespace")["metadata"]["name"] == namespace
    for name, doc in manifests().items():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, name


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", core_manifests())
def test_core_manifests_are_valid_kubernetes(
    kubernetes_validate: ModuleType, name: str, version: str
) -> None:
    try:
        kubernetes_validate.validate(manifests()[name], version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(part) for part in err.path)
        pytest.fail(f"{name} is not valid Kubernetes {version}: {where}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError as err:
        pytest.fail(f"{name}: {err.message}")


def test_the_core_kinds_are_all_validated() -> None:
    kinds = {manifests()[name]["kind"] for name in core_manifests()}
    assert kinds == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"}


# The part of the Prometheus Operator's CRD schemas (monitoring.coreos.com/v1, operator 0.8x)
# that these manifests use. A field outside it fails: add it here if the CRD has it.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string", "minLength": 1},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}
_RELABEL_ACTIONS = [
    variant
    for action in ("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep")
    for variant in (action, action.capitalize())
]
_RELABELING = {
    "type": "object",
    "properties": {
        "action": {"enum": _RELABEL_ACTIONS},
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
    },
    "additionalProperties": False,
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _STRING_MAP, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": MONITORING_API},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"any": {"type": "boolean"}, "matchNames": _STRINGS},
                    "additionalProperties": False,
                },
                "jobLabel": {"type": "string"},
                "targetLabels": _STRINGS,
                "podTargetLabels": _STRINGS,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABELING},
                            "metricRelabelings": {"type": "array", "items": _RELABELING},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": MONITORING_API},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "limit": {"type": "integer"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [
                                        {"required": ["record"], "not": {"required": ["alert"]}},
                                        {"required": ["alert"], "not": {"required": ["record"]}},
                                    ],
                                    "properties": {
                                        "record": {"type": "string"},
                                        "alert": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                    "additionalProperties": False,
                                },
                            },
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("kind", "schema"),
    [("ServiceMonitor", SERVICE_MONITOR_SCHEMA), ("PrometheusRule", PROMETHEUS_RULE_SCHEMA)],
)
def test_prometheus_operator_resources_are_well_formed(
    jsonschema: ModuleType, kind: str, schema: dict[str, Any]
) -> None:
    doc = one(kind)
    validator = jsonschema.Draft202012Validator(schema)
    errors = [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(doc)
    ]
    assert errors == [], f"{kind} does not fit the {MONITORING_API} CRD schema"


def test_prometheusrule_carries_the_rules_of_deploy_prometheus() -> None:
    groups = one("PrometheusRule")["spec"]["groups"]
    names = [group["name"] for group in groups]
    assert len(names) == len(set(names)), "group names must be unique (the CRD's list-map key)"
    expected = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    assert groups == expected, (
        f"deploy/kubernetes/prometheusrule.yaml's spec.groups differ from {RULES.name}'s groups: "
        "edit the rules file (its promtool unit tests cover them) and copy its groups over"
    )


def test_probes_and_port_are_the_exporters() -> None:
    c = container()
    (metrics_port,) = c["ports"]
    assert metrics_port == {"name": "metrics", "containerPort": DEFAULT_PORT, "protocol": "TCP"}
    liveness = c["livenessProbe"]["httpGet"]
    readiness = c["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    assert container_port(liveness["port"]) == DEFAULT_PORT
    assert container_port(readiness["port"]) == DEFAULT_PORT
    assert liveness.get("scheme", "HTTP") == readiness.get("scheme", "HTTP") == "HTTP"


def test_configmap_holds_a_valid_config_listening_on_the_probed_port() -> None:
    config = parse_config(
        yaml.safe_load(exporter_config_text()), "configmap.yaml", known=KNOWN_NAMES
    )
    assert config.kubernetes.enabled
    assert config.web.listen_address == f":{DEFAULT_PORT}"
    host, port = split_listen_address(config.web.listen_address)
    assert host is None, "the kubelet probes the pod's IP, so listen on every interface"
    assert port == container_port("metrics")
    assert config.web.config_file is None, "TLS would need scheme HTTPS in probes and scrapes"


def test_config_file_and_pod_resources_socket_are_mounted() -> None:
    spec, c = pod_spec(), container()
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {PurePosixPath(mount["mountPath"]): mount for mount in c["volumeMounts"]}

    args = c["args"]
    config_file = PurePosixPath(args[args.index("--config.file") + 1])
    mount = mounts[config_file.parent]
    assert volumes[mount["name"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert config_file.name == CONFIG_KEY

    config = parse_config(yaml.safe_load(exporter_config_text()), known=KNOWN_NAMES)
    socket_dir = PurePosixPath(config.kubernetes.socket).parent
    assert socket_dir == PurePosixPath("/var/lib/kubelet/pod-resources")
    mount = mounts[socket_dir]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["hostPath"]["path"] == str(socket_dir)


def security_settings(pod: dict[str, Any], name: str) -> dict[str, Any]:
    """The container's effective security settings: its own, else the pod's."""
    (c,) = [c for c in pod["containers"] if c["name"] == name]
    return {**pod.get("securityContext", {}), **c.get("securityContext", {})}


def assert_locked_down(pod: dict[str, Any], *, uid: int) -> None:
    effective = security_settings(pod, "nvml-exporter")
    assert effective["runAsUser"] == uid
    assert effective["runAsNonRoot"] is (uid != 0)
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective.get("privileged", False) is False
    assert effective["capabilities"] == {"drop": ["ALL"]}
    assert effective["seccompProfile"] == {"type": "RuntimeDefault"}
    for mount in pod["containers"][0]["volumeMounts"]:
        assert mount.get("readOnly") is True, mount
    for key in ("hostPID", "hostIPC", "hostNetwork"):
        assert pod.get(key, False) is False, f"{key} must stay a commented-out option"


def test_pod_runs_as_a_fixed_non_root_user_and_is_locked_down() -> None:
    spec = pod_spec()
    assert_locked_down(spec, uid=EXPORTER_UID)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    host_paths = [v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v]
    assert host_paths == ["/var/lib/kubelet/pod-resources"]


def test_optional_root_patch_in_the_kustomization_applies_and_keeps_the_rest_locked(
    kubernetes_validate: ModuleType,
) -> None:
    """kustomization.yaml documents, commented out, a patch for pod mapping (UID 0)."""
    text = (K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8")
    start = text.index("# patches:")
    block = "\n".join(line.removeprefix("# ") for line in text[start:].splitlines())
    (patch,) = yaml.safe_load(block)["patches"]
    assert patch["target"] == {"kind": "DaemonSet", "name": "nvml-exporter"}
    daemonset = yaml.safe_load(yaml.safe_dump(one("DaemonSet")))  # a deep copy
    for op in yaml.safe_load(patch["patch"]):
        assert op["op"] == "replace"
        *parents, leaf = op["path"].strip("/").split("/")
        node = daemonset
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert leaf in node, f"{op['path']} does not exist, `replace` would fail"
        node[leaf] = op["value"]
    kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)
    assert_locked_down(daemonset["spec"]["template"]["spec"], uid=0)


def test_pod_lands_on_every_gpu_node_without_taking_a_gpu() -> None:
    spec, c = pod_spec(), container()
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(
        t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" and t["effect"] == "NoSchedule"
        for t in spec["tolerations"]
    )
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    resources = c["resources"]
    for section in ("requests", "limits"):
        assert set(resources[section]) == {"cpu", "memory"}, section
    assert quantity(resources["requests"]["cpu"]) <= quantity(resources["limits"]["cpu"])
    assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"])
    assert quantity(resources["limits"]["memory"]) <= 256 * 2**20, "keep the exporter tiny"


def test_options_are_documented_in_the_daemonset() -> None:
    text = (K8S_DIR / "daemonset.yaml").read_text(encoding="utf-8")
    for option in ("runtimeClassName: nvidia", "hostPID: true"):
        assert re.search(rf"^\s*# {re.escape(option)}$", text, re.MULTILINE), option
    assert "Dockerfile" in text, "say where the image comes from"


def test_image_is_this_version() -> None:
    daemonset = one("DaemonSet")
    assert container()["image"] == f"ghcr.io/example/nvml-exporter:{__version__}"
    assert daemonset["metadata"]["labels"]["app.kubernetes.io/version"] == __version__


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (the forms used here: m, Ki/Mi/Gi, plain)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


def test_service_and_servicemonitor_select_the_exporter_pods() -> None:
    daemonset, service, monitor = one("DaemonSet"), one("Service"), one("ServiceMonitor")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()

    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics"
    assert port["port"] == DEFAULT_PORT
    assert container_port(port["targetPort"]) == DEFAULT_PORT

    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["interval"] == "15s"
    assert endpoint.get("path", "/metrics") == "/metrics"


def test_alerts_select_the_job_the_servicemonitor_creates() -> None:
    """Without jobLabel, the operator names the job after the Service."""
    monitor, service = one("ServiceMonitor"), one("Service")
    assert "jobLabel" not in monitor["spec"]
    jobs = set(re.findall(r'\bup\{job="([^"]+)"\}', RULES.read_text(encoding="utf-8")))
    assert jobs == {service["metadata"]["name"]}


def test_instance_is_the_node_so_series_survive_restarts() -> None:
    (endpoint,) = one("ServiceMonitor")["spec"]["endpoints"]
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_node_name"],
        "targetLabel": "instance",
        "action": "replace",
    } in endpoint["relabelings"]


def answers_ok(process: ExporterProcess, path: str) -> bool:
    return process.get(path).status == 200


@pytest.mark.slow
def test_exporter_with_the_configmap_config_answers_the_probes(
    exporter: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    """The ConfigMap's config, on the simulated fleet, on loopback: the probes get 200."""
    config_file = tmp_path / CONFIG_KEY
    config_file.write_text(exporter_config_text(), encoding="utf-8")
    process = exporter("--config.file", str(config_file), "--simulate", "2")
    for probe in (container()["livenessProbe"], container()["readinessProbe"]):
        process.wait_for(partial(answers_ok, process, probe["httpGet"]["path"]))
    assert "nvml_kubernetes_pod_resources_up" in process.get("/metrics").text
