"""Which pod holds each GPU, from the kubelet's pod-resources API (cached; never on scrape).

Rather than multiplying every GPU series by pod labels, one join-friendly series per
allocation: `nvml_power_watts * on(uuid) group_left(namespace, pod) nvml_gpu_pod_info`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from exporter.collectors.base import Collector, Emitter, MetricSpec, Services
from exporter.collectors.shared import SampleContext, mig_instances
from exporter.nvml import Device
from exporter.workload import PodSource

if TYPE_CHECKING:
    from exporter.config import Config

POD_INFO = MetricSpec(
    "nvml_gpu_pod_info",
    "info",
    "A Kubernetes container the kubelet allocated this GPU (or its MIG device mig_uuid) to; "
    "always 1. Several rows when the GPU is shared.",
    labels=("mig_uuid", "namespace", "pod", "container"),
    source="kubelet pod-resources API v1 List (polled every kubernetes.interval)",
    dcgm_note="labels container, namespace, pod on every dcgm-exporter series of the GPU (or "
    "of the MIG instance mig_uuid); one pod where several share a GPU, as dcgm-exporter "
    "without --kubernetes-virtual-gpus; absent on GPUs no pod holds",
)
KUBELET_UP = MetricSpec(
    "nvml_kubernetes_pod_resources_up",
    "gauge",
    "1 if the last poll of the kubelet pod-resources socket succeeded.",
    per_device=False,
    source="kubelet pod-resources API",
)
KUBELET_LAST_SUCCESS = MetricSpec(
    "nvml_kubernetes_pod_resources_last_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful poll of the kubelet.",
    per_device=False,
    unit="seconds",
    source="kubelet pod-resources API",
)
KUBELET_ERRORS = MetricSpec(
    "nvml_kubernetes_pod_resources_errors_total",
    "counter",
    "Failed polls of the kubelet pod-resources socket.",
    per_device=False,
    source="kubelet pod-resources API",
)


class KubernetesCollector(Collector):
    """Active only with `kubernetes.enabled: true`."""

    name = "kubernetes"
    metrics = (POD_INFO, KUBELET_UP, KUBELET_LAST_SUCCESS, KUBELET_ERRORS)

    def __init__(self) -> None:
        self._pods: PodSource | None = None

    def configure(self, config: Config, services: Services) -> None:
        self._pods = services.pods

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        if self._pods is None:
            return
        pods = self._pods.pods()
        # The device plugin names GPUs by UUID, or by index with `deviceIDStrategy: index`.
        whole = pods.get(device.uuid) or pods.get(str(device.index), ())
        targets = [("", whole)] + [(m.uuid, pods.get(m.uuid, ())) for m in mig_instances(device)]
        for mig_uuid, holders in targets:
            for pod in holders:
                out.add(POD_INFO, 1, mig_uuid, pod.namespace, pod.pod, pod.container)

    def collect_global(self, out: Emitter) -> None:
        if self._pods is None:
            return
        up, last_success, errors = self._pods.status()
        out.add(KUBELET_UP, 1 if up else 0)
        out.add(KUBELET_LAST_SUCCESS, last_success)
        out.add(KUBELET_ERRORS, errors)
