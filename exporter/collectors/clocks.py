"""Current clocks and the performance state."""

from __future__ import annotations

from exporter.collectors.base import CallSeries, Collector, Dcgm, MetricSpec, Reader
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


def _clock(clock_type: int) -> Reader:
    return lambda device: device.read(device.driver.clock, clock_type)


def _performance_state(device: Device) -> float | None:
    pstate = device.read(device.driver.performance_state)
    return None if pstate == PSTATE_UNKNOWN else pstate


class ClocksCollector(Collector):
    name = "clocks"
    table = (
        CallSeries(CLOCK, _clock(CLOCK_GRAPHICS), ("graphics",), scale=1_000_000),
        CallSeries(CLOCK, _clock(CLOCK_SM), ("sm",), scale=1_000_000),
        CallSeries(CLOCK, _clock(CLOCK_MEM), ("memory",), scale=1_000_000),
        CallSeries(CLOCK, _clock(CLOCK_VIDEO), ("video",), scale=1_000_000),
        CallSeries(PERFORMANCE_STATE, _performance_state),
    )
