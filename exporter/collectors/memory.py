"""Device (framebuffer) memory, in bytes."""

from __future__ import annotations

from exporter.collectors.base import Collector, Emitter, MetricSpec
from exporter.nvml import Device

_SOURCE = "nvmlDeviceGetMemoryInfo_v2 (v1 on old drivers)"

MEMORY_TOTAL = MetricSpec(
    "nvml_memory_total_bytes",
    "gauge",
    "Total device memory.",
    unit="bytes",
    source=f"{_SOURCE} .total",
    dcgm="DCGM_FI_DEV_FB_TOTAL (MiB)",
)
MEMORY_USED = MetricSpec(
    "nvml_memory_used_bytes",
    "gauge",
    "Device memory allocated by processes.",
    unit="bytes",
    source=f"{_SOURCE} .used",
    dcgm="DCGM_FI_DEV_FB_USED (MiB)",
)
MEMORY_FREE = MetricSpec(
    "nvml_memory_free_bytes",
    "gauge",
    "Device memory available for allocation.",
    unit="bytes",
    source=f"{_SOURCE} .free",
    dcgm="DCGM_FI_DEV_FB_FREE (MiB)",
)
MEMORY_RESERVED = MetricSpec(
    "nvml_memory_reserved_bytes",
    "gauge",
    "Device memory reserved by the driver and firmware.",
    unit="bytes",
    source="nvmlDeviceGetMemoryInfo_v2 .reserved",
    dcgm="DCGM_FI_DEV_FB_RESERVED (MiB)",
)


class MemoryCollector(Collector):
    name = "memory"
    metrics = (MEMORY_TOTAL, MEMORY_USED, MEMORY_FREE, MEMORY_RESERVED)

    def collect(self, device: Device, out: Emitter) -> None:
        info = device.read(device.driver.memory)
        if info is None:
            return
        out.add(MEMORY_TOTAL, info.total)
        out.add(MEMORY_USED, info.used)
        out.add(MEMORY_FREE, info.free)
        if info.reserved is not None:
            out.add(MEMORY_RESERVED, info.reserved)
