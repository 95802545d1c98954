"""The one place that talks to NVML, and the one place that decides what its errors mean.

`Driver` is the narrow surface the exporter needs, in NVML's raw units (mW, mJ, MHz, percent).
`PynvmlDriver` implements it with `pynvml` (the only import of it in the project);
`exporter.simulate.SimulatedDriver` implements it with a simulated fleet.

`Device.read` applies the error policy for every call, whichever driver is behind it:
- NOT_SUPPORTED, FUNCTION_NOT_FOUND, NO_PERMISSION, ARGUMENT_VERSION_MISMATCH: the value is absent;
  remembered per device and call, so it is not attempted again every interval, but asked once
  more every REPROBE_SECONDS, and forgotten when the GPU is lost (it is read afresh once back);
- GPU_IS_LOST, RESET_REQUIRED, GPU_NOT_FOUND: the device is down (`DeviceLost`);
- anything else: the value is absent this time, counted as an error, logged once.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pynvml

log = logging.getLogger(__name__)

# NVML return codes, spelled once here so that the simulated backend speaks the same language.
SUCCESS = 0
UNINITIALIZED = 1
INVALID_ARGUMENT = 2
NOT_SUPPORTED = 3
NO_PERMISSION = 4
NOT_FOUND = 6
INSUFFICIENT_SIZE = 7
DRIVER_NOT_LOADED = 9
TIMEOUT = 10
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
RESET_REQUIRED = 16
LIB_RM_VERSION_MISMATCH = 18
NO_DATA = 21
ARGUMENT_VERSION_MISMATCH = 25
DEPRECATED = 26
GPU_NOT_FOUND = 28
UNKNOWN = 999

ABSENT_CODES = frozenset(
    {NOT_SUPPORTED, FUNCTION_NOT_FOUND, NO_PERMISSION, ARGUMENT_VERSION_MISMATCH, DEPRECATED}
)
LOST_CODES = frozenset({GPU_IS_LOST, RESET_REQUIRED, GPU_NOT_FOUND})
# The library as a whole stopped working (driver unloaded or upgraded under us).
SESSION_CODES = frozenset({UNINITIALIZED, DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH})
# "Nothing to report right now", not a failure.
NO_VALUE_CODES = frozenset({NOT_FOUND, NO_DATA})

# Every code pynvml knows, by its nvml.h name: NVML_ERROR_GPU_IS_LOST -> "gpu_is_lost".
_ERROR_NAMES: dict[int, str] = {
    int(value): name.removeprefix("NVML_ERROR_").lower()
    for name, value in vars(pynvml).items()
    if name.startswith("NVML_ERROR_") and isinstance(value, int)
}

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
# Power in mW: the 1 s average (what nvmlDeviceGetPowerUsage returns on Ampere, except GA100,
# and newer), the instantaneous draw, and the enforced limit (nvmlDeviceGetEnforcedPowerLimit).
FI_POWER_AVERAGE, FI_POWER_INSTANT, FI_POWER_CURRENT_LIMIT = 185, 186, 190
FI_PCIE_COUNT_TX_BYTES, FI_PCIE_COUNT_RX_BYTES = 197, 198
FI_CLOCKS_EVENT_SW_THERM_SLOWDOWN = 269
FI_CLOCKS_EVENT_HW_THERM_SLOWDOWN = 270
FI_CLOCKS_EVENT_HW_POWER_BRAKE_SLOWDOWN = 271

# Fields a driver answers slowly: on an H200 with driver 580, each of the first five costs 0.15
# to 4.1 ms of CPU (energy 4.1 ms; the thermal and power-brake timers ~0.56 ms each; the PCIe
# replay counter ~0.18 ms) where most fields cost ~5 us (benchmarks/data/h200-costs.json). All
# are counters that rarely need second resolution, so they join the batch only every
# `sampling.slow_fields_interval` (default SLOW_FIELD_SECONDS) and their last answer stands in
# between. NVLink's error counters are here on the same reasoning, their cost unmeasured (that
# GPU had no NVLink).
SLOW_FIELDS = frozenset(
    {
        FI_TOTAL_ENERGY_CONSUMPTION,
        FI_PERF_POLICY_THERMAL,
        FI_CLOCKS_EVENT_HW_THERM_SLOWDOWN,
        FI_CLOCKS_EVENT_HW_POWER_BRAKE_SLOWDOWN,
        FI_PCIE_REPLAY_COUNTER,
        FI_NVLINK_ERROR_DL_REPLAY,
        FI_NVLINK_ERROR_DL_RECOVERY,
        FI_NVLINK_ERROR_DL_CRC,
    }
)
SLOW_FIELD_SECONDS = 10.0
# How long an "absent" answer (NOT_SUPPORTED and the other ABSENT_CODES) stands before the call,
# field or GPM metric is asked once more, in the sampler's clock. Most such answers are for good
# (fans on an SXM board), so asking every sample would be waste; but some are not: a driver can
# answer NOT_SUPPORTED while a GPU is being reconfigured or recovering, and a value that becomes
# supported must come back without a restart. One call per capability per period keeps what
# stays unsupported cheap, and a value that comes back is missing for at most this long.
REPROBE_SECONDS = 30.0
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


def error_name(code: int) -> str:
    return _ERROR_NAMES.get(code, f"error_{code}")


class NvmlError(Exception):
    """An NVML return code other than SUCCESS, from either driver."""

    def __init__(self, code: int, function: str = "") -> None:
        super().__init__(f"{function or 'NVML'}: {error_name(code)} ({code})")
        self.code = code
        self.function = function


class SessionLost(Exception):
    """NVML as a whole stopped answering; it must be initialised again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DeviceLost(Exception):
    """The device stopped answering (fell off the bus, needs a reset)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def error_code(exc: BaseException) -> int | None:
    """The NVML return code an exception stands for, or None if it is not an NVML error."""
    return exc.code if isinstance(exc, NvmlError) else None


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

P = ParamSpec("P")
T = TypeVar("T")


class Driver(Protocol):
    """What the exporter needs from NVML, in NVML's own units."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def cuda_driver_version(self) -> int: ...
    def device_count(self) -> int: ...
    def device_handle(self, index: int) -> Handle: ...
    def uuid(self, handle: Handle) -> str: ...
    def name(self, handle: Handle) -> str: ...
    def pci_bus_id(self, handle: Handle) -> str: ...
    def serial(self, handle: Handle) -> str: ...
    def vbios_version(self, handle: Handle) -> str: ...
    def architecture(self, handle: Handle) -> int: ...
    def minor_number(self, handle: Handle) -> int: ...
    def utilization(self, handle: Handle) -> Utilization: ...
    def memory(self, handle: Handle) -> MemoryInfo: ...
    def temperature(self, handle: Handle, sensor: int) -> int: ...
    def power_usage(self, handle: Handle) -> int: ...
    def enforced_power_limit(self, handle: Handle) -> int: ...
    def total_energy(self, handle: Handle) -> int: ...
    def clock(self, handle: Handle, clock_type: int) -> int: ...
    def fan_count(self, handle: Handle) -> int: ...
    def fan_speed(self, handle: Handle, fan: int) -> int: ...
    def performance_state(self, handle: Handle) -> int: ...
    def field_values(
        self, handle: Handle, requests: Sequence[FieldRequest]
    ) -> list[FieldResult]: ...
    def samples(
        self, handle: Handle, sample_type: int, since_us: int
    ) -> list[tuple[int, float]]: ...
    def clocks_event_reasons(self, handle: Handle) -> int: ...
    def power_limit_default(self, handle: Handle) -> int: ...
    def power_limit_constraints(self, handle: Handle) -> tuple[int, int]: ...
    def temperature_threshold(self, handle: Handle, threshold: int) -> int: ...
    def pcie_link_generation(self, handle: Handle) -> int: ...
    def pcie_link_width(self, handle: Handle) -> int: ...
    def pcie_max_link_generation(self, handle: Handle) -> int: ...
    def pcie_max_link_width(self, handle: Handle) -> int: ...
    def pcie_throughput(self, handle: Handle, counter: int) -> int: ...
    def encoder_utilization(self, handle: Handle) -> int: ...
    def decoder_utilization(self, handle: Handle) -> int: ...
    def encoder_stats(self, handle: Handle) -> EncoderStats: ...
    def bar1_memory(self, handle: Handle) -> Bar1Memory: ...
    def persistence_mode(self, handle: Handle) -> int: ...
    def compute_mode(self, handle: Handle) -> int: ...
    def mig_mode(self, handle: Handle) -> tuple[int, int]: ...
    def ecc_mode(self, handle: Handle) -> tuple[int, int]: ...
    def compute_processes(self, handle: Handle) -> list[ProcessInfo]: ...
    def graphics_processes(self, handle: Handle) -> list[ProcessInfo]: ...
    def process_utilization(self, handle: Handle, since_us: int) -> list[ProcessSample]: ...
    def process_name(self, pid: int) -> str: ...
    def mig_instances(self, handle: Handle) -> list[MigInstance]: ...
    def supported_events(self, handle: Handle) -> int: ...
    def create_event_set(self) -> Handle: ...
    def register_events(self, handle: Handle, event_set: Handle, types: int) -> None: ...
    def wait_event(self, event_set: Handle, timeout_ms: int) -> NvmlEvent | None: ...
    def free_event_set(self, event_set: Handle) -> None: ...
    def gpm_supported(self, handle: Handle) -> bool: ...
    def gpm_sample_alloc(self) -> Handle: ...
    def gpm_sample_free(self, sample: Handle) -> None: ...
    def gpm_sample_get(self, handle: Handle, sample: Handle) -> bool: ...
    def gpm_mig_sample_get(self, handle: Handle, gpu_instance: int, sample: Handle) -> bool: ...
    def gpm_metrics(
        self, first: Handle, second: Handle, metric_ids: Sequence[int]
    ) -> list[tuple[int, float | None]]: ...


