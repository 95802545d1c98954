"""Power draw, the limits that apply, and energy since the driver loaded."""

from __future__ import annotations

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.nvml import (
    FI_POWER_AVERAGE,
    FI_POWER_CURRENT_LIMIT,
    FI_POWER_INSTANT,
    FI_TOTAL_ENERGY_CONSUMPTION,
    Device,
    FieldRequest,
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


class PowerCollector(Collector):
    name = "power"
    metrics = (POWER, POWER_LIMIT, POWER_DEFAULT_LIMIT, POWER_MIN_LIMIT, POWER_MAX_LIMIT, ENERGY)

    def fields(self, device: Device) -> tuple[FieldRequest, ...]:
        # The instantaneous reading only where the GPU lacks the 1 s average.
        power = FI_POWER_INSTANT if device.field_absent(FI_POWER_AVERAGE) else FI_POWER_AVERAGE
        return ((FI_TOTAL_ENERGY_CONSUMPTION, 0), (power, 0), (FI_POWER_CURRENT_LIMIT, 0))

    def collect(self, device: Device, out: Emitter) -> None:
        drv = device.driver
        # Each from the sampler's one field-values call; the dedicated call only where the
        # field gave nothing (unsupported, or not asked for yet), so at most once per sample.
        # An entry that failed with an error is counted once, as any failed read, and the
        # value is missing for this sample rather than asked for twice.
        milliwatts = device.field(FI_POWER_AVERAGE)
        if milliwatts is None and not device.field_failed(FI_POWER_AVERAGE):
            milliwatts = device.field(FI_POWER_INSTANT)
            if milliwatts is None and not device.field_failed(FI_POWER_INSTANT):
                milliwatts = device.read(drv.power_usage)
        if milliwatts is not None:
            out.add(POWER, milliwatts / 1000)
        limit = device.field(FI_POWER_CURRENT_LIMIT)
        if limit is None and not device.field_failed(FI_POWER_CURRENT_LIMIT):
            limit = device.read(drv.enforced_power_limit)
        if limit is not None:
            out.add(POWER_LIMIT, limit / 1000)
        default = device.cached(drv.power_limit_default)
        if default is not None:
            out.add(POWER_DEFAULT_LIMIT, default / 1000)
        constraints = device.cached(drv.power_limit_constraints)
        if constraints is not None:
            out.add(POWER_MIN_LIMIT, constraints[0] / 1000)
            out.add(POWER_MAX_LIMIT, constraints[1] / 1000)
        millijoules = device.field(FI_TOTAL_ENERGY_CONSUMPTION)
        if millijoules is None and device.field_absent(FI_TOTAL_ENERGY_CONSUMPTION):
            # Only where the field is unsupported, never mixed with it (an older cached
            # answer would make the counter go back); as slow as the field would be.
            millijoules = device.recent(device.slow_fields_interval, drv.total_energy)
        if millijoules is not None:
            out.add(ENERGY, millijoules / 1000)
