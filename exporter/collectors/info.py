"""Static identity of each GPU, for joins: `* on(uuid) group_left(name) nvml_gpu_info`."""

from __future__ import annotations

from exporter.collectors.base import Collector, Emitter, MetricSpec
from exporter.collectors.shared import SampleContext
from exporter.nvml import Device

GPU_INFO = MetricSpec(
    "nvml_gpu_info",
    "info",
    "Static facts about a GPU; always 1. Join on uuid to label other series.",
    labels=(
        "name",
        "pci_bus_id",
        "serial",
        "vbios_version",
        "architecture",
        "device",
        "driver_version",
        "cuda_version",
    ),
    source="nvmlDeviceGetName, GetPciInfo_v3, GetSerial, GetVbiosVersion, GetArchitecture, "
    "GetMinorNumber; nvmlSystemGetDriverVersion, GetCudaDriverVersion (read once)",
    dcgm_note="labels modelName, pci_bus_id, device, DCGM_FI_DRIVER_VERSION on every series",
)


class InfoCollector(Collector):
    name = "info"
    reads_nvml = False
    metrics = (GPU_INFO,)

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        ident = device.identity
        out.add(
            GPU_INFO,
            1,
            ident.name,
            ident.pci_bus_id,
            ident.serial,
            ident.vbios_version,
            ident.architecture,
            device_node(device),
            device.system.driver_version,
            device.system.cuda_driver_version,
        )


def device_node(device: Device) -> str:
    minor = device.identity.minor_number
    return f"nvidia{minor}" if minor is not None else ""
