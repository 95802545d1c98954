"""The scrape job the Prometheus Operator generates from a ServiceMonitor or PodMonitor, for tests.

Follows prometheus-operator's config generator (pkg/prometheus/promcfg.go: the ServiceMonitor
and PodMonitor generators, initRelabelings, generateRunningFilter, generateRelabelConfig and the
address sharding) for the fields our monitors use, and refuses any other field, so that a
change to a shipped monitor that this module does not model fails loudly instead of being
tested as something else.

Discovery is replaced by a static target whose labels are the `__meta_kubernetes_*` labels
Kubernetes service discovery would give the exporter's pod, taken from the shipped Service and
DaemonSet. The Operator's relabelings then turn them into the same target labels as in a
cluster (`namespace`, `service`, `pod`, `container`, `endpoint`, `job`), and the monitor's own
relabelings run after them, as in the Operator's config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

KUBERNETES = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"

# What a cluster would show for one exporter pod.
EXPORTER_POD = "nvml-exporter-7xk2p"
NODE = "gpu-node-1"

_ENDPOINT_KEYS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}
_SPEC_KEYS = {"selector", "endpoints", "podMetricsEndpoints", "namespaceSelector"}
_RELABEL_KEYS = {
    "sourceLabels": "source_labels",
    "separator": "separator",
    "targetLabel": "target_label",
    "regex": "regex",
    "modulus": "modulus",
    "replacement": "replacement",
    "action": "action",
}


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((KUBERNETES / name).read_text())
    return document


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _relabel_config(rules: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """generateRelabelConfig: the CRD's camelCase keys, the action lower-cased."""
    out = []
    for rule in rules or []:
        unknown = set(rule) - set(_RELABEL_KEYS)
        if unknown:
            raise ValueError(f"relabeling keys this model does not know: {sorted(unknown)}")
        converted: dict[str, Any] = {}
        for key, value in rule.items():
            converted[_RELABEL_KEYS[key]] = value.lower() if key == "action" else value
        out.append(converted)
    return out


