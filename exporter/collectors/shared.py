"""Reads several collectors need, done once per GPU and sample (or less often)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from exporter.nvml import Device, MigInstance, ProcessInfo

# MIG instances change only when an administrator repartitions the GPU; MIG mode only with a
# GPU reset, so it is re-read as seldom as the other modes (and costs ~160 us on an H200).
MIG_MAX_AGE = 10.0
MIG_MODE_MAX_AGE = 30.0

# device.memo key: True when the gpm collector, in this sample, measured every NVDEC engine of
# the whole GPU at exactly 0 over the interval since its previous sample.
GPM_NVDEC_IDLE = "gpm_nvdec_idle"


@dataclass(frozen=True)
class GpuProcess:
    info: ProcessInfo
    type: str  # compute, graphics, or compute+graphics


def running_processes(device: Device) -> list[GpuProcess]:
    """Compute and graphics processes, read once per sample however many collectors ask."""
    cached = device.memo.get("processes")
    if isinstance(cached, list):
        return cached
    drv = device.driver
    kinds: dict[int, list[str]] = defaultdict(list)
    infos: dict[int, ProcessInfo] = {}
    for kind, listing in (
        ("compute", device.read(drv.compute_processes)),
        ("graphics", device.read(drv.graphics_processes)),
    ):
        for info in listing or ():
            kinds[info.pid].append(kind)
            infos.setdefault(info.pid, info)
    processes = [GpuProcess(infos[pid], "+".join(kinds[pid])) for pid in infos]
    device.memo["processes"] = processes
    return processes


def mig_instances(device: Device) -> list[MigInstance]:
    """The GPU's MIG instances; empty unless MIG mode is on. Re-read every few seconds, so a
    repartitioned GPU is picked up without a restart."""
    mode = device.recent(MIG_MODE_MAX_AGE, device.driver.mig_mode)
    if mode is None or mode[0] != 1:
        return []
    return device.recent(MIG_MAX_AGE, device.driver.mig_instances) or []


def instance_uuid(device: Device, info: ProcessInfo) -> str | None:
    """The UUID of the MIG instance a process runs in, if it runs in one."""
    if info.gpu_instance is None:
        return None
    for instance in mig_instances(device):
        if (instance.gpu_instance, instance.compute_instance) == (
            info.gpu_instance,
            info.compute_instance,
        ):
            return instance.uuid
    return None


def gpm_nvdec_idle(device: Device) -> bool:
    """Whether GPM saw the video decoders idle over this sample's interval. False when it could
    not tell: GPM unsupported, disabled, not yet primed, or failed this time."""
    return device.memo.get(GPM_NVDEC_IDLE) is True
