"""The stand-in fleets the benchmark runs both exporters against.

A fleet spec is `GPUSxPROCS`, optionally with `mMIG` for MIG instances per GPU: `8x0`, `16x200`,
`8x0m7`. PROCS is the total number of GPU processes, spread round-robin over the GPUs. The
processes are real (sleeping children of the benchmark), so both exporters look up real host
processes in /proc, as they do on a GPU node with host PID visibility.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nvml_stub
from nvml_stub.costs import CostProfile

_SPEC = re.compile(r"^(?P<gpus>\d+)x(?P<procs>\d+)(?:m(?P<mig>\d+))?$")
_MIB = 1 << 20
# Process samples carry fixed timestamps (microseconds), like the stand-in's own defaults.
_SAMPLE_EPOCH_US = 1_700_000_000_000_000
# How long the sleeping stand-in processes live at most, should the benchmark be killed.
_PROCESS_LIFETIME_S = 1800


@dataclass(frozen=True)
class FleetSpec:
    gpus: int
    processes: int = 0
    mig: int = 0

    @classmethod
    def parse(cls, text: str) -> FleetSpec:
        match = _SPEC.match(text.strip())
        if match is None:
            raise ValueError(f"bad fleet {text!r}: expected GPUSxPROCS[mMIG], e.g. 8x200 or 8x0m7")
        spec = cls(int(match["gpus"]), int(match["procs"]), int(match["mig"] or 0))
        if not 1 <= spec.gpus <= 64:
            raise ValueError(f"bad fleet {text!r}: 1 to 64 GPUs")
        if not 0 <= spec.mig <= 7:
            raise ValueError(f"bad fleet {text!r}: 0 to 7 MIG instances per GPU")
        if spec.processes > 2000:
            raise ValueError(f"bad fleet {text!r}: at most 2000 processes")
        return spec

    @property
    def key(self) -> str:
        return f"{self.gpus}x{self.processes}" + (f"m{self.mig}" if self.mig else "")

    @property
    def label(self) -> str:
        text = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}, {self.processes} proc"
        return text + (f", {self.gpus}x{self.mig} MIG" if self.mig else "")

    @property
    def wants_process_series(self) -> bool:
        """Process cases run our exporter with the opt-in `processes` collector on."""
        return self.processes > 0


def parse_fleets(text: str) -> list[FleetSpec]:
    return [FleetSpec.parse(part) for part in text.split(",") if part.strip()]


@contextmanager
def host_processes(count: int) -> Iterator[list[int]]:
    """`count` real, idle processes whose PIDs the stand-in reports as GPU processes."""
    children: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            children.append(
                subprocess.Popen(
                    ["sleep", str(_PROCESS_LIFETIME_S)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield [child.pid for child in children]
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


def build_fleet(
    directory: Path, spec: FleetSpec, pids: Sequence[int], costs: CostProfile | None = None
) -> nvml_stub.Fleet:
    """A stand-in fleet of HGX H200s with `pids` spread over the GPUs and MIG as specified.

    With `costs` (e.g. nvml_stub.costs.H200_DRIVER_580) each NVML call burns the thread CPU a
    real driver's does, so the exporters' CPU figures include the driver's share.
    """
    fleet = nvml_stub.Fleet(directory, num_devices=spec.gpus, costs=costs)
    for device in fleet.devices:
        device.processes = []
        device.process_samples = []
    for k, pid in enumerate(pids):
        device = fleet.devices[k % spec.gpus]
        used = (64 + 32 * (k % 16)) * _MIB
        device.processes.append(nvml_stub.Process(pid=pid, used_gpu_memory=used, name="sleep"))
        device.process_samples.append(
            nvml_stub.ProcessSample(
                pid=pid,
                timestamp=_SAMPLE_EPOCH_US + 1000 * k,
                sm_util=(7 * k) % 100,
                mem_util=(3 * k) % 100,
            )
        )
    for device in fleet.devices:
        device.memory_used = sum(p.used_gpu_memory for p in device.processes) + 512 * _MIB
        if spec.mig:
            device.enable_mig(spec.mig)
    fleet.apply()
    return fleet
