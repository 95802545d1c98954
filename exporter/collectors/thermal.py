"""GPU temperature and fan speeds (passively cooled boards such as SXM modules have no fans)."""

from __future__ import annotations

from exporter.collectors.base import Collector, Emitter, MetricSpec
from exporter.nvml import TEMPERATURE_GPU, Device

TEMPERATURE = MetricSpec(
    "nvml_temperature_celsius",
    "gauge",
    "GPU die temperature.",
    unit="celsius",
    source="nvmlDeviceGetTemperatureV (nvmlDeviceGetTemperature on old drivers), sensor GPU",
    dcgm="DCGM_FI_DEV_GPU_TEMP",
)
FAN_SPEED = MetricSpec(
    "nvml_fan_speed_ratio",
    "gauge",
    "Fan speed as a fraction of its maximum.",
    labels=("fan",),
    unit="ratio",
    source="nvmlDeviceGetNumFans (once), nvmlDeviceGetFanSpeed_v2 (percent / 100)",
    dcgm="DCGM_FI_DEV_FAN_SPEED (percent)",
)


class ThermalCollector(Collector):
    name = "thermal"
    metrics = (TEMPERATURE, FAN_SPEED)

    def collect(self, device: Device, out: Emitter) -> None:
        drv = device.driver
        celsius = device.read(drv.temperature, TEMPERATURE_GPU)
        if celsius is not None:
            out.add(TEMPERATURE, celsius)
        for fan in range(device.cached(drv.fan_count) or 0):
            percent = device.read(drv.fan_speed, fan)
            if percent is not None:
                out.add(FAN_SPEED, percent / 100, str(fan))
