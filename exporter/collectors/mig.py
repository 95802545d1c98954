"""Multi-Instance GPU: each GPU instance / compute instance with its memory and processes.

The whole-GPU metrics stay as they are; these add one series set per instance, labelled with
the instance ids, its profile and its own UUID (the one Kubernetes allocates).
"""

from __future__ import annotations

from collections import Counter

from exporter.collectors.base import Collector, Emitter, MetricSpec
from exporter.collectors.shared import SampleContext, mig_instances, running_processes
from exporter.nvml import Device

MIG_LABELS = ("gpu_instance", "compute_instance", "mig_profile", "mig_uuid")

MIG_INFO = MetricSpec(
    "nvml_mig_info",
    "info",
    "A MIG instance of the GPU; always 1.",
    labels=MIG_LABELS,
    source="nvmlDeviceGetMigDeviceHandleByIndex, GetGpuInstanceId, GetComputeInstanceId, "
    "GetName, GetUUID (re-read every 10 s)",
    dcgm_note="labels GPU_I_ID, GPU_I_PROFILE on dcgm-exporter series",
)
MIG_MEMORY_TOTAL = MetricSpec(
    "nvml_mig_memory_total_bytes",
    "gauge",
    "Device memory of the MIG instance.",
    labels=MIG_LABELS,
    unit="bytes",
    source="nvmlDeviceGetMemoryInfo_v2 on the MIG device handle .total",
)
MIG_MEMORY_USED = MetricSpec(
    "nvml_mig_memory_used_bytes",
    "gauge",
    "Device memory allocated in the MIG instance.",
    labels=MIG_LABELS,
    unit="bytes",
    source="nvmlDeviceGetMemoryInfo_v2 on the MIG device handle .used",
    dcgm_note="DCGM_FI_DEV_FB_USED with GPU_I_ID (MiB)",
)
MIG_MEMORY_FREE = MetricSpec(
    "nvml_mig_memory_free_bytes",
    "gauge",
    "Device memory free in the MIG instance.",
    labels=MIG_LABELS,
    unit="bytes",
    source="nvmlDeviceGetMemoryInfo_v2 on the MIG device handle .free",
)
MIG_PROCESSES = MetricSpec(
    "nvml_mig_processes",
    "gauge",
    "Processes running in the MIG instance.",
    labels=MIG_LABELS,
    source="running processes of the GPU, by their gpuInstanceId / computeInstanceId",
)


class MigCollector(Collector):
    name = "mig"
    metrics = (MIG_INFO, MIG_MEMORY_TOTAL, MIG_MEMORY_USED, MIG_MEMORY_FREE, MIG_PROCESSES)

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        instances = mig_instances(device)
        if not instances:
            return
        per_instance = Counter(
            (p.info.gpu_instance, p.info.compute_instance)
            for p in running_processes(device, context)
        )
        for instance in instances:
            labels = (
                str(instance.gpu_instance),
                str(instance.compute_instance),
                instance.profile,
                instance.uuid,
            )
            out.add(MIG_INFO, 1, *labels)
            memory = device.read_on(instance.handle, device.driver.memory)
            if memory is not None:
                out.add(MIG_MEMORY_TOTAL, memory.total, *labels)
                out.add(MIG_MEMORY_USED, memory.used, *labels)
                out.add(MIG_MEMORY_FREE, memory.free, *labels)
            count = per_instance[(instance.gpu_instance, instance.compute_instance)]
            out.add(MIG_PROCESSES, count, *labels)