def _check_keys(where: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: fields this model does not know: {sorted(unknown)}")


def _sharding(shard: int = 0, shards: int = 1) -> list[dict[str, Any]]:
    # The config reloader substitutes $(SHARD) with the Prometheus pod's shard number.
    return [
        {
            "source_labels": ["__address__", "__tmp_hash"],
            "target_label": "__tmp_hash",
            "regex": "(.+);",
            "replacement": "$1",
            "action": "replace",
        },
        {
            "source_labels": ["__tmp_hash"],
            "target_label": "__tmp_hash",
            "modulus": shards,
            "action": "hashmod",
        },
        {
            "source_labels": ["__tmp_hash", "__tmp_disable_sharding"],
            "regex": f"{shard};|.+;.+",
            "action": "keep",
        },
    ]


def _endpoint_settings(endpoint: Mapping[str, Any]) -> dict[str, Any]:
    job: dict[str, Any] = {"honor_labels": bool(endpoint.get("honorLabels", False))}
    for key, name in (
        ("interval", "scrape_interval"),
        ("scrapeTimeout", "scrape_timeout"),
        ("path", "metrics_path"),
        ("scheme", "scheme"),
    ):
        if key in endpoint:
            job[name] = endpoint[key]
    return job


def _pod_meta(daemonset: Mapping[str, Any], node: str) -> tuple[dict[str, str], str, str]:
    """The pod-level discovery labels of one DaemonSet pod, its container and port name."""
    template = daemonset["spec"]["template"]
    [container] = template["spec"]["containers"]
    [port] = container["ports"]
    meta = {
        "__meta_kubernetes_namespace": daemonset["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": EXPORTER_POD,
        "__meta_kubernetes_pod_container_name": container["name"],
        "__meta_kubernetes_pod_container_port_name": port["name"],
        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_node_name": node,
        "__meta_kubernetes_pod_ready": "true",
    }
    for key, value in template["metadata"]["labels"].items():
        meta[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
    return meta, container["name"], port["name"]


def _selector_keeps(selector: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    _check_keys(f"{kind} selector", selector, {"matchLabels"})
    return [
        {
            "action": "keep",
            "source_labels": [
                f"__meta_kubernetes_{kind}_label_{_sanitize(key)}",
                f"__meta_kubernetes_{kind}_labelpresent_{_sanitize(key)}",
            ],
            "regex": f"({value});true",
        }
        for key, value in sorted(selector.get("matchLabels", {}).items())
    ]


def service_monitor_job(
    monitor: Mapping[str, Any],
    service: Mapping[str, Any],
    daemonset: Mapping[str, Any],
    address: str,
    node: str = NODE,
    endpoint_index: int = 0,
) -> dict[str, Any]:
    """The scrape job for `monitor`'s endpoint, its target the exporter at `address` on
    `node`."""
    spec = monitor["spec"]
    _check_keys("ServiceMonitor spec", spec, _SPEC_KEYS)
    endpoint = spec["endpoints"][endpoint_index]
    _check_keys("ServiceMonitor endpoint", endpoint, _ENDPOINT_KEYS)
    meta, _, _ = _pod_meta(daemonset, node)
    [service_port] = service["spec"]["ports"]
    meta |= {
        "__meta_kubernetes_service_name": service["metadata"]["name"],
        "__meta_kubernetes_endpoint_port_name": service_port["name"],
        "__meta_kubernetes_endpoint_ready": "true",
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": EXPORTER_POD,
    }
    for key, value in service["metadata"]["labels"].items():
        meta[f"__meta_kubernetes_service_label_{_sanitize(key)}"] = value
        meta[f"__meta_kubernetes_service_labelpresent_{_sanitize(key)}"] = "true"

    target_kind = ["__meta_kubernetes_endpoint_address_target_kind"]
    target_name = ["__meta_kubernetes_endpoint_address_target_name"]
    relabelings: list[dict[str, Any]] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
        *_selector_keeps(spec["selector"], "service"),
    ]
    if "port" in endpoint:
        relabelings.append(
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_endpoint_port_name"],
                "regex": endpoint["port"],
            }
        )
    relabelings += [
        {
            "source_labels": target_kind + target_name,
            "separator": ";",
            "regex": "Node;(.*)",
            "replacement": "${1}",
            "target_label": "node",
        },
        {
            "source_labels": target_kind + target_name,
            "separator": ";",
            "regex": "Pod;(.*)",
            "replacement": "${1}",
            "target_label": "pod",
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {
            "action": "drop",
            "source_labels": ["__meta_kubernetes_pod_phase"],
            "regex": "(Failed|Succeeded)",
        },
        {
            "source_labels": ["__meta_kubernetes_service_name"],
            "target_label": "job",
            "replacement": "${1}",
        },
    ]
    name = f"serviceMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"
    return _job(f"{name}/{endpoint_index}", endpoint, address, meta, relabelings)


def _job(
    name: str,
    endpoint: Mapping[str, Any],
    address: str,
    meta: dict[str, str],
    relabelings: list[dict[str, Any]],
) -> dict[str, Any]:
    """The end both monitors share: the endpoint label, the monitor's own relabelings after the
    Operator's, sharding last, and the metric relabelings."""
    if "port" in endpoint:
        relabelings.append({"target_label": "endpoint", "replacement": endpoint["port"]})
    relabelings += _relabel_config(endpoint.get("relabelings"))
    relabelings += _sharding()
    job = {
        "job_name": name,
        **_endpoint_settings(endpoint),
        "static_configs": [{"targets": [address], "labels": meta}],
        "relabel_configs": relabelings,
    }
    if endpoint.get("metricRelabelings"):
        job["metric_relabel_configs"] = _relabel_config(endpoint["metricRelabelings"])
    return job


def pod_monitor_job(
    monitor: Mapping[str, Any],
    daemonset: Mapping[str, Any],
    address: str,
    node: str = NODE,
    endpoint_index: int = 0,
) -> dict[str, Any]:
    """The scrape job for `monitor`'s podMetricsEndpoint, its target the exporter on `node`."""
    spec = monitor["spec"]
    _check_keys("PodMonitor spec", spec, _SPEC_KEYS)
    endpoint = spec["podMetricsEndpoints"][endpoint_index]
    _check_keys("PodMonitor endpoint", endpoint, _ENDPOINT_KEYS)
    meta, _, _ = _pod_meta(daemonset, node)
    relabelings: list[dict[str, Any]] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
        {
            "action": "drop",
            "source_labels": ["__meta_kubernetes_pod_phase"],
            "regex": "(Failed|Succeeded)",
        },
        *_selector_keeps(spec["selector"], "pod"),
    ]
    if "port" in endpoint:
        relabelings.append(
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
            }
        )
    namespace = monitor["metadata"]["namespace"]
    relabelings += [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{namespace}/{monitor['metadata']['name']}"},
    ]
    name = f"podMonitor/{namespace}/{monitor['metadata']['name']}/{endpoint_index}"
    return _job(name, endpoint, address, meta, relabelings)


def kubernetes_sd_job(
    path: Path, daemonset: Mapping[str, Any], address: str, node: str
) -> dict[str, Any]:
    """A plain `kubernetes_sd_configs` job (role pod) from a prometheus.yml fragment, its
    discovery replaced by the exporter's pod as that role would describe it."""
    [job] = yaml.safe_load(path.read_text())["scrape_configs"]
    [sd] = job.pop("kubernetes_sd_configs")
    if sd["role"] != "pod":
        raise ValueError(f"{path}: only role pod is modelled, not {sd['role']}")
    meta, _, _ = _pod_meta(daemonset, node)
    job["static_configs"] = [{"targets": [address], "labels": meta}]
    return dict(job)
