"""Device (framebuffer) memory and the BAR1 aperture, in bytes."""

from __future__ import annotations

from operator import attrgetter

from exporter.collectors.base import CallSeries, Collector, Dcgm, Emitter, MetricSpec, part
from exporter.collectors.shared import SampleContext
from exporter.nvml import Bar1Memory, Device

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
# BAR1 mappings change when a process maps host-visible memory, mostly as it starts (GPUDirect
# RDMA registration, say), not from one second to the next: a driver call a second is not worth it.
BAR1_MAX_AGE = 10.0

BAR1_TOTAL = MetricSpec(
    "nvml_bar1_memory_total_bytes",
    "gauge",
    "Size of the BAR1 aperture through which the host maps device memory.",
    unit="bytes",
    source="nvmlDeviceGetBAR1MemoryInfo .bar1Total (every 10 s)",
    cadence="Read every 10s.",
    dcgm=(Dcgm("DCGM_FI_DEV_BAR1_TOTAL", "Total BAR1 of the GPU (in MiB).", "MiB", 1 / MIB),),
)
BAR1_USED = MetricSpec(
    "nvml_bar1_memory_used_bytes",
    "gauge",
    "BAR1 aperture in use, as of a read at most 10 s old.",
    unit="bytes",
    source="nvmlDeviceGetBAR1MemoryInfo .bar1Used (every 10 s)",
    cadence="Read every 10s.",
    dcgm=(Dcgm("DCGM_FI_DEV_BAR1_USED", "Used BAR1 of the GPU (in MiB).", "MiB", 1 / MIB),),
)
BAR1_FREE = MetricSpec(
    "nvml_bar1_memory_free_bytes",
    "gauge",
    "BAR1 aperture free, as of a read at most 10 s old.",
    unit="bytes",
    source="nvmlDeviceGetBAR1MemoryInfo .bar1Free (every 10 s)",
    cadence="Read every 10s.",
    dcgm=(Dcgm("DCGM_FI_DEV_BAR1_FREE", "Free BAR1 of the GPU (in MiB).", "MiB", 1 / MIB),),
)


def _bar1(device: Device) -> Bar1Memory | None:
    return device.recent(BAR1_MAX_AGE, device.driver.bar1_memory)


class MemoryCollector(Collector):
    name = "memory"
    metrics = (MEMORY_TOTAL, MEMORY_USED, MEMORY_FREE, MEMORY_RESERVED)
    table = (
        CallSeries(BAR1_TOTAL, part(_bar1, attrgetter("total"))),
        CallSeries(BAR1_USED, part(_bar1, attrgetter("used"))),
        CallSeries(BAR1_FREE, part(_bar1, attrgetter("free"))),
    )

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        info = device.read(device.driver.memory)
        if info is not None:
            out.add(MEMORY_TOTAL, info.total)
            out.add(MEMORY_USED, info.used)
            out.add(MEMORY_FREE, info.free)
            out.add(MEMORY_RESERVED, info.reserved)
        self.collect_table(device, out)
