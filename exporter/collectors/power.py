"""Power draw, the limits that apply, and energy since the driver loaded."""

from __future__ import annotations

from operator import itemgetter

from exporter.collectors.base import CallSeries, Collector, Dcgm, FieldSeries, MetricSpec, part
from exporter.nvml import (
    FI_POWER_AVERAGE,
    FI_POWER_CURRENT_LIMIT,
    FI_POWER_INSTANT,
    FI_TOTAL_ENERGY_CONSUMPTION,
    Device,
)

POWER = MetricSpec(
    "nvml_power_watts",
    "gauge",
    "Power draw of the whole board.",
    unit="watts",
    source="field NVML_FI_DEV_POWER_AVERAGE (1 s average, what nvmlDeviceGetPowerUsage reports "
    "on Ampere and newer), else NVML_FI_DEV_POWER_INSTANT, else nvmlDeviceGetPowerUsage; "
    "mW / 1000",
    dcgm=(Dcgm("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "W"),),
)
POWER_LIMIT = MetricSpec(
    "nvml_power_limit_watts",
    "gauge",
    "Power limit the driver enforces, the lowest of all limits that apply.",
    unit="watts",
    source="field NVML_FI_DEV_POWER_CURRENT_LIMIT (nvmlDeviceGetEnforcedPowerLimit where the "
    "field is unsupported), mW / 1000",
    dcgm=(Dcgm("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "Enforced power limit (in W).", "W"),),
)
POWER_DEFAULT_LIMIT = MetricSpec(
    "nvml_power_default_limit_watts",
    "gauge",
    "Power limit the board ships with.",
    unit="watts",
    source="nvmlDeviceGetPowerManagementDefaultLimit (read once)",
    dcgm=(Dcgm("DCGM_FI_DEV_POWER_MGMT_LIMIT_DEF", "Default power limit (in W).", "W"),),
)
POWER_MIN_LIMIT = MetricSpec(
    "nvml_power_min_limit_watts",
    "gauge",
    "Lowest power limit an administrator can set.",
    unit="watts",
    source="nvmlDeviceGetPowerManagementLimitConstraints [0] (read once)",
    dcgm=(Dcgm("DCGM_FI_DEV_POWER_MGMT_LIMIT_MIN", "Minimum power limit (in W).", "W"),),
)
POWER_MAX_LIMIT = MetricSpec(
    "nvml_power_max_limit_watts",
    "gauge",
    "Highest power limit an administrator can set.",
    unit="watts",
    source="nvmlDeviceGetPowerManagementLimitConstraints [1] (read once)",
    dcgm=(Dcgm("DCGM_FI_DEV_POWER_MGMT_LIMIT_MAX", "Maximum power limit (in W).", "W"),),
)
ENERGY = MetricSpec(
    "nvml_energy_joules_total",
    "counter",
    "Energy consumed since the driver was last loaded.",
    unit="joules",
    source="field NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION (nvmlDeviceGetTotalEnergyConsumption "
    "where the field is unsupported), mJ / 1000, every sampling.slow_fields_interval",
    cadence="Read every {slow}.",
    dcgm=(
        Dcgm(
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "Total energy consumption since boot (in mJ).",
            "mJ",
            1000,
            "counter",
        ),
    ),
)


def _constraints(device: Device) -> tuple[int, int] | None:
    return device.cached(device.driver.power_limit_constraints)


def _energy_call(device: Device) -> float | None:
    return device.read_slowly(device.driver.total_energy)


class PowerCollector(Collector):
    name = "power"
    # The 1 s average field; the instantaneous one only where the GPU lacks it, and the
    # dedicated call only where neither field answered, so each is read at most once per
    # sample. A field that failed with an error is counted once and left missing.
    table = (
        FieldSeries(
            POWER,
            (FI_POWER_AVERAGE, 0),
            divisor=1000,
            alternatives=(FI_POWER_INSTANT,),
            fallback=CallSeries(POWER, lambda d: d.read(d.driver.power_usage), divisor=1000),
        ),
        FieldSeries(
            POWER_LIMIT,
            (FI_POWER_CURRENT_LIMIT, 0),
            divisor=1000,
            fallback=CallSeries(
                POWER_LIMIT, lambda d: d.read(d.driver.enforced_power_limit), divisor=1000
            ),
        ),
        CallSeries(
            POWER_DEFAULT_LIMIT, lambda d: d.cached(d.driver.power_limit_default), divisor=1000
        ),
        CallSeries(POWER_MIN_LIMIT, part(_constraints, itemgetter(0)), divisor=1000),
        CallSeries(POWER_MAX_LIMIT, part(_constraints, itemgetter(1)), divisor=1000),
        FieldSeries(
            ENERGY,
            (FI_TOTAL_ENERGY_CONSUMPTION, 0),
            divisor=1000,
            # Never mixed with the field: an older cached answer would make the counter go back.
            fallback=CallSeries(ENERGY, _energy_call, divisor=1000),
            fallback_only_unsupported=True,
            slow=True,
        ),
    )
