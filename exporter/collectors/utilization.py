"""How busy the GPU and its memory controller were, averaged over the whole interval."""

from __future__ import annotations

import time

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.collectors.busy import BusyTracker
from exporter.nvml import GPU_UTILIZATION_SAMPLES, MEMORY_UTILIZATION_SAMPLES, Device

_SAMPLES = "nvmlDeviceGetSamples ({}_UTILIZATION_SAMPLES) averaged over the interval; "
_FALLBACK = "nvmlDeviceGetUtilizationRates .{} where samples are unsupported"

GPU_UTILIZATION = MetricSpec(
    "nvml_gpu_utilization_ratio",
    "gauge",
    "Fraction of the last sampling interval in which a kernel was running.",
    unit="ratio",
    source=_SAMPLES.format("GPU") + _FALLBACK.format("gpu"),
    dcgm=(Dcgm("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "percent", 100),),
)
GPU_BUSY = MetricSpec(
    "nvml_gpu_busy_seconds_total",
    "counter",
    "Time a kernel was running; rate() gives the exact average utilization over any window.",
    unit="seconds",
    source="sum of GPU utilization samples x sample period (instantaneous x interval fallback)",
)
MEMORY_CONTROLLER_UTILIZATION = MetricSpec(
    "nvml_memory_controller_utilization_ratio",
    "gauge",
    "Fraction of the last sampling interval in which device memory was read or written.",
    unit="ratio",
    source=_SAMPLES.format("MEMORY") + _FALLBACK.format("memory"),
    dcgm=(Dcgm("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", "percent", 100),),
)
MEMORY_CONTROLLER_BUSY = MetricSpec(
    "nvml_memory_controller_busy_seconds_total",
    "counter",
    "Time device memory was being read or written; rate() gives the average utilization.",
    unit="seconds",
    source="sum of memory utilization samples x sample period",
)


class UtilizationCollector(Collector):
    name = "utilization"
    metrics = (GPU_UTILIZATION, GPU_BUSY, MEMORY_CONTROLLER_UTILIZATION, MEMORY_CONTROLLER_BUSY)

    def __init__(self) -> None:
        self._gpu = BusyTracker(GPU_UTILIZATION_SAMPLES)
        self._memory = BusyTracker(MEMORY_UTILIZATION_SAMPLES)

    def collect(self, device: Device, out: Emitter) -> None:
        now = time.monotonic()
        gpu_samples = self._gpu.samples(device)
        memory_samples = self._memory.samples(device)
        rates = None
        if gpu_samples is None or memory_samples is None:
            rates = device.read(device.driver.utilization)
        ratio, busy = self._gpu.update(
            device, gpu_samples, lambda: rates.gpu if rates else None, now
        )
        if ratio is not None:
            out.add(GPU_UTILIZATION, ratio)
            out.add(GPU_BUSY, busy)
        ratio, busy = self._memory.update(
            device, memory_samples, lambda: rates.memory if rates else None, now
        )
        if ratio is not None:
            out.add(MEMORY_CONTROLLER_UTILIZATION, ratio)
            out.add(MEMORY_CONTROLLER_BUSY, busy)
