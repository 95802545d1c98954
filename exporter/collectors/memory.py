"""Device (framebuffer) memory and the BAR1 aperture, in bytes."""

from __future__ import annotations

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.nvml import Device

_SOURCE = "nvmlDeviceGetMemoryInfo_v2 (v1 on old drivers)"
MIB = 1024 * 1024


def _fb(name: str, what: str) -> tuple[Dcgm, ...]:
    return (Dcgm(name, f"Framebuffer memory {what} (in MiB).", "MiB", 1 / MIB),)


MEMORY_TOTAL = MetricSpec(
    "nvml_memory_total_bytes",
    "gauge",
    "Total device memory.",
    unit="bytes",
    source=f"{_SOURCE} .total",
    dcgm=_fb("DCGM_FI_DEV_FB_TOTAL", "total"),
)
MEMORY_USED = MetricSpec(
    "nvml_memory_used_bytes",
    "gauge",
    "Device memory allocated by processes.",
    unit="bytes",
    source=f"{_SOURCE} .used",
    dcgm=_fb("DCGM_FI_DEV_FB_USED", "used"),
)
MEMORY_FREE = MetricSpec(
    "nvml_memory_free_bytes",
    "gauge",
    "Device memory available for allocation.",
    unit="bytes",
    source=f"{_SOURCE} .free",
    dcgm=_fb("DCGM_FI_DEV_FB_FREE", "free"),
)
MEMORY_RESERVED = MetricSpec(
    "nvml_memory_reserved_bytes",
    "gauge",
    "Device memory reserved by the driver and firmware.",
    unit="bytes",
    source="nvmlDeviceGetMemoryInfo_v2 .reserved",
    dcgm=_fb("DCGM_FI_DEV_FB_RESERVED", "reserved"),
)
BAR1_TOTAL = MetricSpec(
    "nvml_bar1_memory_total_bytes",
    "gauge",
    "Size of the BAR1 aperture through which the host maps device memory.",
    unit="bytes",
    source="nvmlDeviceGetBAR1MemoryInfo .bar1Total",
    dcgm=(Dcgm("DCGM_FI_DEV_BAR1_TOTAL", "Total BAR1 of the GPU (in MiB).", "MiB", 1 / MIB),),
)
BAR1_USED = MetricSpec(
    "nvml_bar1_memory_used_bytes",
    "gauge",
    "BAR1 aperture in use.",
    unit="bytes",
    source="nvmlDeviceGetBAR1MemoryInfo .bar1Used",
    dcgm=(Dcgm("DCGM_FI_DEV_BAR1_USED", "Used BAR1 of the GPU (in MiB).", "MiB", 1 / MIB),),
)
BAR1_FREE = MetricSpec(
    "nvml_bar1_memory_free_bytes",
    "gauge",
    "BAR1 aperture free.",
    unit="bytes",
    source="nvmlDeviceGetBAR1MemoryInfo .bar1Free",
    dcgm=(Dcgm("DCGM_FI_DEV_BAR1_FREE", "Free BAR1 of the GPU (in MiB).", "MiB", 1 / MIB),),
)


class MemoryCollector(Collector):
    name = "memory"
    metrics = (
        MEMORY_TOTAL,
        MEMORY_USED,
        MEMORY_FREE,
        MEMORY_RESERVED,
        BAR1_TOTAL,
        BAR1_USED,
        BAR1_FREE,
    )

    def collect(self, device: Device, out: Emitter) -> None:
        info = device.read(device.driver.memory)
        if info is not None:
            out.add(MEMORY_TOTAL, info.total)
            out.add(MEMORY_USED, info.used)
            out.add(MEMORY_FREE, info.free)
            if info.reserved is not None:
                out.add(MEMORY_RESERVED, info.reserved)
        bar1 = device.read(device.driver.bar1_memory)
        if bar1 is not None:
            out.add(BAR1_TOTAL, bar1.total)
            out.add(BAR1_USED, bar1.used)
            out.add(BAR1_FREE, bar1.free)
