"""A simulated GPU fleet behind the same `Driver` interface as real NVML.

Used by the quickstart, demos, dashboards and tests; it is only ever used when the user asks for
it (`--simulate` or `backend: simulated`). Values move plausibly and consistently: power follows
load and is capped at the limit (the SM clock drops when it is), energy integrates power,
temperature follows power with a lag, memory used is the sum of the processes' memory.

The model advances in fixed steps of simulated time, so the state at time t depends only on the
seed and t, not on when or how often it is read: tests can pin the clock and get exact values.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.config import FaultConfig, SimulationConfig
from exporter.nvml import (
    CLOCK_GRAPHICS,
    CLOCK_MEM,
    CLOCK_SM,
    CLOCK_VIDEO,
    DRIVER_NOT_LOADED,
    GPU_IS_LOST,
    INVALID_ARGUMENT,
    NOT_SUPPORTED,
    TEMPERATURE_GPU,
    Handle,
    MemoryInfo,
    NvmlError,
    Utilization,
)

MIB = 1024 * 1024
STEP_SECONDS = 0.1
AMBIENT_CELSIUS = 28.0
THERMAL_TIME_CONSTANT = 40.0


@dataclass(frozen=True)
class GpuModel:
    name: str
    architecture: int
    memory_bytes: int
    tdp_watts: float
    idle_watts: float
    max_sm_mhz: int
    idle_sm_mhz: int
    memory_mhz: int
    video_mhz: int
    fans: int
    # Degrees above ambient per watt at steady state.
    thermal_resistance: float


MODELS = {
    m.name: m
    for m in (
        GpuModel("NVIDIA H200", 9, 143771 * MIB, 700, 75, 1980, 345, 3201, 1965, 0, 0.062),
        GpuModel("NVIDIA H100 80GB HBM3", 9, 81559 * MIB, 700, 70, 1980, 345, 2619, 1755, 0, 0.065),
        GpuModel("NVIDIA A100-SXM4-80GB", 7, 81920 * MIB, 400, 55, 1410, 210, 1593, 1275, 0, 0.11),
        GpuModel("NVIDIA L40S", 8, 46068 * MIB, 350, 35, 2520, 210, 9001, 1965, 1, 0.14),
    )
}

PROCESS_NAMES = ("python3", "tritonserver", "vllm", "text-generation-launcher")


@dataclass
class _Process:
    pid: int
    name: str
    base_bytes: int


@dataclass
class _DeviceState:
    """Mutable physical state of one simulated GPU, advanced in fixed time steps."""

    index: int
    model: GpuModel
    rng: random.Random
    processes: list[_Process]
    steps: int = 0
    phase_left: float = 0.0
    target: float = 0.0
    memory_intensity: float = 0.5
    util: float = 0.0
    power_w: float = 0.0
    energy_mj: float = 0.0
    temperature: float = AMBIENT_CELSIUS + 5
    sm_mhz: float = 0.0
    kv_fraction: float = 0.2
    lock: threading.Lock = field(default_factory=threading.Lock)


class SimulatedDriver:
    """`exporter.nvml.Driver` over a simulated fleet."""

    def __init__(
        self, config: SimulationConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self._start = clock()
        self._model = MODELS[config.model]
        self._faults = config.faults
        self._states = [self._new_state(i) for i in range(config.devices)]
        self.power_limit_w = [self._model.tdp_watts for _ in self._states]

    # --- the fleet model -------------------------------------------------------------------

    def _new_state(self, index: int) -> _DeviceState:
        rng = random.Random(self._config.seed * 1_000_003 + index)
        model = self._model
        processes = []
        share = 0.55 * model.memory_bytes / max(1, self._config.processes_per_device)
        for k in range(self._config.processes_per_device):
            processes.append(
                _Process(
                    pid=10_000 + index * 100 + k,
                    name=PROCESS_NAMES[(index + k) % len(PROCESS_NAMES)],
                    base_bytes=int(share * rng.uniform(0.7, 1.0)) // MIB * MIB,
                )
            )
        state = _DeviceState(index=index, model=model, rng=rng, processes=processes)
        state.power_w = model.idle_watts
        state.sm_mhz = model.idle_sm_mhz
        return state

    def elapsed(self) -> float:
        return self._clock() - self._start

    def _advance(self, state: _DeviceState) -> None:
        """Steps the device's model up to the current simulated time."""
        # The epsilon keeps float noise in the clock from shifting a step boundary.
        due = int(self.elapsed() / STEP_SECONDS + 1e-6)
        limit_w = self.power_limit_w[state.index]
        while state.steps < due:
            self._step(state, limit_w)
            state.steps += 1

    def _step(self, s: _DeviceState, limit_w: float) -> None:
        model, rng, dt = s.model, s.rng, STEP_SECONDS
        s.phase_left -= dt
        if s.phase_left <= 0:
            # Inference traffic comes in phases: idle, steady decoding, heavy prefill bursts.
            kind = rng.random()
            if not s.processes or kind < 0.2:
                s.target, s.memory_intensity = 0.0, 0.0
            elif kind < 0.7:
                s.target, s.memory_intensity = rng.uniform(0.45, 0.8), rng.uniform(0.6, 0.9)
            else:
                s.target, s.memory_intensity = rng.uniform(0.85, 1.0), rng.uniform(0.25, 0.5)
            s.phase_left = rng.uniform(15, 90)
        noise = rng.gauss(0, 0.04) if s.target > 0 else 0.0
        s.util = min(1.0, max(0.0, s.util + (s.target - s.util) * 0.35 + noise))
        s.kv_fraction = min(
            0.95, max(0.05, s.kv_fraction + rng.gauss(0, 0.01) + 0.02 * s.util * dt)
        )
        if s.util < 0.01:
            s.kv_fraction = max(0.05, s.kv_fraction - 0.01 * dt)
        demand_w = model.idle_watts + (model.tdp_watts * 1.12 - model.idle_watts) * s.util**0.9
        boost = model.idle_sm_mhz + (model.max_sm_mhz - model.idle_sm_mhz) * min(1.0, s.util * 8)
        if demand_w > limit_w:
            # Power capping: the driver lowers the SM clock until the board fits the limit.
            s.power_w = limit_w - rng.uniform(0, 0.01) * limit_w
            headroom = (limit_w - model.idle_watts) / (demand_w - model.idle_watts)
            s.sm_mhz = max(model.idle_sm_mhz, boost * headroom)
        else:
            s.power_w = demand_w
            s.sm_mhz = boost
        s.energy_mj += s.power_w * dt * 1000
        steady = AMBIENT_CELSIUS + s.power_w * model.thermal_resistance
        s.temperature += (steady - s.temperature) * dt / THERMAL_TIME_CONSTANT

    def _process_bytes(self, s: _DeviceState, process: _Process) -> int:
        kv = int(s.kv_fraction * 0.3 * s.model.memory_bytes / max(1, len(s.processes)))
        return (process.base_bytes + kv) // MIB * MIB

    # --- faults ------------------------------------------------------------------------------

    def _active(self, fault: FaultConfig) -> bool:
        t = self.elapsed()
        return t >= fault.start and (fault.duration is None or t < fault.start + fault.duration)

    def _device(self, handle: Handle, function: str) -> _DeviceState:
        """Resolves a handle, applying injected faults, and advances the device's model."""
        state = self._states[handle]
        for fault in self._faults:
            if fault.device not in (None, handle) or not self._active(fault):
                continue
            if fault.kind == "lost":
                raise NvmlError(GPU_IS_LOST, function)
            if fault.function in (None, function):
                if fault.kind == "unsupported":
                    raise NvmlError(NOT_SUPPORTED, function)
                if fault.kind == "slow":
                    time.sleep(fault.delay)
        with state.lock:
            self._advance(state)
        return state

    # --- Driver ------------------------------------------------------------------------------

    def init(self) -> None:
        for fault in self._faults:
            if fault.kind == "init_failure" and self._active(fault):
                raise NvmlError(DRIVER_NOT_LOADED, "init")

    def shutdown(self) -> None:
        pass

    def driver_version(self) -> str:
        return "570.172.08"

    def cuda_driver_version(self) -> int:
        return 12080

    def device_count(self) -> int:
        return len(self._states)

    def device_handle(self, index: int) -> Handle:
        if not 0 <= index < len(self._states):
            raise NvmlError(INVALID_ARGUMENT, "device_handle")
        self._device(index, "device_handle")
        return index

    def uuid(self, handle: Handle) -> str:
        self._device(handle, "uuid")
        rng = random.Random(f"uuid-{self._config.seed}-{handle}")
        h = f"{rng.getrandbits(128):032x}"
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def name(self, handle: Handle) -> str:
        return self._device(handle, "name").model.name

    def pci_bus_id(self, handle: Handle) -> str:
        self._device(handle, "pci_bus_id")
        return f"00000000:{0x18 + 0x10 * handle:02X}:00.0"

    def serial(self, handle: Handle) -> str:
        self._device(handle, "serial")
        return f"165{self._config.seed:04d}{handle:06d}"

    def vbios_version(self, handle: Handle) -> str:
        self._device(handle, "vbios_version")
        return "96.00.AF.00.01"

    def architecture(self, handle: Handle) -> int:
        return self._device(handle, "architecture").model.architecture

    def minor_number(self, handle: Handle) -> int:
        self._device(handle, "minor_number")
        return int(handle)

    def utilization(self, handle: Handle) -> Utilization:
        s = self._device(handle, "utilization")
        return Utilization(gpu=round(100 * s.util), memory=round(100 * s.util * s.memory_intensity))

    def memory(self, handle: Handle) -> MemoryInfo:
        s = self._device(handle, "memory")
        total = s.model.memory_bytes
        reserved = 536 * MIB
        used = sum(self._process_bytes(s, p) for p in s.processes)
        return MemoryInfo(total=total, used=used, free=total - reserved - used, reserved=reserved)

    def temperature(self, handle: Handle, sensor: int) -> int:
        s = self._device(handle, "temperature")
        if sensor != TEMPERATURE_GPU:
            raise NvmlError(INVALID_ARGUMENT, "temperature")
        return round(s.temperature)

    def power_usage(self, handle: Handle) -> int:
        return round(self._device(handle, "power_usage").power_w * 1000)

    def enforced_power_limit(self, handle: Handle) -> int:
        self._device(handle, "enforced_power_limit")
        return round(self.power_limit_w[handle] * 1000)

    def total_energy(self, handle: Handle) -> int:
        return int(self._device(handle, "total_energy").energy_mj)

    def clock(self, handle: Handle, clock_type: int) -> int:
        s = self._device(handle, "clock")
        if clock_type in (CLOCK_GRAPHICS, CLOCK_SM):
            return round(s.sm_mhz)
        if clock_type == CLOCK_MEM:
            return s.model.memory_mhz
        if clock_type == CLOCK_VIDEO:
            load = min(1.0, s.sm_mhz / s.model.max_sm_mhz)
            return round(s.model.video_mhz * (0.5 + 0.5 * load))
        raise NvmlError(INVALID_ARGUMENT, "clock")

    def fan_count(self, handle: Handle) -> int:
        s = self._device(handle, "fan_count")
        if not s.model.fans:
            raise NvmlError(NOT_SUPPORTED, "fan_count")
        return s.model.fans

    def fan_speed(self, handle: Handle, fan: int) -> int:
        s = self._device(handle, "fan_speed")
        if fan >= s.model.fans:
            raise NvmlError(NOT_SUPPORTED if not s.model.fans else INVALID_ARGUMENT, "fan_speed")
        return round(min(100.0, max(30.0, 30 + 1.4 * (s.temperature - 40))))

    def performance_state(self, handle: Handle) -> int:
        s = self._device(handle, "performance_state")
        return 0 if s.processes or s.util > 0.01 else 8


def fleet_description(config: SimulationConfig) -> str:
    model = MODELS[config.model]
    return f"{config.devices} x {model.name}"
