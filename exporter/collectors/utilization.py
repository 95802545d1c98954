"""How busy the GPU and its memory controller were over the driver's last sample period."""

from __future__ import annotations

from exporter.collectors.base import Collector, Emitter, MetricSpec
from exporter.nvml import Device

GPU_UTILIZATION = MetricSpec(
    "nvml_gpu_utilization_ratio",
    "gauge",
    "Fraction of the driver's last sample period (1/6 s to 1 s) in which a kernel was running.",
    unit="ratio",
    source="nvmlDeviceGetUtilizationRates .gpu (percent / 100)",
    dcgm="DCGM_FI_DEV_GPU_UTIL",
)
MEMORY_CONTROLLER_UTILIZATION = MetricSpec(
    "nvml_memory_controller_utilization_ratio",
    "gauge",
    "Fraction of the driver's last sample period in which device memory was read or written.",
    unit="ratio",
    source="nvmlDeviceGetUtilizationRates .memory (percent / 100)",
    dcgm="DCGM_FI_DEV_MEM_COPY_UTIL",
)


class UtilizationCollector(Collector):
    name = "utilization"
    metrics = (GPU_UTILIZATION, MEMORY_CONTROLLER_UTILIZATION)

    def collect(self, device: Device, out: Emitter) -> None:
        rates = device.read(device.driver.utilization)
        if rates is not None:
            out.add(GPU_UTILIZATION, rates.gpu / 100)
            out.add(MEMORY_CONTROLLER_UTILIZATION, rates.memory / 100)
