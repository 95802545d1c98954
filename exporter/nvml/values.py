"""NVML's vocabulary besides return codes: the enumerations and field ids of nvml.h that the
collectors use, and the values a driver answers with, in NVML's own units."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Enumerations from nvml.h that the collectors use.
TEMPERATURE_GPU = 0
THRESHOLD_SHUTDOWN, THRESHOLD_SLOWDOWN, THRESHOLD_MEM_MAX, THRESHOLD_GPU_MAX = 0, 1, 2, 3
CLOCK_GRAPHICS, CLOCK_SM, CLOCK_MEM, CLOCK_VIDEO = 0, 1, 2, 3
PSTATE_UNKNOWN = 32
PCIE_TX_BYTES, PCIE_RX_BYTES = 0, 1
GPU_UTILIZATION_SAMPLES, MEMORY_UTILIZATION_SAMPLES = 1, 2
ENC_UTILIZATION_SAMPLES, DEC_UTILIZATION_SAMPLES = 3, 4

# Field ids for nvmlDeviceGetFieldValues (nvml.h NVML_FI_*).
FI_ECC_SBE_VOL_TOTAL, FI_ECC_DBE_VOL_TOTAL, FI_ECC_SBE_AGG_TOTAL, FI_ECC_DBE_AGG_TOTAL = 3, 4, 5, 6
FI_RETIRED_SBE, FI_RETIRED_DBE, FI_RETIRED_PENDING = 29, 30, 31
FI_PERF_POLICY_POWER, FI_PERF_POLICY_THERMAL, FI_PERF_POLICY_SYNC_BOOST = 74, 75, 76
FI_PERF_POLICY_BOARD_LIMIT, FI_PERF_POLICY_LOW_UTILIZATION, FI_PERF_POLICY_RELIABILITY = 77, 78, 79
FI_MEMORY_TEMP = 82
FI_TOTAL_ENERGY_CONSUMPTION = 83
FI_NVLINK_LINK_COUNT = 91
FI_PCIE_REPLAY_COUNTER = 94
FI_NVLINK_THROUGHPUT_DATA_TX, FI_NVLINK_THROUGHPUT_DATA_RX = 138, 139
FI_REMAPPED_COR, FI_REMAPPED_UNC, FI_REMAPPED_PENDING, FI_REMAPPED_FAILURE = 142, 143, 144, 145
FI_NVLINK_ERROR_DL_REPLAY, FI_NVLINK_ERROR_DL_RECOVERY, FI_NVLINK_ERROR_DL_CRC = 161, 162, 163
FI_NVLINK_GET_STATE = 165
FI_PCIE_COUNT_CORRECTABLE_ERRORS = 173
# Power in mW: the 1 s average (what nvmlDeviceGetPowerUsage returns on Ampere, except GA100,
# and newer), the instantaneous draw, and the enforced limit (nvmlDeviceGetEnforcedPowerLimit).
FI_POWER_AVERAGE, FI_POWER_INSTANT, FI_POWER_CURRENT_LIMIT = 185, 186, 190
FI_PCIE_COUNT_TX_BYTES, FI_PCIE_COUNT_RX_BYTES = 197, 198
FI_CLOCKS_EVENT_SW_THERM_SLOWDOWN = 269
FI_CLOCKS_EVENT_HW_THERM_SLOWDOWN = 270
FI_CLOCKS_EVENT_HW_POWER_BRAKE_SLOWDOWN = 271
# nvmlDeviceArchitecture_t, as the GPU's `architecture` label says it.
ARCHITECTURES = {
    2: "kepler",
    3: "maxwell",
    4: "pascal",
    5: "volta",
    6: "turing",
    7: "ampere",
    8: "ada",
    9: "hopper",
    10: "blackwell",
    13: "rubin",
}


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    used: int
    free: int
    reserved: int | None  # only the v2 call reports it


@dataclass(frozen=True)
class Utilization:
    gpu: int  # percent of the sample period a kernel ran
    memory: int  # percent of the sample period device memory was read or written


@dataclass(frozen=True)
class Bar1Memory:
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class EncoderStats:
    sessions: int
    average_fps: int
    average_latency_us: int


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    used_memory: int | None  # bytes; None where NVML cannot tell
    gpu_instance: int | None  # MIG placement; None on a GPU without MIG
    compute_instance: int | None


@dataclass(frozen=True)
class ProcessSample:
    """One process's utilization over one driver sample period, in percent."""

    pid: int
    timestamp_us: int
    sm: int
    memory: int
    encoder: int
    decoder: int


@dataclass(frozen=True)
class MigInstance:
    handle: Any
    uuid: str
    gpu_instance: int
    compute_instance: int
    profile: str  # e.g. "1g.18gb"


@dataclass(frozen=True)
class NvmlEvent:
    uuid: str  # the GPU it happened on
    type: int  # an nvmlEventType* bit
    data: int  # the XID, for XID events


EVENT_SINGLE_BIT_ECC, EVENT_DOUBLE_BIT_ECC, EVENT_PSTATE = 0x1, 0x2, 0x4
EVENT_XID = 0x8


# One entry of nvmlDeviceGetFieldValues: its own return code, and the value when it is SUCCESS.
FieldResult = tuple[int, float | None]
FieldRequest = tuple[int, int]  # (field id, scope id: an NVLink index, or 0)

Handle = Any
