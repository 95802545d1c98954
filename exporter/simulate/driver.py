"""`SimulatedDriver`: the `exporter.nvml.Driver` surface over the simulated fleet's state."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.nvml import (
    CLOCK_GRAPHICS,
    CLOCK_MEM,
    CLOCK_SM,
    CLOCK_VIDEO,
    DEC_UTILIZATION_SAMPLES,
    DRIVER_NOT_LOADED,
    ENC_UTILIZATION_SAMPLES,
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID,
    GPU_UTILIZATION_SAMPLES,
    INVALID_ARGUMENT,
    MEMORY_UTILIZATION_SAMPLES,
    NOT_FOUND,
    NOT_SUPPORTED,
    PCIE_TX_BYTES,
    SUCCESS,
    TEMPERATURE_GPU,
    Bar1Memory,
    EncoderStats,
    FieldRequest,
    FieldResult,
    Handle,
    MemoryInfo,
    MigInstance,
    NvmlError,
    NvmlEvent,
    ProcessInfo,
    ProcessSample,
    Utilization,
)
from exporter.simulate import fields, gpm
from exporter.simulate.faults import FaultInjector
from exporter.simulate.models import (
    BAR1_BYTES,
    HOPPER,
    MIB,
    MIG_GPU_INSTANCE_IDS,
    MIG_SLOTS,
    MODELS,
)
from exporter.simulate.physics import (
    STEP_SECONDS,
    DeviceState,
    advance,
    new_device_state,
    process_bytes,
)

if TYPE_CHECKING:
    # Types only: the configuration imports this package's catalogue of models.
    from exporter.config import SimulationConfig


@dataclass(frozen=True)
class _MigHandle:
    device: int
    slot: int


class SimulatedDriver:
    """`exporter.nvml.Driver` over a simulated fleet."""

    def __init__(
        self, config: SimulationConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self._start = clock()
        self._model = MODELS[config.model]
        self._faults = FaultInjector(config.faults, self.elapsed)
        self._states = [
            new_device_state(
                i, self._model, config.seed, config.processes_per_device, i < config.mig_devices
            )
            for i in range(config.devices)
        ]
        self.power_limit_w = [self._model.tdp_watts for _ in self._states]

    # --- simulated time and injected faults ------------------------------------------------

    def elapsed(self) -> float:
        return self._clock() - self._start

    def _advance(self, state: DeviceState) -> None:
        """Steps the device's model up to the current simulated time."""
        # The epsilon keeps float noise in the clock from shifting a step boundary.
        due = int(self.elapsed() / STEP_SECONDS + 1e-6)
        advance(state, due, self.power_limit_w[state.index])

    def _device(self, handle: Handle, function: str) -> DeviceState:
        """Resolves a handle, applying injected faults, and advances the device's model."""
        state = self._states[handle]
        code = self._faults.apply(handle, function)
        if code != SUCCESS:
            raise NvmlError(code, function)
        with state.lock:
            self._advance(state)
        return state

    # --- Driver ------------------------------------------------------------------------------

    def init(self) -> None:
        if self._faults.init_fails():
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
        if isinstance(handle, _MigHandle):
            return self._mig_memory(handle)
        s = self._device(handle, "memory")
        total = s.model.memory_bytes
        reserved = 536 * MIB
        used = sum(process_bytes(s, p) for p in s.processes)
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

    def field_values(self, handle: Handle, requests: Sequence[FieldRequest]) -> list[FieldResult]:
        s = self._device(handle, "field_values")
        return fields.read(
            s,
            requests,
            self.power_limit_w[handle],
            lambda function: self._faults.apply(handle, function, named_only=True),
        )

    def samples(self, handle: Handle, sample_type: int, since_us: int) -> list[tuple[int, float]]:
        s = self._device(handle, "samples")
        if sample_type == GPU_UTILIZATION_SAMPLES:
            return [(t, gpu) for t, gpu, _ in s.history if t > since_us]
        if sample_type == MEMORY_UTILIZATION_SAMPLES:
            return [(t, mem) for t, _, mem in s.history if t > since_us]
        if sample_type == ENC_UTILIZATION_SAMPLES and not s.model.has_encoder:
            raise NvmlError(NOT_SUPPORTED, "samples")
        if sample_type in (ENC_UTILIZATION_SAMPLES, DEC_UTILIZATION_SAMPLES):
            return [(t, 0) for t, _, _ in s.history if t > since_us]
        raise NvmlError(INVALID_ARGUMENT, "samples")

    def clocks_event_reasons(self, handle: Handle) -> int:
        s = self._device(handle, "clocks_event_reasons")
        idle = 0x1 if s.util < 0.01 else 0
        power_cap = 0x4 if s.capped else 0
        return idle | power_cap

    def power_limit_default(self, handle: Handle) -> int:
        return round(self._device(handle, "power_limit_default").model.tdp_watts * 1000)

    def power_limit_constraints(self, handle: Handle) -> tuple[int, int]:
        model = self._device(handle, "power_limit_constraints").model
        return round(model.tdp_watts * 285.7), round(model.tdp_watts * 1000)

    def temperature_threshold(self, handle: Handle, threshold: int) -> int:
        model = self._device(handle, "temperature_threshold").model
        if not 0 <= threshold < len(model.thresholds) or not model.thresholds[threshold]:
            raise NvmlError(NOT_SUPPORTED, "temperature_threshold")
        return model.thresholds[threshold]

    def pcie_link_generation(self, handle: Handle) -> int:
        s = self._device(handle, "pcie_link_generation")
        # The link trains down to save power while idle.
        return s.model.pcie_generation if s.util > 0.01 else 1

    def pcie_link_width(self, handle: Handle) -> int:
        self._device(handle, "pcie_link_width")
        return 16

    def pcie_max_link_generation(self, handle: Handle) -> int:
        return self._device(handle, "pcie_max_link_generation").model.pcie_generation

    def pcie_max_link_width(self, handle: Handle) -> int:
        self._device(handle, "pcie_max_link_width")
        return 16

    def pcie_throughput(self, handle: Handle, counter: int) -> int:
        s = self._device(handle, "pcie_throughput")
        bytes_per_second = 0.2e9 * s.util if counter == PCIE_TX_BYTES else 0.5e9 * s.util
        return int(bytes_per_second / 1024)

    def encoder_utilization(self, handle: Handle) -> int:
        if not self._device(handle, "encoder_utilization").model.has_encoder:
            raise NvmlError(NOT_SUPPORTED, "encoder_utilization")
        return 0

    def decoder_utilization(self, handle: Handle) -> int:
        self._device(handle, "decoder_utilization")
        return 0

    def encoder_stats(self, handle: Handle) -> EncoderStats:
        if not self._device(handle, "encoder_stats").model.has_encoder:
            raise NvmlError(NOT_SUPPORTED, "encoder_stats")
        return EncoderStats(0, 0, 0)

    def bar1_memory(self, handle: Handle) -> Bar1Memory:
        s = self._device(handle, "bar1_memory")
        used = (64 + 8 * len(s.processes)) * MIB
        return Bar1Memory(total=BAR1_BYTES, used=used, free=BAR1_BYTES - used)

    def persistence_mode(self, handle: Handle) -> int:
        self._device(handle, "persistence_mode")
        return 1

    def compute_mode(self, handle: Handle) -> int:
        self._device(handle, "compute_mode")
        return 0

    def ecc_mode(self, handle: Handle) -> tuple[int, int]:
        self._device(handle, "ecc_mode")
        return 1, 1

    # --- processes and MIG -----------------------------------------------------------------

    def _is_mig(self, index: int) -> bool:
        return index < self._config.mig_devices

    def compute_processes(self, handle: Handle) -> list[ProcessInfo]:
        s = self._device(handle, "compute_processes")
        return [
            ProcessInfo(
                pid=p.pid,
                used_memory=process_bytes(s, p),
                gpu_instance=None if p.mig_slot is None else MIG_GPU_INSTANCE_IDS[p.mig_slot],
                compute_instance=None if p.mig_slot is None else 0,
            )
            for p in s.processes
        ]

    def graphics_processes(self, handle: Handle) -> list[ProcessInfo]:
        self._device(handle, "graphics_processes")
        return []

    def process_utilization(self, handle: Handle, since_us: int) -> list[ProcessSample]:
        s = self._device(handle, "process_utilization")
        if not s.history or s.history[-1][0] <= since_us:
            return []
        timestamp, gpu, memory = s.history[-1]
        weights = [p.base_bytes for p in s.processes]
        total = sum(weights) or 1
        return [
            ProcessSample(p.pid, timestamp, round(gpu * w / total), round(memory * w / total), 0, 0)
            for p, w in zip(s.processes, weights, strict=True)
        ]

    def process_name(self, pid: int) -> str:
        for state in self._states:
            for process in state.processes:
                if process.pid == pid:
                    return process.name
        raise NvmlError(NOT_FOUND, "process_name")

    def mig_mode(self, handle: Handle) -> tuple[int, int]:
        self._device(handle, "mig_mode")
        mode = 1 if self._is_mig(handle) else 0
        return mode, mode

    def mig_instances(self, handle: Handle) -> list[MigInstance]:
        s = self._device(handle, "mig_instances")
        if not self._is_mig(handle):
            raise NvmlError(NOT_SUPPORTED, "mig_instances")
        return [
            MigInstance(
                handle=_MigHandle(handle, slot),
                uuid=self._mig_uuid(handle, slot),
                gpu_instance=MIG_GPU_INSTANCE_IDS[slot],
                compute_instance=0,
                profile=s.model.mig_profile,
            )
            for slot in range(MIG_SLOTS)
        ]

    def _mig_uuid(self, index: int, slot: int) -> str:
        rng = random.Random(f"mig-{self._config.seed}-{index}-{slot}")
        h = f"{rng.getrandbits(128):032x}"
        return f"MIG-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _mig_memory(self, handle: _MigHandle) -> MemoryInfo:
        s = self._device(handle.device, "memory")
        total = s.model.memory_bytes // MIG_SLOTS // MIB * MIB
        used = sum(
            min(process_bytes(s, p), total) for p in s.processes if p.mig_slot == handle.slot
        )
        return MemoryInfo(total=total, used=used, free=total - used, reserved=0)

    # --- events ------------------------------------------------------------------------------

    def supported_events(self, handle: Handle) -> int:
        self._device(handle, "supported_events")
        return EVENT_XID | EVENT_SINGLE_BIT_ECC | EVENT_DOUBLE_BIT_ECC

    def create_event_set(self) -> Handle:
        return object()

    def register_events(self, handle: Handle, event_set: Handle, types: int) -> None:
        self._device(handle, "register_events")

    def wait_event(self, event_set: Handle, timeout_ms: int) -> NvmlEvent | None:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            xid = self._faults.take_due_xid()
            if xid is not None:
                device, code = xid
                return NvmlEvent(uuid=self.uuid(device), type=EVENT_XID, data=code)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(remaining, 0.05))

    def free_event_set(self, event_set: Handle) -> None:
        pass

    # --- GPM ---------------------------------------------------------------------------------

    def gpm_supported(self, handle: Handle) -> bool:
        return self._device(handle, "gpm_supported").model.architecture >= HOPPER

    def gpm_sample_alloc(self) -> Handle:
        return gpm.GpmSample()

    def gpm_sample_free(self, sample: Handle) -> None:
        sample.values = None

    def gpm_sample_get(self, handle: Handle, sample: Handle) -> bool:
        s = self._device(handle, "gpm_sample_get")
        if s.model.architecture < HOPPER:
            raise NvmlError(NOT_SUPPORTED, "gpm_sample_get")
        sample.values = gpm.read_activity(s, 1.0)
        return True

    def gpm_mig_sample_get(self, handle: Handle, gpu_instance: int, sample: Handle) -> bool:
        s = self._device(handle, "gpm_mig_sample_get")
        slot = (
            MIG_GPU_INSTANCE_IDS.index(gpu_instance) if gpu_instance in MIG_GPU_INSTANCE_IDS else -1
        )
        if not self._is_mig(handle) or slot < 0:
            raise NvmlError(INVALID_ARGUMENT, "gpm_mig_sample_get")
        sample.values = gpm.read_activity(s, gpm.instance_share(s, slot))
        return True

    def gpm_metrics(
        self, first: Handle, second: Handle, metric_ids: Sequence[int]
    ) -> list[tuple[int, float | None]]:
        return gpm.metrics(first, second, metric_ids)


def fleet_description(config: SimulationConfig) -> str:
    model = MODELS[config.model]
    return f"{config.devices} x {model.name}"
