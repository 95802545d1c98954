"""Control side of the test-only libnvidia-ml.so.1 stand-in.

`Fleet` owns a model of the GPUs that the C library serves. It writes the model to a plain-text
file (env NVML_STUB_CONFIG) that the library re-reads whenever it is replaced, and it reads the
per-symbol call counters the library keeps in a shared file mapping (env NVML_STUB_COUNTERS).
Values are in NVML's raw units, so a test can compare an exporter's output with the model exactly.
make_device() models an HGX H200 (NVLink, ECC on, MIG-capable, GPM, row remapping);
make_pcie_device() an L40S PCIe card without NVLink, ECC counters, MIG or GPM, that retires pages.
Calls cost next to nothing unless the fleet carries a cost profile (costs.py, e.g.
H200_DRIVER_580): then each call burns the CPU time a real driver's call costs its thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from .costs import CostProfile, config_lines

PACKAGE_DIR = Path(__file__).resolve().parent
SONAME = "libnvidia-ml.so.1"
_SOURCES = ("nvml_stub.c", "symbols.h")
_CFLAGS = (
    "-shared",
    "-fPIC",
    "-O2",
    "-pthread",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fvisibility=hidden",
    f"-Wl,-soname,{SONAME}",
    "-Wl,--no-undefined",
)

SYMBOLS: tuple[str, ...] = tuple(
    re.findall(r"^SYM\((\w+)\)$", (PACKAGE_DIR / "symbols.h").read_text(), re.MULTILINE)
)

# Values below mirror pynvml's constants; test_nvml_stub.py checks that they agree.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_GPU_IS_LOST = 15

ARCH_AMPERE = 7
ARCH_ADA = 8
ARCH_HOPPER = 9
BRAND_NVIDIA = 14

CLOCK_GRAPHICS, CLOCK_SM, CLOCK_MEM, CLOCK_VIDEO = 0, 1, 2, 3
CLOCK_ID_CURRENT, CLOCK_ID_APP_TARGET, CLOCK_ID_APP_DEFAULT, CLOCK_ID_BOOST_MAX = 0, 1, 2, 3
GPU_UTILIZATION_SAMPLES = 1
MEMORY_UTILIZATION_SAMPLES = 2
ENC_UTILIZATION_SAMPLES = 3
DEC_UTILIZATION_SAMPLES = 4
PCIE_UTIL_TX_BYTES = 0
PCIE_UTIL_RX_BYTES = 1

EVENT_SINGLE_BIT_ECC = 0x1
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_PSTATE = 0x4
EVENT_XID_CRITICAL = 0x8
EVENT_CLOCK = 0x10

VALUE_TYPE_DOUBLE = 0
VALUE_TYPE_UNSIGNED_INT = 1
VALUE_TYPE_UNSIGNED_LONG_LONG = 3

# NVML reports "no MIG instance" with an all-ones instance id.
NOT_AVAILABLE_UINT = 0xFFFFFFFF

FI_ECC_CURRENT = 1
FI_ECC_PENDING = 2
FI_ECC_SBE_VOL_TOTAL = 3
FI_ECC_DBE_VOL_TOTAL = 4
FI_ECC_SBE_AGG_TOTAL = 5
FI_ECC_DBE_AGG_TOTAL = 6
FI_ECC_DBE_AGG_CBU = 28
FI_RETIRED_SBE = 29
FI_RETIRED_DBE = 30
FI_RETIRED_PENDING = 31
FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL = 38
FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL = 45
FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL = 52
FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL = 59
FI_CLOCKS_EVENT_REASON_SW_POWER_CAP = 74
FI_PERF_POLICY_THERMAL = 75
FI_CLOCKS_EVENT_REASON_SYNC_BOOST = 76
FI_PERF_POLICY_BOARD_LIMIT = 77
FI_PERF_POLICY_LOW_UTILIZATION = 78
FI_PERF_POLICY_RELIABILITY = 79
FI_MEMORY_TEMP = 82
FI_TOTAL_ENERGY_CONSUMPTION = 83
FI_NVLINK_LINK_COUNT = 91
FI_PCIE_REPLAY_COUNTER = 94
FI_PCIE_COUNT_CORRECTABLE_ERRORS = 173
FI_NVLINK_THROUGHPUT_DATA_TX = 138
FI_NVLINK_THROUGHPUT_DATA_RX = 139
FI_NVLINK_THROUGHPUT_RAW_TX = 140
FI_NVLINK_THROUGHPUT_RAW_RX = 141
FI_REMAPPED_COR = 142
FI_REMAPPED_UNC = 143
FI_REMAPPED_PENDING = 144
FI_REMAPPED_FAILURE = 145
FI_NVLINK_ERROR_DL_REPLAY = 161
FI_NVLINK_ERROR_DL_RECOVERY = 162
FI_NVLINK_ERROR_DL_CRC = 163
FI_NVLINK_GET_STATE = 165
FI_POWER_AVERAGE = 185
FI_POWER_INSTANT = 186
FI_POWER_CURRENT_LIMIT = 190
FI_PCIE_COUNT_TX_BYTES = 197
FI_PCIE_COUNT_RX_BYTES = 198
FI_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN = 269
FI_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN = 270
FI_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN = 271

# Every ECC error-counter field id (totals and per location); with ECC off a driver serves none.
ECC_COUNTER_FIELDS = frozenset(range(FI_ECC_SBE_VOL_TOTAL, FI_ECC_DBE_AGG_CBU + 1))
RETIRED_PAGE_FIELDS = frozenset((FI_RETIRED_SBE, FI_RETIRED_DBE, FI_RETIRED_PENDING))
REMAPPED_ROW_FIELDS = frozenset(
    (FI_REMAPPED_COR, FI_REMAPPED_UNC, FI_REMAPPED_PENDING, FI_REMAPPED_FAILURE)
)

# Per-lane NVLink error counters exist as separate field ids for lanes 0-5 and 6-11 only.
_LANE_FIELD_BASES = {
    "crc_flit_errors": (32, 96),
    "crc_data_errors": (39, 102),
    "replay_errors": (46, 108),
    "recovery_errors": (53, 114),
}

GPM_GRAPHICS_UTIL = 1
GPM_SM_UTIL = 2
GPM_SM_OCCUPANCY = 3
GPM_ANY_TENSOR_UTIL = 5
GPM_DRAM_BW_UTIL = 10
GPM_FP64_UTIL = 11
GPM_FP32_UTIL = 12
GPM_FP16_UTIL = 13
GPM_PCIE_TX_PER_SEC = 20
GPM_PCIE_RX_PER_SEC = 21
GPM_NVDEC_0_UTIL = 30  # .. 37, one per decoder engine
GPM_NVLINK_TOTAL_RX_PER_SEC = 60
GPM_NVLINK_TOTAL_TX_PER_SEC = 61
# An H200 has seven NVDEC engines.
H200_NVDEC_ENGINES = 7

# Page-retirement causes (nvmlPageRetirementCause_t).
PAGE_RETIREMENT_CAUSE_SBE = 0
PAGE_RETIREMENT_CAUSE_DBE = 1

# Realistic HGX H200 PCI bus numbers; further devices wrap into the next PCI domain.
_BUS_NUMBERS = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
_SAMPLE_EPOCH_US = 1_700_000_000_000_000
_MIB = 1 << 20
_GIB = 1 << 30

FieldKey = tuple[int, int | None]
"""(field id, scope id); scope None answers any scope id."""


@dataclass(frozen=True)
class FieldValue:
    value_type: int
    value: int | float


@dataclass
class Process:
    pid: int
    used_gpu_memory: int
    kind: Literal["compute", "graphics"] = "compute"
    name: str = "python3"
    gpu_instance_id: int = NOT_AVAILABLE_UINT
    compute_instance_id: int = NOT_AVAILABLE_UINT


@dataclass
class ProcessSample:
    """One nvmlProcessUtilizationSample_t; timestamps are microseconds since the epoch."""

    pid: int
    timestamp: int
    sm_util: int
    mem_util: int
    enc_util: int = 0
    dec_util: int = 0


@dataclass
class Sample:
    timestamp: int
    value: int


@dataclass
class RetiredPage:
    """One page retired for `cause` (PAGE_RETIREMENT_CAUSE_SBE or _DBE)."""

    cause: int
    address: int
    timestamp: int


@dataclass
class NvLink:
    active: bool = True
    tx_kib: int = 0
    rx_kib: int = 0
    raw_tx_kib: int = 0
    raw_rx_kib: int = 0
    crc_flit_errors: int = 0
    crc_data_errors: int = 0
    replay_errors: int = 0
    recovery_errors: int = 0


@dataclass
class MigDevice:
    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    memory_reserved: int = 0
    gpm_metrics: dict[int, float] = field(default_factory=dict)

    @property
    def memory_free(self) -> int:
        return self.memory_total - self.memory_reserved - self.memory_used


@dataclass
class Device:
    """One GPU in NVML's raw units: mW, mJ, MHz, bytes, percent, degrees C, KiB/s.

    A feature the GPU lacks is modelled the way a driver reports it: `fan_speeds=[]` (no fans),
    `nvlinks=[]` (NVLink count field 0, per-link fields and nvmlDeviceGetNvLinkState
    NOT_SUPPORTED), `ecc_mode_current=0` (every ECC error counter NOT_SUPPORTED),
    `max_mig_devices=0` (no MIG), an architecture before Hopper (no GPM),
    `retired_pages_supported` / `remapped_rows_supported`, and `unsupported_fields` for single
    field ids. `field_value()` says what nvmlDeviceGetFieldValues serves for any field id.
    """

    index: int
    name: str
    uuid: str
    serial: str
    vbios_version: str
    brand: int
    architecture: int
    minor_number: int
    cuda_compute_capability: tuple[int, int]
    persistence_mode: int
    compute_mode: int
    pci_domain: int
    pci_bus: int
    pci_device: int
    pci_device_id: int
    pci_subsystem_id: int
    utilization_gpu: int
    utilization_memory: int
    memory_total: int
    memory_reserved: int
    memory_used: int
    bar1_total: int
    bar1_used: int
    temperature_gpu: int
    temperature_memory: int
    temperature_thresholds: dict[int, int]
    power_usage: int
    """mW, what nvmlDeviceGetPowerUsage returns: on Ampere and newer the 1 s average, also
    served as field NVML_FI_DEV_POWER_AVERAGE; before Ampere the instantaneous draw, served as
    field NVML_FI_DEV_POWER_INSTANT (no average field there)."""
    power_instant: int
    """mW, field NVML_FI_DEV_POWER_INSTANT on Ampere and newer."""
    power_limit: int
    power_limit_enforced: int
    """mW, nvmlDeviceGetEnforcedPowerLimit and field NVML_FI_DEV_POWER_CURRENT_LIMIT."""
    power_limit_default: int
    power_limit_min: int
    power_limit_max: int
    energy: int
    clocks: dict[tuple[int, int], int]
    """(clock type, clock id) -> MHz, as nvmlDeviceGetClock reports it."""
    max_clocks: dict[int, int]
    fan_speeds: list[int]
    """Empty means the board has no fans: fan queries are NOT_SUPPORTED."""
    performance_state: int
    clocks_event_reasons: int
    clock_event_durations: dict[int, int]
    """Field id -> accumulated nanoseconds, for the clock-event/perf-policy violation fields."""
    encoder_utilization: int
    encoder_sampling_period: int
    decoder_utilization: int
    decoder_sampling_period: int
    ecc_mode_current: int
    """0 makes nvmlDeviceGetTotalEccErrors and ECC counter fields 3..28 NOT_SUPPORTED."""
    ecc_mode_pending: int
    ecc_errors: dict[tuple[int, int], int]
    """(memory error type, counter type) -> count."""
    retired_pages: list[RetiredPage]
    """Served only when `retired_pages_supported` (GPUs before Ampere, and the PCIe card)."""
    remapped_rows: tuple[int, int, int, int]
    """(correctable, uncorrectable, pending, failure), when `remapped_rows_supported`."""
    pcie_link_gen_current: int
    pcie_link_gen_max: int
    pcie_link_width_current: int
    pcie_link_width_max: int
    pcie_tx_throughput: int
    """KiB/s, nvmlDeviceGetPcieThroughput(h, NVML_PCIE_UTIL_TX_BYTES)."""
    pcie_rx_throughput: int
    """KiB/s, nvmlDeviceGetPcieThroughput(h, NVML_PCIE_UTIL_RX_BYTES)."""
    pcie_replay_counter: int
    pcie_tx_bytes: int
    pcie_rx_bytes: int
    nvlinks: list[NvLink]
    processes: list[Process]
    process_samples: list[ProcessSample]
    gpu_utilization_samples: list[Sample]
    memory_utilization_samples: list[Sample]
    mig_mode: bool
    max_mig_devices: int
    """0 means the GPU has no MIG: nvmlDeviceGetMigMode is NOT_SUPPORTED."""
    mig_devices: list[MigDevice]
    supported_event_types: int
    gpm_metrics: dict[int, float]
    """Metric id -> value; ids not listed are NOT_SUPPORTED in nvmlGpmMetricsGet."""
    unsupported_fields: set[int] = field(default_factory=set)
    extra_fields: dict[FieldKey, FieldValue] = field(default_factory=dict)
    encoder_utilization_samples: list[Sample] = field(default_factory=list)
    decoder_utilization_samples: list[Sample] = field(default_factory=list)
    encoder_session_count: int = 0
    """Sessions open; an encoder without any is idle, its samples 0, as on a real GPU."""
    pcie_correctable_errors: int = 0
    encoder_average_fps: int = 0
    encoder_average_latency: int = 0
    """Microseconds, as nvmlDeviceGetEncoderStats reports it."""
    retired_pages_supported: bool = False
    """Ampere and Hopper remap rows instead: retired-page calls and fields are NOT_SUPPORTED."""
    retired_pages_pending: bool = False
    remapped_rows_supported: bool = True
    sample_capacity: int = 100
    """Entries of each driver sample buffer: the count nvmlDeviceGetSamples answers a NULL
    buffer with."""

    @property
    def pci_bus_id(self) -> str:
        return f"{self.pci_domain:08X}:{self.pci_bus:02X}:{self.pci_device:02X}.0"

    @property
    def pci_bus_id_legacy(self) -> str:
        return f"{self.pci_domain:04X}:{self.pci_bus:02X}:{self.pci_device:02X}.0"

    @property
    def memory_free(self) -> int:
        return self.memory_total - self.memory_reserved - self.memory_used

    @property
    def bar1_free(self) -> int:
        return self.bar1_total - self.bar1_used

    @property
    def gpm_supported(self) -> bool:
        return self.architecture >= ARCH_HOPPER

    @property
    def mig_supported(self) -> bool:
        return self.max_mig_devices > 0

    def enable_mig(self, count: int = 2) -> None:
        """Switches MIG on with `count` equal GPU instances (ids 1..count, one CI each)."""
        if not self.mig_supported:
            raise ValueError(f"{self.name} (device {self.index}) has no MIG support")
        size = self.memory_total // (count + 1)
        self.mig_mode = True
        self.mig_devices = [
            MigDevice(
                gpu_instance_id=gi,
                compute_instance_id=0,
                uuid=f"MIG-{self.index:08x}-{gi:04x}-4000-8000-{gi:012x}",
                name=f"{self.name} MIG 1g.{size // 10**9}gb",
                memory_total=size,
                memory_used=16 * _MIB * gi,
                gpm_metrics={GPM_GRAPHICS_UTIL: 10.0 * gi + self.index, GPM_SM_UTIL: 5.0 * gi},
            )
            for gi in range(1, count + 1)
        ]

    def field_values(self) -> dict[FieldKey, FieldValue]:
        """What nvmlDeviceGetFieldValues serves; absent keys get NOT_SUPPORTED per entry."""
        ull, uint = VALUE_TYPE_UNSIGNED_LONG_LONG, VALUE_TYPE_UNSIGNED_INT
        served: dict[FieldKey, FieldValue] = {
            (FI_ECC_CURRENT, None): FieldValue(uint, self.ecc_mode_current),
            (FI_ECC_PENDING, None): FieldValue(uint, self.ecc_mode_pending),
            (FI_TOTAL_ENERGY_CONSUMPTION, None): FieldValue(ull, self.energy),
            (FI_MEMORY_TEMP, None): FieldValue(uint, self.temperature_memory),
            (FI_PCIE_REPLAY_COUNTER, None): FieldValue(ull, self.pcie_replay_counter),
            (FI_PCIE_COUNT_CORRECTABLE_ERRORS, None): FieldValue(ull, self.pcie_correctable_errors),
            (FI_PCIE_COUNT_TX_BYTES, None): FieldValue(ull, self.pcie_tx_bytes),
            (FI_PCIE_COUNT_RX_BYTES, None): FieldValue(ull, self.pcie_rx_bytes),
            (FI_POWER_CURRENT_LIMIT, None): FieldValue(uint, self.power_limit_enforced),
            (FI_ECC_SBE_VOL_TOTAL, None): FieldValue(ull, self.ecc_errors.get((0, 0), 0)),
            (FI_ECC_DBE_VOL_TOTAL, None): FieldValue(ull, self.ecc_errors.get((1, 0), 0)),
            (FI_ECC_SBE_AGG_TOTAL, None): FieldValue(ull, self.ecc_errors.get((0, 1), 0)),
            (FI_ECC_DBE_AGG_TOTAL, None): FieldValue(ull, self.ecc_errors.get((1, 1), 0)),
        }
        if self.architecture >= ARCH_AMPERE:
            served[(FI_POWER_AVERAGE, None)] = FieldValue(uint, self.power_usage)
            served[(FI_POWER_INSTANT, None)] = FieldValue(uint, self.power_instant)
        else:
            served[(FI_POWER_INSTANT, None)] = FieldValue(uint, self.power_usage)
        if self.remapped_rows_supported:
            for fid, remapped in zip(
                (FI_REMAPPED_COR, FI_REMAPPED_UNC, FI_REMAPPED_PENDING, FI_REMAPPED_FAILURE),
                self.remapped_rows,
                strict=True,
            ):
                served[(fid, None)] = FieldValue(uint, remapped)
        if self.retired_pages_supported:
            for fid, cause in (
                (FI_RETIRED_SBE, PAGE_RETIREMENT_CAUSE_SBE),
                (FI_RETIRED_DBE, PAGE_RETIREMENT_CAUSE_DBE),
            ):
                pages = sum(1 for page in self.retired_pages if page.cause == cause)
                served[(fid, None)] = FieldValue(ull, pages)
            served[(FI_RETIRED_PENDING, None)] = FieldValue(uint, int(self.retired_pages_pending))
        for fid, ns in self.clock_event_durations.items():
            served[(fid, None)] = FieldValue(ull, ns)
        # A board without NVLink still answers the link count, with 0.
        served[(FI_NVLINK_LINK_COUNT, None)] = FieldValue(uint, len(self.nvlinks))
        if self.nvlinks:
            served.update(self._nvlink_fields())
        served.update(self.extra_fields)
        unsupported = set(self.unsupported_fields)
        if not self.ecc_mode_current:
            unsupported |= ECC_COUNTER_FIELDS  # the library enforces this too
        return {key: v for key, v in served.items() if key[0] not in unsupported}

    def field_value(self, field_id: int, scope: int | None = None) -> int | float | None:
        """The value nvmlDeviceGetFieldValues returns for (field_id, scope); None if unsupported.

        `scope` is the entry's scopeId (the NVLink index for per-link fields); None means 0, what
        pynvml sends for a bare field id. As in the library, an exact scope beats a wildcard.
        """
        served = self.field_values()
        exact = (field_id, 0 if scope is None else scope)
        found = served[exact] if exact in served else served.get((field_id, None))
        return None if found is None else found.value

    def _nvlink_fields(self) -> Iterator[tuple[FieldKey, FieldValue]]:
        ull = VALUE_TYPE_UNSIGNED_LONG_LONG
        for link, nv in enumerate(self.nvlinks):
            yield (FI_NVLINK_GET_STATE, link), FieldValue(VALUE_TYPE_UNSIGNED_INT, int(nv.active))
            yield (FI_NVLINK_THROUGHPUT_DATA_TX, link), FieldValue(ull, nv.tx_kib)
            yield (FI_NVLINK_THROUGHPUT_DATA_RX, link), FieldValue(ull, nv.rx_kib)
            yield (FI_NVLINK_THROUGHPUT_RAW_TX, link), FieldValue(ull, nv.raw_tx_kib)
            yield (FI_NVLINK_THROUGHPUT_RAW_RX, link), FieldValue(ull, nv.raw_rx_kib)
            yield (FI_NVLINK_ERROR_DL_REPLAY, link), FieldValue(ull, nv.replay_errors)
            yield (FI_NVLINK_ERROR_DL_RECOVERY, link), FieldValue(ull, nv.recovery_errors)
            yield (FI_NVLINK_ERROR_DL_CRC, link), FieldValue(ull, nv.crc_flit_errors)
            if link < 12:
                for attr, (low, high) in _LANE_FIELD_BASES.items():
                    fid = low + link if link < 6 else high + link - 6
                    yield (fid, None), FieldValue(ull, getattr(nv, attr))
        for attr, total in (
            ("crc_flit_errors", FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL),
            ("crc_data_errors", FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL),
            ("replay_errors", FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL),
            ("recovery_errors", FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL),
        ):
            yield (total, None), FieldValue(ull, sum(getattr(nv, attr) for nv in self.nvlinks))


def _clock_table(*rows: tuple[int, int, int, int]) -> dict[tuple[int, int], int]:
    """(clock type, current, application, boost MHz) rows -> nvmlDeviceGetClock's answers; the
    default application clock is the application clock."""
    clocks: dict[tuple[int, int], int] = {}
    for ctype, current, app, boost in rows:
        clocks[(ctype, CLOCK_ID_CURRENT)] = current
        clocks[(ctype, CLOCK_ID_APP_TARGET)] = app
        clocks[(ctype, CLOCK_ID_APP_DEFAULT)] = app
        clocks[(ctype, CLOCK_ID_BOOST_MAX)] = boost
    return clocks


def make_device(index: int, name: str = "NVIDIA H200", architecture: int = ARCH_HOPPER) -> Device:
    """A plausible HGX H200 GPU whose values are derived from `index` so devices differ."""
    i = index
    processes = [
        Process(pid=4000 + 10 * i, used_gpu_memory=(i + 1) * _GIB),
        Process(pid=4001 + 10 * i, used_gpu_memory=512 * _MIB, name="trainer"),
    ]
    clocks = _clock_table(
        (CLOCK_GRAPHICS, 1980 - 15 * i, 1755, 1980),
        (CLOCK_SM, 1980 - 15 * i, 1755, 1980),
        (CLOCK_MEM, 2619, 2619, 2619),
        (CLOCK_VIDEO, 1545 - 10 * i, 1545, 1755),
    )
    util = (10 + 9 * i) % 101
    return Device(
        index=i,
        name=name,
        uuid=f"GPU-{0x5E1F0C00 + i:08x}-7a3b-4c2d-9e8f-{0x0123456789 + i:012x}",
        serial=f"165242{i:07d}",
        vbios_version="96.00.99.00.01",
        brand=BRAND_NVIDIA,
        architecture=architecture,
        minor_number=i,
        cuda_compute_capability=(9, 0) if architecture == ARCH_HOPPER else (8, 0),
        persistence_mode=1,
        compute_mode=0,
        pci_domain=i // len(_BUS_NUMBERS),
        pci_bus=_BUS_NUMBERS[i % len(_BUS_NUMBERS)],
        pci_device=0,
        pci_device_id=0x233510DE,
        pci_subsystem_id=0x18A210DE,
        utilization_gpu=util,
        utilization_memory=(5 + 7 * i) % 101,
        memory_total=143771 * _MIB,
        memory_reserved=585 * _MIB,
        memory_used=sum(p.used_gpu_memory for p in processes),
        bar1_total=262144 * _MIB,
        bar1_used=(3 + i) * _MIB,
        temperature_gpu=35 + i,
        temperature_memory=40 + i,
        temperature_thresholds={0: 92, 1: 89, 2: 95, 3: 87},
        power_usage=120_000 + 10_000 * i,
        power_instant=121_500 + 10_000 * i,
        power_limit=700_000,
        power_limit_enforced=700_000,
        power_limit_default=700_000,
        power_limit_min=200_000,
        power_limit_max=700_000,
        energy=1_000_000_000 + 123_456 * i,
        clocks=clocks,
        max_clocks={CLOCK_GRAPHICS: 1980, CLOCK_SM: 1980, CLOCK_MEM: 2619, CLOCK_VIDEO: 1755},
        fan_speeds=[],
        performance_state=0,
        clocks_event_reasons=0x4 if i % 2 else 0x0,
        clock_event_durations={
            FI_CLOCKS_EVENT_REASON_SW_POWER_CAP: 1_000_000 * i,
            FI_PERF_POLICY_THERMAL: 0,
            FI_CLOCKS_EVENT_REASON_SYNC_BOOST: 0,
            FI_PERF_POLICY_BOARD_LIMIT: 0,
            FI_PERF_POLICY_LOW_UTILIZATION: 2_000_000 * i,
            FI_PERF_POLICY_RELIABILITY: 0,
            FI_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN: 0,
            FI_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN: 500 * i,
            FI_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN: 0,
        },
        encoder_utilization=0,
        encoder_sampling_period=167_000,
        decoder_utilization=(2 * i) % 5,
        decoder_sampling_period=167_000,
        ecc_mode_current=1,
        ecc_mode_pending=1,
        ecc_errors={(0, 0): i, (1, 0): 0, (0, 1): 10 + i, (1, 1): 0},
        retired_pages=[],
        remapped_rows=(i % 2, 0, 0, 0),
        pcie_link_gen_current=5,
        pcie_link_gen_max=5,
        pcie_link_width_current=16,
        pcie_link_width_max=16,
        pcie_tx_throughput=1000 + 100 * i,
        pcie_rx_throughput=2000 + 100 * i,
        pcie_replay_counter=i,
        pcie_correctable_errors=7 * i,
        pcie_tx_bytes=10**12 + i * 10**9,
        pcie_rx_bytes=2 * 10**12 + i * 10**9,
        nvlinks=[
            NvLink(
                tx_kib=1_000_000 * (i + 1) + link,
                rx_kib=2_000_000 * (i + 1) + link,
                raw_tx_kib=1_100_000 * (i + 1) + link,
                raw_rx_kib=2_200_000 * (i + 1) + link,
                crc_flit_errors=link % 3,
                replay_errors=link % 2,
            )
            for link in range(18)
        ],
        processes=processes,
        process_samples=[
            ProcessSample(p.pid, _SAMPLE_EPOCH_US + 1000 * k, util // (k + 1), 3 + k)
            for k, p in enumerate(processes)
        ],
        gpu_utilization_samples=[Sample(_SAMPLE_EPOCH_US + 166_667 * k, util) for k in range(3)],
        memory_utilization_samples=[
            Sample(_SAMPLE_EPOCH_US + 166_667 * k, (5 + 7 * i) % 101) for k in range(3)
        ],
        mig_mode=False,
        max_mig_devices=7,
        mig_devices=[],
        supported_event_types=(
            EVENT_SINGLE_BIT_ECC
            | EVENT_DOUBLE_BIT_ECC
            | EVENT_PSTATE
            | EVENT_XID_CRITICAL
            | EVENT_CLOCK
        ),
        gpm_metrics={
            GPM_GRAPHICS_UTIL: float(util),
            GPM_SM_UTIL: util * 0.9,
            GPM_SM_OCCUPANCY: util * 0.5,
            GPM_ANY_TENSOR_UTIL: util * 0.25,
            GPM_DRAM_BW_UTIL: 12.5 + i,
            GPM_FP64_UTIL: 0.0,
            GPM_FP32_UTIL: 7.25 + i,
            GPM_FP16_UTIL: 3.5 + i,
            GPM_PCIE_TX_PER_SEC: 100.0 + i,
            GPM_PCIE_RX_PER_SEC: 200.0 + i,
            GPM_NVLINK_TOTAL_RX_PER_SEC: 4000.0 + i,
            GPM_NVLINK_TOTAL_TX_PER_SEC: 3000.0 + i,
            # Each decoder engine as busy as the decoder samples say the decoders are.
            **{
                GPM_NVDEC_0_UTIL + engine: float((2 * i) % 5)
                for engine in range(H200_NVDEC_ENGINES)
            },
        },
        # No encoder session is open, so the encoder is idle.
        encoder_utilization_samples=[Sample(_SAMPLE_EPOCH_US + 166_667 * k, 0) for k in range(3)],
        decoder_utilization_samples=[
            Sample(_SAMPLE_EPOCH_US + 166_667 * k, (2 * i) % 5) for k in range(3)
        ],
        # Ampere and later keep bad memory out of service by row remapping, not page retirement.
        retired_pages_supported=architecture < ARCH_AMPERE,
        remapped_rows_supported=architecture >= ARCH_AMPERE,
    )


def make_pcie_device(index: int) -> Device:
    """A plausible NVIDIA L40S (Ada, PCIe Gen4 x16) with the features an HGX GPU has turned off.

    No NVLink, ECC disabled (so no ECC error counters), one fan, no MIG, no GPM (Ada is before
    Hopper), no HBM memory-temperature sensor (field 82 NOT_SUPPORTED), no ECC events; bad pages
    are reported by page retirement (nvmlDeviceGetRetiredPages_v2, fields 29-31), not by row
    remapping. Everything else, including its derivation from `index`, follows make_device().
    """
    i = index
    dev = make_device(i, "NVIDIA L40S", ARCH_ADA)
    clocks = _clock_table(
        (CLOCK_GRAPHICS, 2520 - 15 * i, 2175, 2520),
        (CLOCK_SM, 2520 - 15 * i, 2175, 2520),
        (CLOCK_MEM, 9001, 9001, 9001),
        (CLOCK_VIDEO, 1965 - 10 * i, 1965, 1965),
    )
    dev.uuid = f"GPU-{0x1A40C500 + i:08x}-5d2e-4b7a-8c1f-{0xA0B1C2D3E4 + i:012x}"
    dev.serial = f"132352{i:07d}"
    dev.vbios_version = "95.02.66.00.02"
    dev.cuda_compute_capability = (8, 9)
    dev.pci_device_id = 0x26B910DE
    dev.pci_subsystem_id = 0x185110DE
    dev.memory_total = 46068 * _MIB
    dev.memory_reserved = 467 * _MIB
    dev.bar1_total = 65536 * _MIB
    dev.temperature_thresholds = {0: 98, 1: 95, 3: 92}
    dev.power_usage = 80_000 + 5_000 * i
    dev.power_instant = 81_000 + 5_000 * i
    dev.power_limit = dev.power_limit_enforced = dev.power_limit_default = 350_000
    dev.power_limit_min = 100_000
    dev.power_limit_max = 350_000
    dev.clocks = clocks
    dev.max_clocks = {CLOCK_GRAPHICS: 2520, CLOCK_SM: 2520, CLOCK_MEM: 9001, CLOCK_VIDEO: 1965}
    dev.fan_speeds = [30 + i]
    dev.ecc_mode_current = 0
    dev.ecc_mode_pending = 0
    dev.ecc_errors = {(0, 0): 0, (1, 0): 0, (0, 1): 0, (1, 1): 0}
    dev.retired_pages_supported = True
    dev.remapped_rows_supported = False
    dev.remapped_rows = (0, 0, 0, 0)
    dev.pcie_link_gen_current = dev.pcie_link_gen_max = 4
    dev.nvlinks = []
    dev.max_mig_devices = 0
    dev.supported_event_types = EVENT_PSTATE | EVENT_XID_CRITICAL | EVENT_CLOCK
    dev.gpm_metrics = {}
    dev.unsupported_fields = {FI_MEMORY_TEMP}
    return dev


def cache_dir() -> Path:
    configured = os.environ.get("NVML_STUB_BUILD_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "nvml-exporter-tests"


def build(omit: Iterable[str] = ()) -> Path:
    """Compiles the library (once per source/flags/omit set) and returns its directory.

    Omitted symbols are left out of the dynamic symbol table by a linker version script, so
    dlsym() cannot find them and pynvml raises NVMLError_FunctionNotFound.
    """
    omitted = set(omit)
    unknown = omitted - set(SYMBOLS)
    if unknown:
        raise ValueError(f"unknown NVML symbols: {sorted(unknown)}")
    version_script = (
        "{\n  global:\n"
        + "".join(f"    {name};\n" for name in SYMBOLS if name not in omitted)
        + "  local: *;\n};\n"
    )
    compiler = os.environ.get("CC", "cc")
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((PACKAGE_DIR / name).read_bytes())
    digest.update("\0".join((compiler, *_CFLAGS, version_script)).encode())
    out_dir = cache_dir() / digest.hexdigest()[:20]
    library = out_dir / SONAME
    if library.exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # Concurrent builders each compile into a private directory; os.replace makes the last
    # one win atomically, and every candidate is identical anyway.
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        script_path = Path(scratch) / "exports.map"
        script_path.write_text(version_script)
        built = Path(scratch) / SONAME
        subprocess.run(
            [
                compiler,
                *_CFLAGS,
                f"-Wl,--version-script={script_path}",
                "-o",
                str(built),
                str(PACKAGE_DIR / "nvml_stub.c"),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        built.replace(library)
    return out_dir


@dataclass(frozen=True)
class _Event:
    seq: int
    device: int
    event_type: int
    data: int
    gpu_instance_id: int
    compute_instance_id: int


class Fleet:
    """The GPUs a subprocess sees through the stand-in library, plus injected faults and costs.

    Mutating `devices` (or the system-level attributes) takes effect after `apply()`; the
    fault, event and cost methods apply immediately. The library picks the change up on its next
    call.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        num_devices: int = 8,
        name: str = "NVIDIA H200",
        architecture: int = ARCH_HOPPER,
        omit: Iterable[str] = (),
        device_factory: Callable[[int], Device] | None = None,
        costs: CostProfile | None = None,
    ) -> None:
        """`device_factory(index)` builds each device (e.g. make_pcie_device) instead of
        make_device(index, name, architecture); devices can also be replaced later, then apply().
        `costs` makes calls cost what that profile says; see set_costs().
        """
        self._costs: CostProfile | None = None
        self._cost_lines: tuple[str, ...] = ()
        self._set_costs(costs)  # first: a bad profile must not leave a directory behind
        self._owned_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="nvml-stub-")) if directory is None else directory
        )
        self.library_dir = build(omit)
        self.config_path = self.directory / "nvml-stub.conf"
        self.counters_path = self.directory / "nvml-stub.counters"
        factory = device_factory or (lambda i: make_device(i, name, architecture))
        self.devices = [factory(i) for i in range(num_devices)]
        self.driver_version = "550.90.07"
        self.nvml_version = "12.550.90.07"
        self.cuda_driver_version = 12040
        self._faults: dict[tuple[str, int | None], int] = {}
        self._delays: dict[tuple[str, int | None], int] = {}
        self._events: list[_Event] = []
        self.counters_path.write_bytes(bytes(8 * (len(SYMBOLS) + 1)))
        self.apply()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Removes the config directory if this fleet created it."""
        if self._owned_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess that should load the stand-in as libnvidia-ml.so.1."""
        env = dict(os.environ if base is None else base)
        search = [str(self.library_dir)]
        if env.get("LD_LIBRARY_PATH"):
            search.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(search)
        env["NVML_STUB_CONFIG"] = str(self.config_path)
        env["NVML_STUB_COUNTERS"] = str(self.counters_path)
        return env

    # ---- faults ----

    def fail(
        self, function: str, rc: int = NVML_ERROR_NOT_SUPPORTED, device: int | None = None
    ) -> None:
        """Makes `function` ("*" for every function) return `rc`, on one device or on all."""
        self._faults[(_check_symbol(function), device)] = rc
        self.apply()

    def clear_fault(self, function: str, device: int | None = None) -> None:
        self._faults.pop((function, device), None)
        self.apply()

    def fail_init(self, rc: int = NVML_ERROR_DRIVER_NOT_LOADED) -> None:
        self._faults[("nvmlInitWithFlags", None)] = rc
        self._faults[("nvmlInit_v2", None)] = rc
        self.apply()

    def clear_init_failure(self) -> None:
        self._faults.pop(("nvmlInitWithFlags", None), None)
        self._faults.pop(("nvmlInit_v2", None), None)
        self.apply()

    def set_gpu_lost(self, device: int, lost: bool = True) -> None:
        """Every call naming the device (its handle or its index) returns GPU_IS_LOST."""
        if lost:
            self.fail("*", NVML_ERROR_GPU_IS_LOST, device)
        else:
            self.clear_fault("*", device)

    def block(self, function: str, ms: int, device: int | None = None) -> None:
        """Makes `function` ("*" for every function) sleep `ms` before answering; 0 clears."""
        key = (_check_symbol(function), device)
        if ms > 0:
            self._delays[key] = ms
        else:
            self._delays.pop(key, None)
        self.apply()

    # ---- costs ----

    @property
    def costs(self) -> CostProfile | None:
        return self._costs

    def set_costs(self, profile: CostProfile | None) -> None:
        """From the next call on, each call burns the thread CPU (and waits the wall time) that
        `profile` gives it; None makes calls free again. Applies immediately."""
        self._set_costs(profile)
        self.apply()

    def _set_costs(self, profile: CostProfile | None) -> None:
        lines: tuple[str, ...] = ()
        if profile is not None:
            unknown = sorted(set(profile.symbols) - set(SYMBOLS))
            if unknown:
                raise ValueError(f"cost profile {profile.name!r}: unknown NVML symbols {unknown}")
            lines = tuple(config_lines(profile))
        self._costs, self._cost_lines = profile, lines

    def queue_event(
        self,
        device: int,
        event_type: int,
        data: int = 0,
        gpu_instance_id: int = NOT_AVAILABLE_UINT,
        compute_instance_id: int = NOT_AVAILABLE_UINT,
    ) -> None:
        """Queues an event; each event set registered for it receives it once from its wait.

        An event stays queued, so a set that registers for it later still receives it.
        """
        seq = len(self._events) + 1
        self._events.append(
            _Event(seq, device, event_type, data, gpu_instance_id, compute_instance_id)
        )
        self.apply()

    def queue_xid(self, device: int, xid: int) -> None:
        self.queue_event(device, EVENT_XID_CRITICAL, xid)

    # ---- counters ----

    def _read_counters(self) -> tuple[int, ...]:
        raw = self.counters_path.read_bytes()
        return struct.unpack(f"<{len(SYMBOLS)}Qq", raw[: 8 * (len(SYMBOLS) + 1)])

    def calls(self) -> dict[str, int]:
        """Calls per exported symbol, across every process using this fleet's environment."""
        return dict(zip(SYMBOLS, self._read_counters(), strict=False))

    def gpm_samples_outstanding(self) -> int:
        """GPM samples allocated with nvmlGpmSampleAlloc and not yet freed."""
        return self._read_counters()[-1]

    def reset_calls(self) -> None:
        # Rewritten in place: running processes have the file mapped, a replaced file would
        # leave them counting into the old inode. The GPM sample balance is kept.
        with self.counters_path.open("r+b") as f:
            f.write(bytes(8 * len(SYMBOLS)))

    # ---- config file ----

    def apply(self) -> None:
        """Publishes the model atomically; the library reloads it on its next call."""
        text = "\n".join(self._render()) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".nvml-stub-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        Path(tmp).replace(self.config_path)

    def _render(self) -> Iterator[str]:
        yield f"g device_count {len(self.devices)}"
        yield f"g driver_version {self.driver_version}"
        yield f"g nvml_version {self.nvml_version}"
        yield f"g cuda_driver_version {self.cuda_driver_version}"
        # The library applies the first matching rule, so narrower rules go first.
        for kind, rules in (("fault", self._faults), ("delay", self._delays)):
            for (function, device), value in sorted(rules.items(), key=_rule_order):
                yield f"{kind} {function} {'*' if device is None else device} {value}"
        yield from self._cost_lines
        for e in self._events:
            yield (
                f"event {e.seq} {e.device} {e.event_type} {e.data} "
                f"{e.gpu_instance_id} {e.compute_instance_id}"
            )
        for d in self.devices:
            yield from _render_device(d)


