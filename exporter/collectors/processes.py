"""Who uses the GPU: a cheap per-GPU process count, and opt-in per-process series.

Per-process series carry the process's name, its container and, under Kubernetes, its pod, so
"which workload is this?" is one query. Cardinality is bounded by `processes.max_per_device`
(largest memory first); what the cap drops is counted.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.collectors.base import (
    Collector,
    Emitter,
    MetricSpec,
    Services,
)
from exporter.collectors.shared import SampleContext, instance_uuid, running_processes
from exporter.nvml import Device, ProcessInfo, ProcessSample
from exporter.workload import Attribution, Container, Pod, PodSource

if TYPE_CHECKING:
    from exporter.config import Config

log = logging.getLogger(__name__)

PROCESS_LABELS = (
    "pid",
    "process_name",
    "type",
    "gpu_instance",
    "compute_instance",
    "container_id",
    "pod_uid",
    "namespace",
    "pod",
    "container",
)


PROCESSES = MetricSpec(
    "nvml_processes",
    "gauge",
    "Processes using the GPU, by type (compute, graphics, or compute+graphics).",
    labels=("type",),
    source="nvmlDeviceGetComputeRunningProcesses_v3, GetGraphicsRunningProcesses_v3",
)
HOST_PIDS_VISIBLE = MetricSpec(
    "nvml_host_processes_visible",
    "gauge",
    "1 if the exporter sees the host's PIDs (hostPID: true, --pid=host), so GPU processes can "
    "be named and attributed to containers; GPU-level data is exported either way.",
    per_device=False,
    source="/proc/<pid> of the PIDs NVML reports",
)


class ProcessCountCollector(Collector):
    name = "process_count"
    metrics = (PROCESSES, HOST_PIDS_VISIBLE)

    def __init__(self) -> None:
        self._attribution: Attribution | None = None
        self._visible: bool | None = None
        self._seen_pids: list[int] = []

    def configure(self, config: Config, services: Services) -> None:
        self._attribution = services.attribution

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        counts: dict[str, int] = defaultdict(int)
        for process in running_processes(device, context):
            counts[process.type] += 1
            self._seen_pids.append(process.info.pid)
        for kind in ("compute", "graphics"):
            counts.setdefault(kind, 0)
        for kind, count in counts.items():
            out.add(PROCESSES, count, kind)

    def collect_global(self, out: Emitter) -> None:
        pids, self._seen_pids = self._seen_pids, []
        if not pids or self._attribution is None:
            return  # no process to judge by: keep the last verdict
        visible = any(self._attribution.container(pid) is not None for pid in pids)
        if visible != self._visible:
            self._visible = visible
            if not visible:
                log.warning(
                    "cannot see the host's process IDs, so GPU processes stay unnamed and "
                    "unattributed; run with hostPID: true (Kubernetes) or --pid=host (Docker), "
                    "or point processes.proc_root at the host's /proc"
                )
        out.add(HOST_PIDS_VISIBLE, 1 if visible else 0)


def _process_spec(name: str, help_: str, unit: str, source: str) -> MetricSpec:
    return MetricSpec(name, "gauge", help_, labels=PROCESS_LABELS, unit=unit, source=source)


PROCESS_MEMORY = _process_spec(
    "nvml_process_memory_used_bytes",
    "GPU memory the process has allocated.",
    "bytes",
    "nvmlDeviceGet{Compute,Graphics}RunningProcesses_v3 .usedGpuMemory",
)
PROCESS_SM = _process_spec(
    "nvml_process_sm_utilization_ratio",
    "Fraction of time the process ran kernels over the interval.",
    "ratio",
    "nvmlDeviceGetProcessUtilization .smUtil, averaged over the interval",
)
PROCESS_MEMORY_UTIL = _process_spec(
    "nvml_process_memory_utilization_ratio",
    "Fraction of time the process read or wrote device memory over the interval.",
    "ratio",
    "nvmlDeviceGetProcessUtilization .memUtil, averaged over the interval",
)
PROCESS_ENCODER = _process_spec(
    "nvml_process_encoder_utilization_ratio",
    "Fraction of time the process used the video encoder over the interval.",
    "ratio",
    "nvmlDeviceGetProcessUtilization .encUtil, averaged over the interval",
)
PROCESS_DECODER = _process_spec(
    "nvml_process_decoder_utilization_ratio",
    "Fraction of time the process used the video decoder over the interval.",
    "ratio",
    "nvmlDeviceGetProcessUtilization .decUtil, averaged over the interval",
)
DROPPED = MetricSpec(
    "nvml_process_series_dropped",
    "gauge",
    "Processes on the GPU not exported because of processes.max_per_device.",
    source="exporter",
)


@dataclass
class _Identity:
    name: str
    container: Container


class ProcessesCollector(Collector):
    name = "processes"
    default_enabled = False
    metrics = (
        PROCESS_MEMORY,
        PROCESS_SM,
        PROCESS_MEMORY_UTIL,
        PROCESS_ENCODER,
        PROCESS_DECODER,
        DROPPED,
    )

    def __init__(self) -> None:
        self._limit = 32
        self._attribution: Attribution | None = None
        self._pods: PodSource | None = None
        # Per GPU: the newest utilization sample seen, and what we know of each PID.
        self._last_sample_us: dict[str, int] = {}
        self._last_utilization: dict[str, dict[int, tuple[float, float, float, float]]] = {}
        self._identities: dict[str, dict[int, _Identity]] = {}

    def configure(self, config: Config, services: Services) -> None:
        self._limit = config.processes.max_per_device
        if services.attribution is not self._attribution or services.pods is not self._pods:
            # Names and containers were looked up once per process through the old services
            # (a /proc without the host's PIDs, say): look them up again through the new ones.
            self._identities.clear()
        self._attribution = services.attribution
        self._pods = services.pods

    def _identify(self, device: Device, pids: list[int]) -> dict[int, _Identity]:
        """Name and container of each PID, looked up once per process lifetime."""
        known = self._identities.get(device.uuid, {})
        current = {}
        for pid in pids:
            identity = known.get(pid)
            if identity is None:
                identity = self._lookup(device, pid)
            current[pid] = identity
        # Forgetting exited PIDs keeps this bounded and drops their series at the next sample.
        self._identities[device.uuid] = current
        return current

    def _lookup(self, device: Device, pid: int) -> _Identity:
        attribution = self._attribution
        name = attribution.process_name(pid) if attribution else None
        if name is None:
            # NVML can name a process even where this container cannot see host PIDs.
            name = device.read_system(device.driver.process_name, pid)
        container = attribution.container(pid) if attribution else None
        return _Identity(name or "", container or Container())

    def _utilization(self, device: Device) -> dict[int, tuple[float, float, float, float]]:
        """Average utilization per PID over the driver samples since the last read; when the
        driver has no new sample yet (its period can exceed ours), the previous averages."""
        since = self._last_sample_us.get(device.uuid, 0)
        samples = device.read_as((), device.driver.process_utilization, since) or []
        if not samples:
            return self._last_utilization.get(device.uuid, {})
        self._last_sample_us[device.uuid] = max(s.timestamp_us for s in samples)
        by_pid: dict[int, list[ProcessSample]] = defaultdict(list)
        for sample in samples:
            by_pid[sample.pid].append(sample)
        averages = {
            pid: (
                sum(s.sm for s in group) / len(group) / 100,
                sum(s.memory for s in group) / len(group) / 100,
                sum(s.encoder for s in group) / len(group) / 100,
                sum(s.decoder for s in group) / len(group) / 100,
            )
            for pid, group in by_pid.items()
        }
        self._last_utilization[device.uuid] = averages
        return averages

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        processes = sorted(
            running_processes(device, context), key=lambda p: p.info.used_memory or 0, reverse=True
        )
        kept, dropped = processes[: self._limit], len(processes) - self._limit
        out.add(DROPPED, max(0, dropped))
        identities = self._identify(device, [p.info.pid for p in processes])
        utilization = self._utilization(device)
        pods = self._pods.pods() if self._pods else {}
        for process in kept:
            info = process.info
            identity = identities[info.pid]
            pod = _only_pod(pods, device, info)
            labels = (
                str(info.pid),
                identity.name,
                process.type,
                "" if info.gpu_instance is None else str(info.gpu_instance),
                "" if info.compute_instance is None else str(info.compute_instance),
                identity.container.container_id,
                identity.container.pod_uid,
                pod[0],
                pod[1],
                pod[2],
            )
            out.add(PROCESS_MEMORY, info.used_memory, *labels)
            # A process without samples this interval did not use the engines.
            sm, memory, encoder, decoder = utilization.get(info.pid, (0.0, 0.0, 0.0, 0.0))
            out.add(PROCESS_SM, sm, *labels)
            out.add(PROCESS_MEMORY_UTIL, memory, *labels)
            out.add(PROCESS_ENCODER, encoder, *labels)
            out.add(PROCESS_DECODER, decoder, *labels)


def _only_pod(
    pods: Mapping[str, tuple[Pod, ...]], device: Device, info: ProcessInfo
) -> tuple[str, str, str]:
    """The pod the kubelet gave this GPU (or the process's MIG device) to, when exactly one
    holds it; shared GPUs (time-slicing) stay unattributed rather than guessed."""
    holders = pods.get(instance_uuid(device, info) or device.uuid, ())
    if len(holders) != 1:
        return ("", "", "")
    return (holders[0].namespace, holders[0].pod, holders[0].container)
