"""The physics of one simulated GPU: its workload's phases, power (capped at the limit, the SM
clock dropping with it), energy, temperature, memory, PCIe and NVLink traffic, GPM activity and
utilization history, advanced in fixed steps of simulated time.

Every random draw comes from the device's own generator in a fixed order, so the state after n
steps depends only on the seed, the device's index and the power limit.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field

from exporter.nvml import FI_PERF_POLICY_LOW_UTILIZATION, FI_PERF_POLICY_POWER
from exporter.simulate.models import MIB, MIG_SLOTS, GpuModel

STEP_SECONDS = 0.1
# Sample timestamps are microseconds on the host clock; any fixed origin will do.
SIM_EPOCH_US = 1_700_000_000_000_000
AMBIENT_CELSIUS = 28.0
THERMAL_TIME_CONSTANT = 40.0
# The driver keeps roughly this much utilization history for nvmlDeviceGetSamples.
SAMPLE_HISTORY = 100
PROCESS_NAMES = ("python3", "tritonserver", "vllm", "text-generation-launcher")


@dataclass
class SimulatedProcess:
    pid: int
    name: str
    base_bytes: int
    mig_slot: int | None = None  # which MIG instance it runs in


@dataclass
class DeviceState:
    """Mutable physical state of one simulated GPU, advanced in fixed time steps."""

    index: int
    model: GpuModel
    rng: random.Random
    processes: list[SimulatedProcess]
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
    capped: bool = False
    pcie_tx_bytes: float = 0.0
    pcie_rx_bytes: float = 0.0
    nvlink_kib: list[float] = field(default_factory=list)
    violation_ns: dict[int, float] = field(default_factory=dict)
    history: deque[tuple[int, int, int]] = field(
        default_factory=lambda: deque(maxlen=SAMPLE_HISTORY)
    )
    # Time integrals of each GPM activity (activity x seconds): a GPM sample is a copy, and a
    # metric is the difference of two copies over the time between them.
    activity: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def new_device_state(
    index: int, model: GpuModel, seed: int, processes_per_device: int, mig: bool
) -> DeviceState:
    """Device `index` at rest at time zero; its random stream depends only on `seed` and
    `index`, and a MIG device runs one process in each instance."""
    rng = random.Random(seed * 1_000_003 + index)
    processes = []
    count = MIG_SLOTS if mig else processes_per_device
    share = 0.55 * model.memory_bytes / max(1, count)
    for k in range(count):
        processes.append(
            SimulatedProcess(
                pid=10_000 + index * 100 + k,
                name=PROCESS_NAMES[(index + k) % len(PROCESS_NAMES)],
                base_bytes=int(share * rng.uniform(0.7, 1.0)) // MIB * MIB,
                mig_slot=k if mig else None,
            )
        )
    state = DeviceState(index=index, model=model, rng=rng, processes=processes)
    state.power_w = model.idle_watts
    state.sm_mhz = model.idle_sm_mhz
    state.nvlink_kib = [0.0] * model.nvlinks
    return state


def advance(s: DeviceState, steps: int, limit_w: float) -> None:
    """Steps the device's model until it has taken `steps` steps."""
    while s.steps < steps:
        _step(s, limit_w)
        s.steps += 1


def _step(s: DeviceState, limit_w: float) -> None:
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
    s.kv_fraction = min(0.95, max(0.05, s.kv_fraction + rng.gauss(0, 0.01) + 0.02 * s.util * dt))
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
    s.capped = demand_w > limit_w
    s.energy_mj += s.power_w * dt * 1000
    steady = AMBIENT_CELSIUS + s.power_w * model.thermal_resistance
    s.temperature += (steady - s.temperature) * dt / THERMAL_TIME_CONSTANT
    # Tensor-parallel inference moves activations over NVLink; weights and requests cross
    # PCIe at a trickle.
    link_kib = s.util * 40e6 * dt * rng.uniform(0.8, 1.2)
    for link in range(len(s.nvlink_kib)):
        s.nvlink_kib[link] += link_kib
    _integrate_activity(s, dt)
    s.pcie_tx_bytes += (0.2e9 * s.util + 1e6) * dt
    s.pcie_rx_bytes += (0.5e9 * s.util + 2e6) * dt
    dt_ns = dt * 1e9
    if s.capped:
        s.violation_ns[FI_PERF_POLICY_POWER] = s.violation_ns.get(FI_PERF_POLICY_POWER, 0) + dt_ns
    if s.util < 0.01:
        key = FI_PERF_POLICY_LOW_UTILIZATION
        s.violation_ns[key] = s.violation_ns.get(key, 0) + dt_ns
    timestamp_us = SIM_EPOCH_US + (s.steps + 1) * int(STEP_SECONDS * 1e6)
    s.history.append((timestamp_us, round(100 * s.util), round(100 * s.util * s.memory_intensity)))


def _integrate_activity(s: DeviceState, dt: float) -> None:
    sm = s.util * 0.92
    # Prefill is compute-bound and tensor-heavy; decode is memory-bound.
    tensor = sm * (0.75 - 0.5 * s.memory_intensity)
    rates = {
        "graphics": s.util,
        "sm": sm,
        "occupancy": sm * (0.3 + 0.3 * s.memory_intensity),
        "tensor": tensor,
        "hmma": tensor * 0.95,
        "imma": tensor * 0.05,
        "fp32": sm * 0.15,
        "fp16": sm * 0.05,
        "integer": sm * 0.2,
        "dram": min(1.0, s.util * s.memory_intensity * 1.1),
        "time": 1.0,
    }
    for key, rate in rates.items():
        s.activity[key] = s.activity.get(key, 0.0) + rate * dt


def process_bytes(s: DeviceState, process: SimulatedProcess) -> int:
    """Memory the process holds: its own and its share of the KV cache, in whole MiB."""
    kv = int(s.kv_fraction * 0.3 * s.model.memory_bytes / max(1, len(s.processes)))
    return (process.base_bytes + kv) // MIB * MIB