# Per-device calls by name: what a simulated `unsupported` or `slow` fault may target.
DEVICE_CALLS = tuple(
    name
    for name, member in vars(Driver).items()
    if callable(member) and "handle" in inspect.signature(member).parameters
)


def binding_version() -> str:
    try:
        return metadata.version("nvidia-ml-py")
    except metadata.PackageNotFoundError:
        return "unknown"


def _converting_errors(method: Callable[P, T]) -> Callable[P, T]:
    """pynvml's exceptions become NvmlError here, so that nothing above this driver needs to
    know pynvml's exception types."""

    @functools.wraps(method)
    def converting(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except pynvml.NVMLError as err:
            raise NvmlError(int(err.value), method.__name__) from err
        except pynvml.NVMLLibraryMismatchError as err:
            # pynvml raises this instead of FunctionNotFound for some unversioned wrappers.
            raise NvmlError(FUNCTION_NOT_FOUND, method.__name__) from err

    return converting


class PynvmlDriver:
    """`Driver` over the real library through pynvml's ctypes bindings."""

    def __init__(self) -> None:
        # Which variant of a versioned call works with the installed driver, learned once.
        self._variant: dict[str, int] = {}
        # Field-value request arrays, prebuilt per request list: (array type, its bytes, the
        # layout of the answer).
        self._field_templates: dict[tuple[FieldRequest, ...], tuple[Any, bytes, struct.Struct]] = {}
        self._functions: dict[str, Any] = {}
        # GPM metric requests, prebuilt per metric list: (its bytes, the answer's layout).
        self._gpm_templates: dict[tuple[int, ...], tuple[bytes, struct.Struct]] = {}
        self._variant_lock = threading.Lock()
        # Entries of each driver sample buffer, by (device, sampling type), learned once.
        self._sample_capacity: dict[tuple[int | None, int], int] = {}
        # Process-list buffer sizes by (device, symbol), grown when a list does not fit.
        self._process_capacity: dict[tuple[int | None, str], int] = {}

    def _first_working(self, name: str, variants: Sequence[Callable[[], Any]]) -> Any:
        """Calls the newest variant the library has; older drivers lack the versioned symbols."""
        index = self._variant.get(name, 0)
        while True:
            try:
                return variants[index]()
            except AttributeError:
                # An older nvidia-ml-py lacks the wrapper for the newer call altogether.
                if index + 1 >= len(variants):
                    raise NvmlError(FUNCTION_NOT_FOUND, name) from None
            except pynvml.NVMLError as err:
                retryable = err.value in (FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH)
                if not retryable or index + 1 >= len(variants):
                    raise
            index += 1
            with self._variant_lock:
                self._variant[name] = index

    @_converting_errors
    def init(self) -> None:
        pynvml.nvmlInit()
        # Buffer sizes are per handle, and handles do not outlive a session.
        self._sample_capacity.clear()
        self._process_capacity.clear()
        # A session starts after the driver was (re)loaded, perhaps a different one: which
        # variant of a versioned call it takes is learned again, at one failed call each.
        with self._variant_lock:
            self._variant.clear()

    @_converting_errors
    def shutdown(self) -> None:
        pynvml.nvmlShutdown()

    @_converting_errors
    def driver_version(self) -> str:
        return str(pynvml.nvmlSystemGetDriverVersion())

    @_converting_errors
    def cuda_driver_version(self) -> int:
        return int(pynvml.nvmlSystemGetCudaDriverVersion())

    @_converting_errors
    def device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    @_converting_errors
    def device_handle(self, index: int) -> Handle:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    @_converting_errors
    def uuid(self, handle: Handle) -> str:
        return str(pynvml.nvmlDeviceGetUUID(handle))

    @_converting_errors
    def name(self, handle: Handle) -> str:
        return str(pynvml.nvmlDeviceGetName(handle))

    @_converting_errors
    def pci_bus_id(self, handle: Handle) -> str:
        bus_id = pynvml.nvmlDeviceGetPciInfo(handle).busId
        return bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)

    @_converting_errors
    def serial(self, handle: Handle) -> str:
        return str(pynvml.nvmlDeviceGetSerial(handle))

    @_converting_errors
    def vbios_version(self, handle: Handle) -> str:
        return str(pynvml.nvmlDeviceGetVbiosVersion(handle))

    @_converting_errors
    def architecture(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetArchitecture(handle))

    @_converting_errors
    def minor_number(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetMinorNumber(handle))

    @_converting_errors
    def utilization(self, handle: Handle) -> Utilization:
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return Utilization(gpu=int(rates.gpu), memory=int(rates.memory))

    @_converting_errors
    def memory(self, handle: Handle) -> MemoryInfo:
        info = self._first_working(
            "memory",
            (
                lambda: pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2),
                lambda: pynvml.nvmlDeviceGetMemoryInfo(handle),
            ),
        )
        return MemoryInfo(
            total=int(info.total),
            used=int(info.used),
            free=int(info.free),
            reserved=int(info.reserved) if hasattr(info, "reserved") else None,
        )

    @_converting_errors
    def temperature(self, handle: Handle, sensor: int) -> int:
        return int(
            self._first_working(
                "temperature",
                (
                    lambda: pynvml.nvmlDeviceGetTemperatureV(handle, sensor),
                    lambda: pynvml.nvmlDeviceGetTemperature(handle, sensor),
                ),
            )
        )

    @_converting_errors
    def power_usage(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetPowerUsage(handle))

    @_converting_errors
    def enforced_power_limit(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))

    @_converting_errors
    def total_energy(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))

    def clock(self, handle: Handle, clock_type: int) -> int:
        return self._scalar("nvmlDeviceGetClockInfo", ctypes.c_uint, handle, clock_type)

    @_converting_errors
    def fan_count(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetNumFans(handle))

    @_converting_errors
    def fan_speed(self, handle: Handle, fan: int) -> int:
        return int(pynvml.nvmlDeviceGetFanSpeed_v2(handle, fan))

    def performance_state(self, handle: Handle) -> int:
        return self._scalar("nvmlDeviceGetPerformanceState", ctypes.c_uint, handle)

    def field_values(self, handle: Handle, requests: Sequence[FieldRequest]) -> list[FieldResult]:
        """One nvmlDeviceGetFieldValues call. Not through pynvml's wrapper: it fills and decodes
        every entry through ctypes attribute access, several microseconds per entry, which for
        the ~130 fields of a GPU cost more than the call. Here the request array is built once
        per request list and the answers are decoded from the raw bytes."""
        key = requests if isinstance(requests, tuple) else tuple(requests)
        template = self._field_templates.get(key)
        if template is None:
            if len(self._field_templates) > 64:  # request lists differ only by mode changes
                self._field_templates.clear()
            array_type = pynvml.c_nvmlFieldValue_t * len(key)
            blank = array_type()
            for slot, (field_id, scope) in enumerate(key):
                blank[slot].fieldId = field_id
                blank[slot].scopeId = scope
            answer = struct.Struct("<" + _FIELD_ANSWER * len(key))
            template = self._field_templates[key] = (array_type, bytes(blank), answer)
        array_type, raw, answer = template
        array = array_type.from_buffer_copy(raw)
        call = self._function("nvmlDeviceGetFieldValues")
        ret = call(handle, ctypes.c_int32(len(key)), ctypes.byref(array))
        if ret != SUCCESS:
            raise NvmlError(ret, "nvmlDeviceGetFieldValues")
        return _decode_fields(answer.unpack_from(array))

    def _scalar(self, name: str, kind: type[Any], handle: Handle, *args: int) -> int:
        """A call that answers one integer through its last argument, without pynvml's
        wrapper: these are most of a sample's calls, and the wrapper's lock and conversions
        cost more than the call itself."""
        out = kind()
        ret = self._function(name)(handle, *args, ctypes.byref(out))
        if ret != SUCCESS:
            raise NvmlError(ret, name)
        return int(out.value)

    def _function(self, name: str) -> Any:
        """A C function of the library, looked up once: pynvml's lookup takes a lock on every
        call, and the library stays loaded for the life of the process, across nvmlShutdown."""
        function = self._functions.get(name)
        if function is None:
            try:
                function = self._functions[name] = pynvml._nvmlGetFunctionPointer(name)
            except pynvml.NVMLError as err:
                raise NvmlError(int(err.value), name) from err
        return function

    def samples(self, handle: Handle, sample_type: int, since_us: int) -> list[tuple[int, float]]:
        """One nvmlDeviceGetSamples call where pynvml's wrapper makes two.

        pynvml asks for the size with a NULL buffer on every call. Public code built on NVML
        reads that answer as the size of the driver's sample buffer for the type (about 100),
        which does not change (not checked on a GPU here): it is asked once per device and type,
        with timestamp 0 and a floor of MIN_SAMPLE_CAPACITY, and every later call passes a
        buffer that holds it all; an answer that does not fit, or fills the buffer exactly,
        grows it and is asked once more. NOT_FOUND (nothing newer than `since_us`) means no
        samples, as before.
        """
        key = (_handle_key(handle), sample_type)
        fn = self._function("nvmlDeviceGetSamples")
        c_type = ctypes.c_uint(sample_type)
        c_since = ctypes.c_ulonglong(since_us)
        value_type = ctypes.c_uint(0)
        count = ctypes.c_uint(0)
        capacity = self._sample_capacity.get(key)
        if capacity is None:
            # Asked with timestamp 0, so even a driver that sized its answer by the samples
            # newer than the timestamp would give the whole buffer; and never below a floor.
            zero = ctypes.c_ulonglong(0)
            ret = fn(handle, c_type, zero, ctypes.byref(value_type), ctypes.byref(count), None)
            if ret not in (SUCCESS, NOT_FOUND):
                raise NvmlError(ret, "nvmlDeviceGetSamples")
            capacity = max(MIN_SAMPLE_CAPACITY, count.value if ret == SUCCESS else 0)
            self._sample_capacity[key] = capacity
        for retry in (False, True):
            array = (pynvml.c_nvmlSample_t * capacity)()
            count.value = capacity
            ret = fn(handle, c_type, c_since, ctypes.byref(value_type), ctypes.byref(count), array)
            full = ret == SUCCESS and count.value >= capacity
            if retry or not (ret == INSUFFICIENT_SIZE or full):
                break
            # The buffer grew, or a full answer may have been cut short: once more with room to
            # spare (the driver's buffer does not change under a running driver, so this is rare).
            capacity = self._sample_capacity[key] = max(count.value, 2 * capacity)
        if ret == NOT_FOUND:  # no sample newer than `since_us`: not an error
            return []
        if ret != SUCCESS:
            raise NvmlError(ret, "nvmlDeviceGetSamples")
        layout = _UNION_LAYOUTS.get(value_type.value, _UNION_LAYOUTS[1])
        raw = ctypes.string_at(array, _SAMPLE_ENTRY.size * min(count.value, capacity))
        return [
            (timestamp, float(layout.unpack_from(value)[0]))
            for timestamp, value in _SAMPLE_ENTRY.iter_unpack(raw)
        ]

    def clocks_event_reasons(self, handle: Handle) -> int:
        return self._scalar("nvmlDeviceGetCurrentClocksEventReasons", ctypes.c_ulonglong, handle)

    @_converting_errors
    def power_limit_default(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle))

    @_converting_errors
    def power_limit_constraints(self, handle: Handle) -> tuple[int, int]:
        low, high = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        return int(low), int(high)

    @_converting_errors
    def temperature_threshold(self, handle: Handle, threshold: int) -> int:
        return int(pynvml.nvmlDeviceGetTemperatureThreshold(handle, threshold))

    @_converting_errors
    def pcie_link_generation(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))

    @_converting_errors
    def pcie_link_width(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle))

    @_converting_errors
    def pcie_max_link_generation(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle))

    @_converting_errors
    def pcie_max_link_width(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle))

    @_converting_errors
    def pcie_throughput(self, handle: Handle, counter: int) -> int:
        return int(pynvml.nvmlDeviceGetPcieThroughput(handle, counter))

    @_converting_errors
    def encoder_utilization(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetEncoderUtilization(handle)[0])

    @_converting_errors
    def decoder_utilization(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetDecoderUtilization(handle)[0])

    @_converting_errors
    def encoder_stats(self, handle: Handle) -> EncoderStats:
        sessions, fps, latency = pynvml.nvmlDeviceGetEncoderStats(handle)
        return EncoderStats(int(sessions), int(fps), int(latency))

    @_converting_errors
    def bar1_memory(self, handle: Handle) -> Bar1Memory:
        info = pynvml.nvmlDeviceGetBAR1MemoryInfo(handle)
        return Bar1Memory(int(info.bar1Total), int(info.bar1Used), int(info.bar1Free))

    @_converting_errors
    def persistence_mode(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetPersistenceMode(handle))

    @_converting_errors
    def compute_mode(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetComputeMode(handle))

    @_converting_errors
    def mig_mode(self, handle: Handle) -> tuple[int, int]:
        current, pending = pynvml.nvmlDeviceGetMigMode(handle)
        return int(current), int(pending)

    @_converting_errors
    def ecc_mode(self, handle: Handle) -> tuple[int, int]:
        current, pending = pynvml.nvmlDeviceGetEccMode(handle)
        return int(current), int(pending)

    def compute_processes(self, handle: Handle) -> list[ProcessInfo]:
        return self._running_processes(handle, "nvmlDeviceGetComputeRunningProcesses_v3")

    def graphics_processes(self, handle: Handle) -> list[ProcessInfo]:
        return self._running_processes(handle, "nvmlDeviceGetGraphicsRunningProcesses_v3")

    def _running_processes(self, handle: Handle, symbol: str) -> list[ProcessInfo]:
        """One call where pynvml's wrapper makes two (size, then data) whenever a process runs:
        the buffer is allocated with room for PROCESS_BUFFER processes and grown, remembered
        per device, when the driver answers INSUFFICIENT_SIZE with the count it needs."""
        key = (_handle_key(handle), symbol)
        fn = self._function(symbol)
        capacity = self._process_capacity.get(key, PROCESS_BUFFER)
        for _ in range(3):
            array = (pynvml.c_nvmlProcessInfo_v3_t * capacity)()
            count = ctypes.c_uint(capacity)
            ret = fn(handle, ctypes.byref(count), array)
            if ret == SUCCESS:
                raw = ctypes.string_at(array, _PROCESS_ENTRY.size * min(count.value, capacity))
                return [_process_entry(*entry) for entry in _PROCESS_ENTRY.iter_unpack(raw)]
            if ret != INSUFFICIENT_SIZE:
                raise NvmlError(ret, symbol)
            # Oversized like pynvml's wrapper, for processes starting meanwhile.
            capacity = self._process_capacity[key] = max(2 * capacity, 2 * count.value + 5)
        raise NvmlError(INSUFFICIENT_SIZE, symbol)

    @_converting_errors
    def process_utilization(self, handle: Handle, since_us: int) -> list[ProcessSample]:
        try:
            entries = pynvml.nvmlDeviceGetProcessUtilization(handle, since_us)
        except pynvml.NVMLError as err:
            # NOT_FOUND: no sample newer than `since_us`; SUCCESS: pynvml's wrapper raises it
            # when the size query already finds nothing.
            if err.value in (NOT_FOUND, SUCCESS):
                return []
            raise
        return [
            ProcessSample(
                int(e.pid),
                int(e.timeStamp),
                int(e.smUtil),
                int(e.memUtil),
                int(e.encUtil),
                int(e.decUtil),
            )
            for e in entries
        ]

    @_converting_errors
    def process_name(self, pid: int) -> str:
        return str(pynvml.nvmlSystemGetProcessName(pid))

    @_converting_errors
    def mig_instances(self, handle: Handle) -> list[MigInstance]:
        instances = []
        for index in range(int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
            except pynvml.NVMLError as err:
                if err.value == NOT_FOUND:  # an empty slot
                    continue
                raise
            name = str(pynvml.nvmlDeviceGetName(mig))
            instances.append(
                MigInstance(
                    handle=mig,
                    uuid=str(pynvml.nvmlDeviceGetUUID(mig)),
                    gpu_instance=int(pynvml.nvmlDeviceGetGpuInstanceId(mig)),
                    compute_instance=int(pynvml.nvmlDeviceGetComputeInstanceId(mig)),
                    profile=mig_profile(name),
                )
            )
        return instances

    @_converting_errors
    def supported_events(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetSupportedEventTypes(handle))

    @_converting_errors
    def create_event_set(self) -> Handle:
        return pynvml.nvmlEventSetCreate()

    @_converting_errors
    def register_events(self, handle: Handle, event_set: Handle, types: int) -> None:
        pynvml.nvmlDeviceRegisterEvents(handle, types, event_set)

    @_converting_errors
    def wait_event(self, event_set: Handle, timeout_ms: int) -> NvmlEvent | None:
        try:
            data = pynvml.nvmlEventSetWait_v2(event_set, timeout_ms)
        except pynvml.NVMLError as err:
            if err.value == TIMEOUT:  # nothing happened: the normal case
                return None
            raise
        # The event names its GPU by handle; the UUID is what the rest of the exporter knows.
        uuid = str(pynvml.nvmlDeviceGetUUID(data.device))
        return NvmlEvent(uuid=uuid, type=int(data.eventType), data=int(data.eventData))

    @_converting_errors
    def free_event_set(self, event_set: Handle) -> None:
        pynvml.nvmlEventSetFree(event_set)

    @_converting_errors
    def gpm_supported(self, handle: Handle) -> bool:
        return bool(pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)

    @_converting_errors
    def gpm_sample_alloc(self) -> Handle:
        return pynvml.nvmlGpmSampleAlloc()

    @_converting_errors
    def gpm_sample_free(self, sample: Handle) -> None:
        pynvml.nvmlGpmSampleFree(sample)

    @_converting_errors
    def gpm_sample_get(self, handle: Handle, sample: Handle) -> bool:
        pynvml.nvmlGpmSampleGet(handle, sample)
        return True

    @_converting_errors
    def gpm_mig_sample_get(self, handle: Handle, gpu_instance: int, sample: Handle) -> bool:
        pynvml.nvmlGpmMigSampleGet(handle, gpu_instance, sample)
        return True

    def gpm_metrics(
        self, first: Handle, second: Handle, metric_ids: Sequence[int]
    ) -> list[tuple[int, float | None]]:
        # Prebuilt and decoded from raw bytes, as field values are: pynvml's structure
        # attributes cost microseconds each, for ~40 metrics per GPU per sample.
        key = tuple(metric_ids)
        template = self._gpm_templates.get(key)
        if template is None:
            if len(self._gpm_templates) > 64:
                self._gpm_templates.clear()
            blank = pynvml.c_nvmlGpmMetricsGet_t()
            blank.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            blank.numMetrics = len(key)
            for slot, metric_id in enumerate(key):
                blank.metrics[slot].metricId = metric_id
            metric = pynvml.c_nvmlGpmMetric_t
            code_at, value_at = metric.nvmlReturn.offset, metric.value.offset
            tail = ctypes.sizeof(metric) - value_at - 8
            # (nvmlReturn, value) of each metric asked for.
            answer = struct.Struct(
                f"<{pynvml.c_nvmlGpmMetricsGet_t.metrics.offset}x"
                + f"{code_at}xI{value_at - code_at - 4}xd{tail}x" * len(key)
            )
            template = self._gpm_templates[key] = (bytes(blank), answer)
        raw, answer = template
        request = pynvml.c_nvmlGpmMetricsGet_t.from_buffer_copy(raw)
        request.sample1 = first
        request.sample2 = second
        ret = self._function("nvmlGpmMetricsGet")(ctypes.byref(request))
        if ret != SUCCESS:
            raise NvmlError(ret, "nvmlGpmMetricsGet")
        flat = answer.unpack_from(request)
        # Like field values, each metric carries its own return code.
        return [
            (code, value if code == SUCCESS else None)
            for code, value in zip(flat[::2], flat[1::2], strict=True)
        ]


def mig_profile(name: str) -> str:
    """ "NVIDIA H200 MIG 1g.18gb" -> "1g.18gb"."""
    return name.rsplit(" MIG ", 1)[1] if " MIG " in name else name


# NVML's "not available" for unsigned fields.
_UINT_NA = 0xFFFFFFFF
_ULL_NA = 0xFFFFFFFFFFFFFFFF
# Room for this many processes per list before the first INSUFFICIENT_SIZE.
PROCESS_BUFFER = 64
# Sample entries a samples buffer has room for at least (real drivers keep about 100 per type).
MIN_SAMPLE_CAPACITY = 128


def _process_entry(pid: int, used: int, gi: int, ci: int) -> ProcessInfo:
    return ProcessInfo(
        pid=pid,
        # NVML_VALUE_NOT_AVAILABLE where the driver cannot tell (WDDM on Windows).
        used_memory=None if used == _ULL_NA else used,
        gpu_instance=None if gi == _UINT_NA else gi,
        compute_instance=None if ci == _UINT_NA else ci,
    )


def _field_answer() -> str:
    """Where nvmlFieldValue_t keeps valueType, nvmlReturn (adjacent) and the value union, as a
    struct format: the answer of every entry is read in one unpack."""
    entry = pynvml.c_nvmlFieldValue_t
    type_at, value_at = entry.valueType.offset, entry.value.offset
    assert entry.nvmlReturn.offset == type_at + 4
    return f"{type_at}xII{value_at - type_at - 8}xQ{ctypes.sizeof(entry) - value_at - 8}x"


_FIELD_ANSWER = _field_answer()


def _decode_fields(flat: tuple[int, ...]) -> list[FieldResult]:
    """(code, value) per entry from (valueType, nvmlReturn, raw 64-bit union) triples."""
    results: list[FieldResult] = []
    append = results.append
    triples = iter(flat)
    for value_type, code, raw in zip(triples, triples, triples, strict=True):
        # Each entry carries its own return code; the call's SUCCESS says nothing about it.
        if code != SUCCESS:
            append((code, None))
        elif value_type in (2, 3):  # unsigned long (long): all 64 bits
            append((SUCCESS, raw))
        elif value_type == 1:  # unsigned int: the union's low half; the rest is not ours
            append((SUCCESS, raw & 0xFFFFFFFF))
        else:
            layout = _UNION_LAYOUTS.get(value_type)
            if layout is None:
                append((UNKNOWN, None))
            else:
                append((SUCCESS, layout.unpack_from(raw.to_bytes(8, "little"))[0]))
    return results


def _handle_key(handle: Handle) -> int | None:
    """A device handle as a hashable address (pynvml hands out ctypes pointers)."""
    return ctypes.cast(handle, ctypes.c_void_p).value


# nvmlSample_t: timeStamp, value union.
_SAMPLE_ENTRY = struct.Struct("<Q8s")
# nvmlProcessInfo_v3_t (the same layout as _v2_t): pid, usedGpuMemory, gpuInstanceId,
# computeInstanceId, with padding after pid.
_PROCESS_ENTRY = struct.Struct("<I4xQII")
# nvmlValueType_t -> how the value union holds it (c_ulong is 64-bit on Linux).
_UNION_LAYOUTS = {
    0: struct.Struct("<d"),
    1: struct.Struct("<I"),
    2: struct.Struct("<Q"),
    3: struct.Struct("<Q"),
    4: struct.Struct("<q"),
    5: struct.Struct("<i"),
    6: struct.Struct("<H"),
}


_UNKNOWN = object()
# What a Device remembers an answer under: a call's name (or "field", or a name a collector
# chooses) and its arguments.
_Key = tuple[str, tuple[object, ...]]
_NEVER = float("inf")


@dataclass(frozen=True)
class DeviceIdentity:
    index: int
    uuid: str
    name: str = ""
    pci_bus_id: str = ""
    serial: str = ""
    vbios_version: str = ""
    architecture: str = ""
    minor_number: int | None = None


class Selection(Protocol):
    """Which devices to export (exporter.config.DeviceSelection)."""

    def selects(self, index: int, uuid: str, pci_bus_id: str) -> bool: ...


@dataclass(frozen=True)
class System:
    driver_version: str
    cuda_driver_version: str


class Device:
    """One GPU: its handle, static identity, and the error policy for every read."""

    def __init__(
        self,
        driver: Driver,
        handle: Handle,
        identity: DeviceIdentity,
        system: System = System("", ""),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.driver = driver
        # The sampler's monotonic clock, for what is read less often than every sample.
        self.clock = clock
        self.handle = handle
        self.identity = identity
        self.system = system
        # What answered "absent" -> when it may be asked again (REPROBE_SECONDS on).
        self._absent: dict[_Key, float] = {}
        self._cached: dict[_Key, object] = {}
        self._recent: dict[_Key, tuple[float, object]] = {}
        self._fields: dict[FieldRequest, FieldResult] = {}
        # SLOW_FIELDS' answers from the last batch that asked for them, and when that was.
        self._slow_fields: dict[FieldRequest, FieldResult] = {}
        self._slow_read_at = float("-inf")
        self.slow_fields_interval = SLOW_FIELD_SECONDS
        # Request lists as the collectors ask -> what is asked of NVML (no duplicates, nothing
        # known to be absent), split into the fields asked every time and SLOW_FIELDS.
        self._field_plans: dict[
            tuple[FieldRequest, ...], tuple[tuple[FieldRequest, ...], tuple[FieldRequest, ...]]
        ] = {}
        # When the first field a plan leaves out as absent may be asked again: the plans are
        # built afresh then.
        self._plans_until = _NEVER
        # Failing calls already logged; a call is logged again only after it worked again.
        self._failing: set[tuple[str, int]] = set()
        # Errors by name, read by the sampler around each collector to attribute them to it.
        self.errors: Counter[str] = Counter()
        # Reads shared by collectors within one sample; the sampler clears it each sample.
        self.memo: dict[str, object] = {}
        # Set when the device could not be opened at all; the sampler reports it down.
        self.down_reason: str | None = None

    @property
    def index(self) -> int:
        return self.identity.index

    @property
    def uuid(self) -> str:
        return self.identity.uuid

    def read(
        self, fn: Callable[Concatenate[Handle, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T | None:
        """Calls a driver method for this device; None when the value is not available."""
        return self.read_as(args, fn, *args, **kwargs)

    def read_as(
        self,
        key_args: tuple[object, ...],
        fn: Callable[Concatenate[Handle, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """Like `read`, remembering absence under `key_args`: for calls whose arguments move,
        such as a timestamp, where the call as such is supported or not."""
        return self._guarded((fn.__name__, key_args), lambda: fn(self.handle, *args, **kwargs))

    def _guarded(self, key: _Key, call: Callable[[], T]) -> T | None:
        if self._absent and self._still_absent(key):
            return None
        try:
            result = call()
        except Exception as exc:
            code = error_code(exc)
            if code is None:
                raise
            self._apply_policy(key, code, exc)
            return None
        if self._failing:
            self._recovered(key[0])
        return result

    def _recovered(self, name: str) -> None:
        healed = {entry for entry in self._failing if entry[0] == name}
        if healed:
            self._failing -= healed
            log.info("NVML call works again", extra={"gpu": self.index, "call": name})

    def _apply_policy(self, key: _Key, code: int, cause: BaseException | None) -> None:
        """The error policy: raise DeviceLost, or remember an absent value, or count an error."""
        name = key[0]
        if code in SESSION_CODES:
            raise SessionLost(error_name(code)) from cause
        if code in LOST_CODES:
            self.forget_absent()
            raise DeviceLost(error_name(code)) from cause
        if code in NO_VALUE_CODES:
            return
        if code in ABSENT_CODES:
            self._mark_absent(key, error_name(code))
            return
        self.errors[error_name(code)] += 1
        if (name, code) not in self._failing:
            self._failing.add((name, code))
            log.warning(
                "NVML call failed; counted from now on, logged again once it has recovered",
                extra={"gpu": self.index, "call": name, "reason": error_name(code)},
            )

    def _mark_absent(self, key: _Key, reason: str) -> None:
        self._absent[key] = self.clock() + REPROBE_SECONDS
        if key[0] == "field":
            # Left out of the batch from now on (until it is due again).
            self._field_plans.clear()
            self._plans_until = _NEVER
        log.debug(
            "value not available; asking again later",
            extra={
                "gpu": self.index,
                "call": key[0],
                "arguments": key[1],
                "reason": reason,
                "retry_in": f"{REPROBE_SECONDS:g}s",
            },
        )

    def _still_absent(self, key: _Key, now: float | None = None) -> bool:
        """Whether `key` answered "absent" less than REPROBE_SECONDS ago; a mark that is due
        is dropped, so that the next read asks."""
        until = self._absent.get(key)
        if until is None:
            return False
        if (self.clock() if now is None else now) < until:
            return True
        del self._absent[key]
        return False

    def forget_absent(self) -> None:
        """Forgets every "absent" answer at once, so that each is asked at the next read: for a
        GPU that was lost (reset, re-seated, its driver state rebuilt), which may answer
        differently once back."""
        self._absent.clear()
        self._field_plans.clear()
        self._plans_until = _NEVER
        # Absence that `recent` holds as a None answer, too.
        self._recent = {key: entry for key, entry in self._recent.items() if entry[1] is not None}

    def mark_absent(self, name: str, *args: object, reason: str = "not_supported") -> None:
        """Remembers as absent something a collector judges by an answer's content rather than
        its return code (a GPM metric's own code, say); asked again like an absent call."""
        self._mark_absent((name, args), reason)

    def marked_absent(self, name: str, *args: object) -> bool:
        """Whether `mark_absent(name, *args)` still stands."""
        return bool(self._absent) and self._still_absent((name, args))

    def cached(
        self,
        fn: Callable[Concatenate[Handle, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """Like `read`, for values that cannot change while the driver is loaded: an answer is
        kept for good. Absence is not: like any read's, it is asked again every
        REPROBE_SECONDS, since a value missing once may only have been missing then."""
        key = (fn.__name__, args)
        value = self._cached.get(key, _UNKNOWN)
        if value is _UNKNOWN:
            value = self.read(fn, *args, **kwargs)
            if value is not None:
                self._cached[key] = value
        return value  # type: ignore[return-value]

    def forget_answer(self, fn: Callable[..., object], *args: object) -> None:
        """A `cached` answer whose content says the value is not there after all (an entry that
        failed inside a call that worked): dropped, and asked again like an absent call."""
        key = (fn.__name__, args)
        self._cached.pop(key, None)
        self._mark_absent(key, "no_answer")

    def read_system(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """Like `read`, for system-level calls that take no device handle. Absence is
        remembered per function: a system call is supported or not whatever its arguments."""
        return self._guarded(("system:" + fn.__name__, ()), lambda: fn(*args, **kwargs))

    def read_on(
        self,
        handle: Handle,
        fn: Callable[Concatenate[Handle, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """Like `read`, on a MIG instance of this GPU; absence is remembered separately."""
        return self._guarded(("mig:" + fn.__name__, args), lambda: fn(handle, *args, **kwargs))

    def recent(
        self,
        max_age: float,
        fn: Callable[Concatenate[Handle, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """Like `read`, re-read at most every `max_age` seconds: for settings an admin changes.
        An absent value is asked again as soon as its REPROBE_SECONDS are up, not up to
        `max_age` later."""
        key = (fn.__name__, args)
        now = self.clock()
        entry = self._recent.get(key)
        if (
            entry is None
            or now - entry[0] >= max_age
            or (entry[1] is None and key in self._absent and not self._still_absent(key, now))
        ):
            entry = self._recent[key] = (now, self.read(fn, *args, **kwargs))
        return entry[1]  # type: ignore[return-value]

    def fetch_fields(
        self, requests: Sequence[FieldRequest], slow_every: float = SLOW_FIELD_SECONDS
    ) -> None:
        """Reads every field the collectors want in one nvmlDeviceGetFieldValues call;
        SLOW_FIELDS once `slow_every` seconds have passed, their last entries standing until
        then."""
        key = tuple(requests)
        now = self.clock()
        if now >= self._plans_until:
            self._field_plans.clear()
            self._plans_until = _NEVER
        plan = self._field_plans.get(key)
        if plan is None:
            if len(self._field_plans) > 16:  # request lists differ only by mode changes
                self._field_plans.clear()
                self._plans_until = _NEVER
            wanted = []
            for request in dict.fromkeys(key):
                absent = ("field", request)
                if self._absent and self._still_absent(absent, now):
                    self._plans_until = min(self._plans_until, self._absent[absent])
                else:
                    wanted.append(request)
            plan = self._field_plans[key] = (
                tuple(r for r in wanted if r[0] not in SLOW_FIELDS),
                tuple(r for r in wanted if r[0] in SLOW_FIELDS),
            )
        every, slow = plan
        self.slow_fields_interval = slow_every
        # A little early rather than a whole sample late: the clock is read when the device's
        # turn comes, a few ms after the tick.
        if slow and now - self._slow_read_at >= slow_every * 0.95:
            asked, self._slow_read_at = every + slow, now
            self._slow_fields = {}
            fresh = slow
        else:
            # A slow field with no answer to stand in (new to the list, failed last time, or
            # due again after it was absent) is asked at once, alone: the others' stand.
            fresh = tuple(r for r in slow if r not in self._slow_fields)
            asked = every + fresh if fresh else every
        self._fields = {}
        if not asked:
            return
        try:
            results = self.driver.field_values(self.handle, asked)
        except Exception as exc:
            code = error_code(exc)
            if code is None:
                raise
            if code in SESSION_CODES:
                raise SessionLost(error_name(code)) from exc
            if code in LOST_CODES:
                self.forget_absent()
                raise DeviceLost(error_name(code)) from exc
            # The whole call failed (an old driver without it, say): each field inherits the
            # outcome, so its collector sees it exactly as if its own entry had failed.
            results = [(code, None)] * len(asked)
        self._fields = dict(zip(asked, results, strict=True))
        for request in fresh:
            # Only answers stand in: a field that failed is asked again at the next sample.
            entry = self._fields[request]
            if entry[0] == SUCCESS:
                self._slow_fields[request] = entry

    def _field_entry(self, request: FieldRequest) -> FieldResult | None:
        """The field's entry from the last batch, or a slow field's answer from an earlier one
        (only answers are kept, so a failure is always this sample's)."""
        return self._fields.get(request) or self._slow_fields.get(request)

    def field(self, field_id: int, scope: int = 0) -> float | None:
        """A value from the last `fetch_fields` (or, for SLOW_FIELDS, the last that read
        them), with the error policy applied to its entry once."""
        result = self._field_entry((field_id, scope))
        if result is None:
            return None
        code, value = result
        if code != SUCCESS:
            self._apply_policy(("field", (field_id, scope)), code, None)
            return None
        return value

    def field_results(self, requests: Sequence[FieldRequest]) -> list[FieldResult | None]:
        """The raw (code, value) entries of the last `fetch_fields`, None where a field was not
        asked for (or is known to be absent); entries that failed need `field()` for the error
        policy."""
        return [self._field_entry(request) for request in requests]

    def is_absent(self, fn: Callable[..., object], *args: object) -> bool:
        """Whether the call answered "absent" less than REPROBE_SECONDS ago."""
        return bool(self._absent) and self._still_absent((fn.__name__, args))

    def field_failed(self, field_id: int, scope: int = 0) -> bool:
        """True when the field's entry in the last `fetch_fields` failed with an error that
        counts (not unsupported, not merely without a value): asking another way in the same
        sample would count the failure twice."""
        result = self._field_entry((field_id, scope))
        if result is None or result[0] == SUCCESS:
            return False
        return result[0] not in ABSENT_CODES and result[0] not in NO_VALUE_CODES

    def field_absent(self, field_id: int, scope: int = 0) -> bool:
        """True once the field's entry answered NOT_SUPPORTED (or another absent code), until
        it is due to be asked again: meanwhile it is not requested, and a collector may ask
        for an alternative instead."""
        return bool(self._absent) and self._still_absent(("field", (field_id, scope)))


def _cuda_version_text(raw: int) -> str:
    return f"{raw // 1000}.{raw % 1000 // 10}"


class Session:
    """NVML's lifecycle: init with capped exponential backoff, enumeration, re-opening GPUs
    that failed to open, shutdown. Used only from the sampler thread."""

    INITIAL_BACKOFF = 0.5
    MAX_BACKOFF = 30.0
    REOPEN_INTERVAL = 5.0
    # How often to ask whether GPUs appeared or disappeared (hot-plug, a GPU back after reset).
    TOPOLOGY_INTERVAL = 30.0

    def __init__(
        self,
        driver: Driver,
        selection: Selection | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.driver = driver
        self.selection = selection
        self._clock = clock
        self.up = False
        self.devices: list[Device] = []
        self.system = System(driver_version="", cuda_driver_version="")
        self.total_devices = 0
        self.last_error = ""
        self.attempts = 0
        self._backoff = self.INITIAL_BACKOFF
        self._next_attempt = 0.0
        self._next_reopen = 0.0
        self._next_topology_check = 0.0

    def start(self) -> bool:
        """Tries to initialise NVML unless backing off; True when NVML is up."""
        if self.up:
            return True
        now = self._clock()
        if now < self._next_attempt:
            return False
        self.attempts += 1
        try:
            self.driver.init()
        except Exception as exc:
            code = error_code(exc)
            if code is None:
                raise
            self._failed(error_name(code), now)
            return False
        try:
            self._enumerate()
        except Exception as exc:
            code = error_code(exc)
            if code is None:
                # A bug or a surprise from the binding: do not re-init every interval.
                log.exception("enumerating GPUs failed")
            self._shutdown_quietly()
            self._failed(error_name(code) if code is not None else "enumeration_failed", now)
            return False
        self.up = True
        self._backoff = self.INITIAL_BACKOFF
        self.last_error = ""
        self._next_topology_check = self._clock() + self.TOPOLOGY_INTERVAL
        log.info(
            "NVML initialised",
            extra={
                "attempts": self.attempts,
                "devices": self.total_devices,
                "selected": len(self.devices),
                "driver": self.system.driver_version,
            },
        )
        return True

    def lost(self, reason: str) -> None:
        """NVML as a whole stopped working: drop everything and start over with backoff."""
        log.error("NVML stopped working; reinitialising", extra={"reason": reason})
        self.shutdown()
        self._backoff = self.INITIAL_BACKOFF
        self._failed(reason, self._clock())

    def reselect(self, selection: Selection) -> None:
        """Applies a new device selection by enumerating again; no re-init needed."""
        self.selection = selection
        if self.up:
            self._enumerate()

    def reopen_failed(self) -> None:
        """GPUs that could not be opened are tried again every few seconds."""
        now = self._clock()
        if now < self._next_reopen or all(d.handle is not None for d in self.devices):
            return
        self._next_reopen = now + self.REOPEN_INTERVAL
        reopened = [
            self._open_or_placeholder(d.index) if d.handle is None else d for d in self.devices
        ]
        self.devices = [d for d in reopened if d is not None]

    def check_topology(self) -> None:
        """Enumerates again when the number of GPUs changed since the last enumeration."""
        now = self._clock()
        if now < self._next_topology_check:
            return
        self._next_topology_check = now + self.TOPOLOGY_INTERVAL
        count = self.driver.device_count()
        if count != self.total_devices:
            log.warning(
                "the number of GPUs changed; enumerating again",
                extra={"before": self.total_devices, "now": count},
            )
            self._enumerate()

    def _failed(self, reason: str, now: float) -> None:
        first = self.last_error != reason
        self.last_error = reason
        self._next_attempt = now + self._backoff
        (log.warning if first else log.debug)(
            "NVML not available, will retry",
            extra={"reason": reason, "retry_in": f"{self._backoff:g}s"},
        )
        self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)

    def _enumerate(self) -> None:
        drv = self.driver
        version = drv.driver_version()
        try:
            cuda = _cuda_version_text(drv.cuda_driver_version())
        except Exception as exc:
            if error_code(exc) is None:
                raise
            cuda = ""
        self.system = System(driver_version=version, cuda_driver_version=cuda)
        self.total_devices = drv.device_count()
        devices = [self._open_or_placeholder(index) for index in range(self.total_devices)]
        self.devices = [d for d in devices if d is not None]
        if self.selection is not None and not self.devices and self.total_devices:
            log.warning(
                "the device selection matches none of the GPUs",
                extra={"gpus": self.total_devices, "selection": self.selection},
            )

    def _open_or_placeholder(self, index: int) -> Device | None:
        """The GPU at `index`, a down placeholder if it cannot be opened, None if unselected."""
        try:
            return self._open(index)
        except Exception as exc:
            code = error_code(exc)
            if code is None and not isinstance(exc, DeviceLost):
                raise
            if code in SESSION_CODES:
                raise
            reason = exc.reason if isinstance(exc, DeviceLost) else error_name(code or UNKNOWN)
            log.warning("GPU could not be opened", extra={"gpu": index, "reason": reason})
            if self.selection is not None and not self.selection.selects(index, "", ""):
                return None
            device = Device(
                self.driver, None, DeviceIdentity(index=index, uuid=""), self.system, self._clock
            )
            device.down_reason = reason
            return device

    def _open(self, index: int) -> Device | None:
        drv = self.driver
        handle = drv.device_handle(index)
        uuid = drv.uuid(handle)
        device = Device(
            drv, handle, DeviceIdentity(index=index, uuid=uuid), self.system, self._clock
        )
        pci_bus_id = device.read(drv.pci_bus_id) or ""
        if self.selection is not None and not self.selection.selects(index, uuid, pci_bus_id):
            return None
        arch = device.read(drv.architecture)
        # Read once per open, absent or not, unlike other values: identity labels every series
        # of the GPU, and a label that changed under running series would split them. A part
        # missing now comes with the next open (enumeration again, NVML initialised again).
        device.identity = DeviceIdentity(
            index=index,
            uuid=uuid,
            name=device.read(drv.name) or "",
            pci_bus_id=pci_bus_id,
            serial=device.read(drv.serial) or "",
            vbios_version=device.read(drv.vbios_version) or "",
            architecture=ARCHITECTURES.get(arch, "unknown") if arch is not None else "",
            minor_number=device.read(drv.minor_number),
        )
        return device

    def _shutdown_quietly(self) -> None:
        try:
            self.driver.shutdown()
        except Exception as exc:
            if error_code(exc) is None:
                raise

    def shutdown(self) -> None:
        if self.up:
            self.up = False
            self.devices = []
            self._shutdown_quietly()
