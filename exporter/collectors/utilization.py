"""How busy the GPU and its memory controller are: gauges, and counters that miss no burst."""

from __future__ import annotations

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.collectors.busy import BUFFER_CADENCE, BUFFER_READS, BusyTracker
from exporter.collectors.shared import SampleContext
from exporter.nvml import GPU_UTILIZATION_SAMPLES, MEMORY_UTILIZATION_SAMPLES, Device

_INSTANT = "nvmlDeviceGetUtilizationRates .{} (the driver's last sample period, 1/6 s to 1 s); "
_BUFFER = "the average of nvmlDeviceGetSamples ({}_UTILIZATION_SAMPLES) where that is unsupported"
_COUNTER = (
    "sum of nvmlDeviceGetSamples ({}_UTILIZATION_SAMPLES) x sample period, "
    + BUFFER_READS
    + " (instantaneous x interval where the buffer is unsupported)"
)

GPU_UTILIZATION = MetricSpec(
    "nvml_gpu_utilization_ratio",
    "gauge",
    "Fraction of the driver's last sample period (1/6 s to 1 s) in which a kernel was running, "
    "as nvidia-smi shows it; rate(nvml_gpu_busy_seconds_total[1m]) gives the exact average.",
    unit="ratio",
    source=_INSTANT.format("gpu") + _BUFFER.format("GPU"),
    dcgm=(Dcgm("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "percent", 100),),
)
GPU_BUSY = MetricSpec(
    "nvml_gpu_busy_seconds_total",
    "counter",
    "Time a kernel was running; rate() over 30 s or more gives the exact average utilization.",
    unit="seconds",
    source=_COUNTER.format("GPU"),
    cadence=BUFFER_CADENCE,
)
MEMORY_CONTROLLER_UTILIZATION = MetricSpec(
    "nvml_memory_controller_utilization_ratio",
    "gauge",
    "Fraction of the driver's last sample period in which device memory was read or written.",
    unit="ratio",
    source=_INSTANT.format("memory") + _BUFFER.format("MEMORY"),
    dcgm=(Dcgm("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", "percent", 100),),
)
MEMORY_CONTROLLER_BUSY = MetricSpec(
    "nvml_memory_controller_busy_seconds_total",
    "counter",
    "Time device memory was being read or written; rate() gives the average utilization.",
    unit="seconds",
    source=_COUNTER.format("MEMORY"),
    cadence=BUFFER_CADENCE,
)


class UtilizationCollector(Collector):
    name = "utilization"
    metrics = (GPU_UTILIZATION, GPU_BUSY, MEMORY_CONTROLLER_UTILIZATION, MEMORY_CONTROLLER_BUSY)

    def __init__(self) -> None:
        self._gpu = BusyTracker(GPU_UTILIZATION_SAMPLES)
        self._memory = BusyTracker(MEMORY_UTILIZATION_SAMPLES)

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        now = device.clock()
        rates = device.read(device.driver.utilization)
        for tracker, percent, gauge, counter in (
            (self._gpu, None if rates is None else rates.gpu, GPU_UTILIZATION, GPU_BUSY),
            (
                self._memory,
                None if rates is None else rates.memory,
                MEMORY_CONTROLLER_UTILIZATION,
                MEMORY_CONTROLLER_BUSY,
            ),
        ):
            ratio, busy = tracker.update(device, percent, now)
            if ratio is not None:
                out.add(gauge, ratio)
                out.add(counter, busy)
