"""Clock events (throttling): why the clocks are below maximum now, and for how long so far."""

from __future__ import annotations

from exporter.collectors.base import Collector, Dcgm, Emitter, FieldSeries, MetricSpec
from exporter.collectors.shared import SampleContext
from exporter.nvml import (
    FI_CLOCKS_EVENT_HW_POWER_BRAKE_SLOWDOWN,
    FI_CLOCKS_EVENT_HW_THERM_SLOWDOWN,
    FI_CLOCKS_EVENT_SW_THERM_SLOWDOWN,
    FI_PERF_POLICY_BOARD_LIMIT,
    FI_PERF_POLICY_LOW_UTILIZATION,
    FI_PERF_POLICY_POWER,
    FI_PERF_POLICY_RELIABILITY,
    FI_PERF_POLICY_SYNC_BOOST,
    FI_PERF_POLICY_THERMAL,
    Device,
)

# nvmlClocksEventReason* bits.
REASONS = (
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
)

# Violation-time fields, in nanoseconds since the driver loaded, and whether the driver answers
# the field slowly (docs/performance.md).
DURATION_FIELDS = (
    ("sw_power_cap", FI_PERF_POLICY_POWER, False),
    ("thermal", FI_PERF_POLICY_THERMAL, True),
    ("sync_boost", FI_PERF_POLICY_SYNC_BOOST, False),
    ("board_limit", FI_PERF_POLICY_BOARD_LIMIT, False),
    ("low_utilization", FI_PERF_POLICY_LOW_UTILIZATION, False),
    ("reliability", FI_PERF_POLICY_RELIABILITY, False),
    ("sw_thermal_slowdown", FI_CLOCKS_EVENT_SW_THERM_SLOWDOWN, False),
    ("hw_thermal_slowdown", FI_CLOCKS_EVENT_HW_THERM_SLOWDOWN, True),
    ("hw_power_brake_slowdown", FI_CLOCKS_EVENT_HW_POWER_BRAKE_SLOWDOWN, True),
)

EVENT_ACTIVE = MetricSpec(
    "nvml_clock_event_active",
    "gauge",
    "1 while this reason holds the clocks below their maximum: "
    + ", ".join(name for name, _ in REASONS)
    + ". Idle is benign; sw_power_cap and the slowdowns cost performance.",
    labels=("reason",),
    source="nvmlDeviceGetCurrentClocksEventReasons (bit mask)",
    dcgm_note="DCGM_FI_DEV_CLOCK_THROTTLE_REASONS is the raw bit mask",
)


def _violation(name: str, help_: str, reason: str) -> Dcgm:
    return Dcgm(name, help_, "ns", 1e9, "counter", match=(("reason", reason),))


EVENT_SECONDS = MetricSpec(
    "nvml_clock_event_seconds_total",
    "counter",
    "Time the clocks were held down for this reason since the driver loaded.",
    labels=("reason",),
    unit="seconds",
    source="fields NVML_FI_DEV_PERF_POLICY_* and NVML_FI_DEV_CLOCKS_EVENT_REASON_*_DURATION "
    "(ns / 1e9); thermal, hw_thermal_slowdown and hw_power_brake_slowdown every "
    "sampling.slow_fields_interval",
    cadence="Sampled every {interval}; thermal, hw_thermal_slowdown and "
    "hw_power_brake_slowdown every {slow}.",
    dcgm=(
        _violation(
            "DCGM_FI_DEV_POWER_VIOLATION",
            "Throttling duration due to power constraints (in ns).",
            "sw_power_cap",
        ),
        _violation(
            "DCGM_FI_DEV_THERMAL_VIOLATION",
            "Throttling duration due to thermal constraints (in ns).",
            "thermal",
        ),
        _violation(
            "DCGM_FI_DEV_SYNC_BOOST_VIOLATION",
            "Throttling duration due to sync-boost constraints (in ns).",
            "sync_boost",
        ),
        _violation(
            "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION",
            "Throttling duration due to board limit constraints (in ns).",
            "board_limit",
        ),
        _violation(
            "DCGM_FI_DEV_LOW_UTIL_VIOLATION",
            "Throttling duration due to low utilization (in ns).",
            "low_utilization",
        ),
        _violation(
            "DCGM_FI_DEV_RELIABILITY_VIOLATION",
            "Throttling duration due to reliability constraints (in ns).",
            "reliability",
        ),
    ),
)


class ClockEventsCollector(Collector):
    name = "clock_events"
    metrics = (EVENT_ACTIVE,)
    table = tuple(
        FieldSeries(EVENT_SECONDS, (field_id, 0), (reason,), divisor=1e9, slow=slow)
        for reason, field_id, slow in DURATION_FIELDS
    )

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        mask = device.read(device.driver.clocks_event_reasons)
        if mask is not None:
            for reason, bit in REASONS:
                out.add(EVENT_ACTIVE, 1 if mask & bit else 0, reason)
        self.collect_table(device, out)
