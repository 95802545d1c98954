"""Power draw, the limit the driver enforces, and energy since the driver loaded."""

from __future__ import annotations

from exporter.collectors.base import Collector, Emitter, MetricSpec
from exporter.nvml import Device

POWER = MetricSpec(
    "nvml_power_watts",
    "gauge",
    "Power draw of the whole board.",
    unit="watts",
    source="nvmlDeviceGetPowerUsage (mW / 1000)",
    dcgm="DCGM_FI_DEV_POWER_USAGE",
)
POWER_LIMIT = MetricSpec(
    "nvml_power_limit_watts",
    "gauge",
    "Power limit the driver enforces, the lowest of all limits that apply.",
    unit="watts",
    source="nvmlDeviceGetEnforcedPowerLimit (mW / 1000)",
    dcgm="DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
)
ENERGY = MetricSpec(
    "nvml_energy_joules_total",
    "counter",
    "Energy consumed since the driver was last loaded.",
    unit="joules",
    source="nvmlDeviceGetTotalEnergyConsumption (mJ / 1000)",
    dcgm="DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION (mJ)",
)


class PowerCollector(Collector):
    name = "power"
    metrics = (POWER, POWER_LIMIT, ENERGY)

    def collect(self, device: Device, out: Emitter) -> None:
        drv = device.driver
        milliwatts = device.read(drv.power_usage)
        if milliwatts is not None:
            out.add(POWER, milliwatts / 1000)
        limit = device.read(drv.enforced_power_limit)
        if limit is not None:
            out.add(POWER_LIMIT, limit / 1000)
        millijoules = device.read(drv.total_energy)
        if millijoules is not None:
            out.add(ENERGY, millijoules / 1000)