def _check_symbol(function: str) -> str:
    if function != "*" and function not in SYMBOLS:
        raise ValueError(f"unknown NVML symbol {function!r}")
    return function


def _rule_order(item: tuple[tuple[str, int | None], int]) -> tuple[bool, bool]:
    (function, device), _ = item
    return (function == "*", device is None)


# nvmlSamplingType_t -> the Device list nvmlDeviceGetSamples serves for it.
_SAMPLE_LISTS = {
    GPU_UTILIZATION_SAMPLES: "gpu_utilization_samples",
    MEMORY_UTILIZATION_SAMPLES: "memory_utilization_samples",
    ENC_UTILIZATION_SAMPLES: "encoder_utilization_samples",
    DEC_UTILIZATION_SAMPLES: "decoder_utilization_samples",
}


def _render_device(d: Device) -> Iterator[str]:
    i = d.index
    scalars: dict[str, object] = {
        "name": d.name,
        "uuid": d.uuid,
        "serial": d.serial,
        "vbios_version": d.vbios_version,
        "brand": d.brand,
        "architecture": d.architecture,
        "minor_number": d.minor_number,
        "cuda_cc_major": d.cuda_compute_capability[0],
        "cuda_cc_minor": d.cuda_compute_capability[1],
        "persistence_mode": d.persistence_mode,
        "compute_mode": d.compute_mode,
        "pci_domain": d.pci_domain,
        "pci_bus": d.pci_bus,
        "pci_device": d.pci_device,
        "pci_device_id": d.pci_device_id,
        "pci_subsystem_id": d.pci_subsystem_id,
        "pci_bus_id": d.pci_bus_id,
        "pci_bus_id_legacy": d.pci_bus_id_legacy,
        "utilization_gpu": d.utilization_gpu,
        "utilization_memory": d.utilization_memory,
        "memory_total": d.memory_total,
        "memory_reserved": d.memory_reserved,
        "memory_used": d.memory_used,
        "memory_free": d.memory_free,
        "bar1_total": d.bar1_total,
        "bar1_used": d.bar1_used,
        "bar1_free": d.bar1_free,
        "temperature.0": d.temperature_gpu,
        "power_usage": d.power_usage,
        "power_limit": d.power_limit,
        "power_limit_enforced": d.power_limit_enforced,
        "power_limit_default": d.power_limit_default,
        "power_limit_min": d.power_limit_min,
        "power_limit_max": d.power_limit_max,
        "energy": d.energy,
        "performance_state": d.performance_state,
        "clocks_event_reasons": d.clocks_event_reasons,
        "encoder_utilization": d.encoder_utilization,
        "encoder_sampling_period": d.encoder_sampling_period,
        "decoder_utilization": d.decoder_utilization,
        "decoder_sampling_period": d.decoder_sampling_period,
        "encoder_session_count": d.encoder_session_count,
        "encoder_average_fps": d.encoder_average_fps,
        "encoder_average_latency": d.encoder_average_latency,
        "ecc_mode_current": d.ecc_mode_current,
        "ecc_mode_pending": d.ecc_mode_pending,
        "pcie_link_gen_current": d.pcie_link_gen_current,
        "pcie_link_gen_max": d.pcie_link_gen_max,
        "pcie_link_width_current": d.pcie_link_width_current,
        "pcie_link_width_max": d.pcie_link_width_max,
        f"pcie_throughput.{PCIE_UTIL_TX_BYTES}": d.pcie_tx_throughput,
        f"pcie_throughput.{PCIE_UTIL_RX_BYTES}": d.pcie_rx_throughput,
        "pcie_replay_counter": d.pcie_replay_counter,
        # A real H200 answers 0 while MIG is off.
        "max_mig_device_count": d.max_mig_devices if d.mig_mode else 0,
        "supported_event_types": d.supported_event_types,
        "gpm_supported": int(d.gpm_supported),
        "samples_capacity": d.sample_capacity,
        "process_utilization_supported": 1,
    }
    for sampling_type in _SAMPLE_LISTS:
        scalars[f"samples_supported.{sampling_type}"] = 1
    if d.mig_supported:
        scalars["mig_mode_current"] = scalars["mig_mode_pending"] = int(d.mig_mode)
    if d.retired_pages_supported:
        scalars["retired_pages_supported"] = 1
    if d.remapped_rows_supported:
        for key, rows in zip(
            ("correctable", "uncorrectable", "pending", "failure"), d.remapped_rows, strict=True
        ):
            scalars[f"remapped_rows_{key}"] = rows
    for threshold, celsius in d.temperature_thresholds.items():
        scalars[f"temperature_threshold.{threshold}"] = celsius
    for (ctype, clock_id), mhz in d.clocks.items():
        scalars[f"clock.{ctype}.{clock_id}"] = mhz
    for ctype, mhz in d.max_clocks.items():
        scalars[f"max_clock.{ctype}"] = mhz
    for (error_type, counter_type), errors in d.ecc_errors.items():
        scalars[f"ecc_errors.{error_type}.{counter_type}"] = errors
    if d.fan_speeds:
        scalars["num_fans"] = len(d.fan_speeds)
        for fan, speed in enumerate(d.fan_speeds):
            scalars[f"fan.{fan}"] = speed
    if d.nvlinks:
        scalars["nvlink_count"] = len(d.nvlinks)
        for link, nv in enumerate(d.nvlinks):
            scalars[f"nvlink_state.{link}"] = int(nv.active)
    for key, value in scalars.items():
        yield f"d {i} {key} {value}"

    for p in d.processes:
        kind = "c" if p.kind == "compute" else "g"
        yield (
            f"proc {i} {p.pid} {p.used_gpu_memory} {kind} "
            f"{p.gpu_instance_id} {p.compute_instance_id}"
        )
        yield f"pname {p.pid} {p.name}"
    for s in d.process_samples:
        yield (
            f"putil {i} {s.pid} {s.timestamp} {s.sm_util} {s.mem_util} {s.enc_util} {s.dec_util}"
        )
    for sampling_type, attr in _SAMPLE_LISTS.items():
        for sample in getattr(d, attr):
            yield f"sample {i} {sampling_type} {sample.timestamp} {sample.value}"
    for page in d.retired_pages:
        yield f"retired {i} {page.cause} {page.address} {page.timestamp}"
    for (fid, scope), fv in d.field_values().items():
        yield f"field {i} {fid} {'*' if scope is None else scope} {fv.value_type} {fv.value!r}"
    if d.gpm_supported:
        for metric, value in d.gpm_metrics.items():
            yield f"gpm {i} * {metric} {value!r}"
    if d.mig_mode:
        for m, mig in enumerate(d.mig_devices):
            for key, value in (
                ("uuid", mig.uuid),
                ("name", mig.name),
                ("gpu_instance_id", mig.gpu_instance_id),
                ("compute_instance_id", mig.compute_instance_id),
                ("memory_total", mig.memory_total),
                ("memory_reserved", mig.memory_reserved),
                ("memory_used", mig.memory_used),
                ("memory_free", mig.memory_free),
            ):
                yield f"m {i} {m} {key} {value}"
            if d.gpm_supported:
                for metric, value in mig.gpm_metrics.items():
                    yield f"gpm {i} {mig.gpu_instance_id} {metric} {value!r}"
