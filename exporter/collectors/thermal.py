"""Temperatures, the thresholds at which the GPU slows down or shuts off, and fan speeds."""

from __future__ import annotations

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.nvml import (
    FI_MEMORY_TEMP,
    TEMPERATURE_GPU,
    THRESHOLD_GPU_MAX,
    THRESHOLD_MEM_MAX,
    THRESHOLD_SHUTDOWN,
    THRESHOLD_SLOWDOWN,
    Device,
    FieldRequest,
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

_THRESHOLDS = (
    ("shutdown", THRESHOLD_SHUTDOWN),
    ("slowdown", THRESHOLD_SLOWDOWN),
    ("gpu_max", THRESHOLD_GPU_MAX),
    ("memory_max", THRESHOLD_MEM_MAX),
)


class ThermalCollector(Collector):
    name = "thermal"
    metrics = (TEMPERATURE, MEMORY_TEMPERATURE, TEMPERATURE_THRESHOLD, FAN_SPEED)

    def fields(self, device: Device) -> tuple[FieldRequest, ...]:
        return ((FI_MEMORY_TEMP, 0),)

    def collect(self, device: Device, out: Emitter) -> None:
        drv = device.driver
        celsius = device.read(drv.temperature, TEMPERATURE_GPU)
        if celsius is not None:
            out.add(TEMPERATURE, celsius)
        memory = device.field(FI_MEMORY_TEMP)
        if memory is not None:
            out.add(MEMORY_TEMPERATURE, memory)
        for label, threshold in _THRESHOLDS:
            limit = device.cached(drv.temperature_threshold, threshold)
            if limit is not None:
                out.add(TEMPERATURE_THRESHOLD, limit, label)
        for fan in range(device.cached(drv.fan_count) or 0):
            percent = device.read(drv.fan_speed, fan)
            if percent is not None:
                out.add(FAN_SPEED, percent / 100, str(fan))
