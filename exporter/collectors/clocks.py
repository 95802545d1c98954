"""Current clocks and the performance state."""

from __future__ import annotations

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.nvml import CLOCK_GRAPHICS, CLOCK_MEM, CLOCK_SM, CLOCK_VIDEO, PSTATE_UNKNOWN, Device

CLOCK = MetricSpec(
    "nvml_clock_hertz",
    "gauge",
    "Current clock frequency of a clock domain.",
    labels=("clock",),
    unit="hertz",
    source="nvmlDeviceGetClockInfo (MHz * 1e6) for graphics, sm, memory, video",
    dcgm=(
        Dcgm(
            "DCGM_FI_DEV_SM_CLOCK",
            "SM clock frequency (in MHz).",
            "MHz",
            1e-6,
            match=(("clock", "sm"),),
        ),
        Dcgm(
            "DCGM_FI_DEV_MEM_CLOCK",
            "Memory clock frequency (in MHz).",
            "MHz",
            1e-6,
            match=(("clock", "memory"),),
        ),
        Dcgm(
            "DCGM_FI_DEV_VIDEO_CLOCK",
            "Video encoder/decoder clock (in MHz).",
            "MHz",
            1e-6,
            match=(("clock", "video"),),
        ),
    ),
)
PERFORMANCE_STATE = MetricSpec(
    "nvml_performance_state",
    "gauge",
    "Performance state: 0 (P0, maximum performance) to 15 (P15, minimum).",
    source="nvmlDeviceGetPerformanceState",
    dcgm=(Dcgm("DCGM_FI_DEV_PSTATE", "Performance state (P-State) 0-15. 0=highest"),),
)

_DOMAINS = (
    ("graphics", CLOCK_GRAPHICS),
    ("sm", CLOCK_SM),
    ("memory", CLOCK_MEM),
    ("video", CLOCK_VIDEO),
)


class ClocksCollector(Collector):
    name = "clocks"
    metrics = (CLOCK, PERFORMANCE_STATE)

    def collect(self, device: Device, out: Emitter) -> None:
        drv = device.driver
        for label, clock_type in _DOMAINS:
            mhz = device.read(drv.clock, clock_type)
            if mhz is not None:
                out.add(CLOCK, mhz * 1_000_000, label)
        pstate = device.read(drv.performance_state)
        if pstate is not None and pstate != PSTATE_UNKNOWN:
            out.add(PERFORMANCE_STATE, pstate)
