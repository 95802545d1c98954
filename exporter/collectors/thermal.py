"""Temperatures, the thresholds at which the GPU slows down or shuts off, and fan speeds."""

from __future__ import annotations

from exporter.collectors.base import (
    CallSeries,
    Collector,
    Dcgm,
    Emitter,
    FieldSeries,
    MetricSpec,
    Reader,
)
from exporter.collectors.shared import SampleContext
from exporter.nvml import (
    FI_MEMORY_TEMP,
    TEMPERATURE_GPU,
    THRESHOLD_GPU_MAX,
    THRESHOLD_MEM_MAX,
    THRESHOLD_SHUTDOWN,
    THRESHOLD_SLOWDOWN,
    Device,
)

TEMPERATURE = MetricSpec(
    "nvml_temperature_celsius",
    "gauge",
    "GPU die temperature.",
    unit="celsius",
    source="nvmlDeviceGetTemperatureV (nvmlDeviceGetTemperature on old drivers), sensor GPU",
    dcgm=(Dcgm("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "C"),),
)
MEMORY_TEMPERATURE = MetricSpec(
    "nvml_memory_temperature_celsius",
    "gauge",
    "Device memory (HBM) temperature, where the board has a sensor.",
    unit="celsius",
    source="field NVML_FI_DEV_MEMORY_TEMP",
    dcgm=(Dcgm("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", "C"),),
)
TEMPERATURE_THRESHOLD = MetricSpec(
    "nvml_temperature_threshold_celsius",
    "gauge",
    "Temperature at which the GPU slows down (slowdown), shuts down (shutdown), or the highest "
    "GPU and memory temperatures it is specified to run at (gpu_max, memory_max).",
    labels=("threshold",),
    unit="celsius",
    source="nvmlDeviceGetTemperatureThreshold SHUTDOWN, SLOWDOWN, GPU_MAX, MEM_MAX (read once)",
    dcgm=(
        Dcgm(
            "DCGM_FI_DEV_SLOWDOWN_TEMP",
            "Slowdown temperature (in C).",
            "C",
            match=(("threshold", "slowdown"),),
        ),
        Dcgm(
            "DCGM_FI_DEV_SHUTDOWN_TEMP",
            "Shutdown temperature (in C).",
            "C",
            match=(("threshold", "shutdown"),),
        ),
        Dcgm(
            "DCGM_FI_DEV_GPU_MAX_OP_TEMP",
            "Maximum operating temperature (in C).",
            "C",
            match=(("threshold", "gpu_max"),),
        ),
        Dcgm(
            "DCGM_FI_DEV_MEM_MAX_OP_TEMP",
            "Maximum memory operating temperature (in C).",
            "C",
            match=(("threshold", "memory_max"),),
        ),
    ),
)
FAN_SPEED = MetricSpec(
    "nvml_fan_speed_ratio",
    "gauge",
    "Fan speed as a fraction of its maximum.",
    labels=("fan",),
    unit="ratio",
    source="nvmlDeviceGetNumFans (once), nvmlDeviceGetFanSpeed_v2 (percent / 100)",
    dcgm=(
        Dcgm(
            "DCGM_FI_DEV_FAN_SPEED",
            "Fan speed (in %).",
            "percent",
            100,
            match=(("fan", "0"),),
        ),
    ),
)


def _threshold(threshold: int) -> Reader:
    return lambda device: device.cached(device.driver.temperature_threshold, threshold)


class ThermalCollector(Collector):
    name = "thermal"
    table = (
        CallSeries(TEMPERATURE, lambda d: d.read(d.driver.temperature, TEMPERATURE_GPU)),
        FieldSeries(MEMORY_TEMPERATURE, (FI_MEMORY_TEMP, 0)),
        CallSeries(TEMPERATURE_THRESHOLD, _threshold(THRESHOLD_SHUTDOWN), ("shutdown",)),
        CallSeries(TEMPERATURE_THRESHOLD, _threshold(THRESHOLD_SLOWDOWN), ("slowdown",)),
        CallSeries(TEMPERATURE_THRESHOLD, _threshold(THRESHOLD_GPU_MAX), ("gpu_max",)),
        CallSeries(TEMPERATURE_THRESHOLD, _threshold(THRESHOLD_MEM_MAX), ("memory_max",)),
    )
    metrics = (*(row.spec for row in table), FAN_SPEED)

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        self.collect_table(device, out)
        drv = device.driver
        for fan in range(device.cached(drv.fan_count) or 0):
            percent = device.read(drv.fan_speed, fan)
            out.add(FAN_SPEED, None if percent is None else percent / 100, str(fan))
