"""Reads several collectors need, done once per GPU and sample (or less often)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from exporter.nvml import Device, MigInstance, ProcessInfo

# MIG instances change only when an administrator repartitions the GPU; MIG mode only with a
# GPU reset, so it is re-read as seldom as the other modes (it is not a cheap call).
MIG_MAX_AGE = 10.0
MIG_MODE_MAX_AGE = 30.0


@dataclass(frozen=True)
class GpuProcess:
    info: ProcessInfo
    type: str  # compute, graphics, or compute+graphics


class SampleContext:
    """What the collectors of one GPU share within one sample; each sample starts a new one.

    A collector that reads what another leaves here names that collector in its `after`, so
    the registry runs them in that order."""

    __slots__ = ("gpm_nvdec_idle", "processes")

    def __init__(self) -> None:
        # Read once by the first collector that asks (running_processes).
        self.processes: list[GpuProcess] | None = None
        # Set by the gpm collector when it measured every NVDEC engine of the whole GPU at
        # exactly 0 over the interval since its previous sample.
        self.gpm_nvdec_idle = False


def running_processes(device: Device, context: SampleContext) -> list[GpuProcess]:
    """Compute and graphics processes, read once per sample however many collectors ask."""
    if context.processes is not None:
        return context.processes
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
    context.processes = processes
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
