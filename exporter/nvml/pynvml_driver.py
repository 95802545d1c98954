"""`Driver` over the real library through pynvml's ctypes bindings: the only module of the
project that imports pynvml. pynvml's exceptions become NvmlError here, so nothing above it
knows pynvml's types.

The calls a sample makes most often go to the C functions directly, without pynvml's wrappers,
whose lock, size queries and conversions cost more than the calls themselves
(docs/performance.md); `exporter.nvml.structs` decodes their answers. The module is long
because the binding is one method per `Driver` call, and splitting those would spread pynvml
over more than one module.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import pynvml

from exporter.nvml import structs
from exporter.nvml.codes import (
    ARGUMENT_VERSION_MISMATCH,
    FUNCTION_NOT_FOUND,
    INSUFFICIENT_SIZE,
    NOT_FOUND,
    SUCCESS,
    TIMEOUT,
)
from exporter.nvml.errors import NvmlError
from exporter.nvml.values import (
    Bar1Memory,
    EncoderStats,
    FieldRequest,
    FieldResult,
    Handle,
    MemoryInfo,
    MigInstance,
    NvmlEvent,
    ProcessInfo,
    ProcessSample,
    Utilization,
)

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C")

# Room for this many processes per list before the first INSUFFICIENT_SIZE.
PROCESS_BUFFER = 64
# Sample entries a samples buffer has room for at least, more than real drivers keep per type.
MIN_SAMPLE_CAPACITY = 128
# The struct format of one nvmlFieldValue_t's answer.
_FIELD_ANSWER = structs.field_entry_format(pynvml.c_nvmlFieldValue_t)


def _converting_errors(cls: type[C]) -> type[C]:
    """Every public method of `cls` raises NvmlError where pynvml raises its own exceptions, so
    that no method can forget to, and nothing above this module knows pynvml's types."""
    for name, member in list(vars(cls).items()):
        if callable(member) and not name.startswith("_"):
            setattr(cls, name, _converted(member))
    return cls


def _converted(method: Callable[P, T]) -> Callable[P, T]:
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


@_converting_errors
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

    def init(self) -> None:
        pynvml.nvmlInit()
        # Buffer sizes are per handle, and handles do not outlive a session.
        self._sample_capacity.clear()
        self._process_capacity.clear()
        # A session starts after the driver was (re)loaded, perhaps a different one: which
        # variant of a versioned call it takes is learned again, at one failed call each.
        with self._variant_lock:
            self._variant.clear()

    def shutdown(self) -> None:
        pynvml.nvmlShutdown()

    def driver_version(self) -> str:
        return str(pynvml.nvmlSystemGetDriverVersion())

    def cuda_driver_version(self) -> int:
        return int(pynvml.nvmlSystemGetCudaDriverVersion())

    def device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def device_handle(self, index: int) -> Handle:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def uuid(self, handle: Handle) -> str:
        return str(pynvml.nvmlDeviceGetUUID(handle))

    def name(self, handle: Handle) -> str:
        return str(pynvml.nvmlDeviceGetName(handle))

    def pci_bus_id(self, handle: Handle) -> str:
        bus_id = pynvml.nvmlDeviceGetPciInfo(handle).busId
        return bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)

    def serial(self, handle: Handle) -> str:
        return str(pynvml.nvmlDeviceGetSerial(handle))

    def vbios_version(self, handle: Handle) -> str:
        return str(pynvml.nvmlDeviceGetVbiosVersion(handle))

    def architecture(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetArchitecture(handle))

    def minor_number(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetMinorNumber(handle))

    def utilization(self, handle: Handle) -> Utilization:
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return Utilization(gpu=int(rates.gpu), memory=int(rates.memory))

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

    def power_usage(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetPowerUsage(handle))

    def enforced_power_limit(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))

    def total_energy(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))

    def clock(self, handle: Handle, clock_type: int) -> int:
        return self._scalar("nvmlDeviceGetClockInfo", ctypes.c_uint, handle, clock_type)

    def fan_count(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetNumFans(handle))

    def fan_speed(self, handle: Handle, fan: int) -> int:
        return int(pynvml.nvmlDeviceGetFanSpeed_v2(handle, fan))

    def performance_state(self, handle: Handle) -> int:
        return self._scalar("nvmlDeviceGetPerformanceState", ctypes.c_uint, handle)

    def field_values(self, handle: Handle, requests: Sequence[FieldRequest]) -> list[FieldResult]:
        """One nvmlDeviceGetFieldValues call. Not through pynvml's wrapper: it fills and decodes
        every entry through ctypes attribute access, which for a GPU's fields costs more than
        the call. Here the request array is built once per request list and the answers are
        decoded from the raw bytes."""
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
        return structs.decode_fields(answer.unpack_from(array))

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
            function = self._functions[name] = pynvml._nvmlGetFunctionPointer(name)
        return function

    def samples(self, handle: Handle, sample_type: int, since_us: int) -> list[tuple[int, float]]:
        """One nvmlDeviceGetSamples call where pynvml's wrapper makes two.

        pynvml asks for the size with a NULL buffer on every call. Public code built on NVML
        reads that answer as the size of the driver's sample buffer for the type (about 100),
        which does not change (not checked on a GPU here): it is asked once per device and type,
        with timestamp 0 and a floor of MIN_SAMPLE_CAPACITY, and every later call passes a
        buffer that holds it all; an answer that does not fit, or fills the buffer exactly,
        grows it and is asked once more. NOT_FOUND (nothing newer than `since_us`) means no
        samples.
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
        raw = ctypes.string_at(array, structs.SAMPLE_ENTRY.size * min(count.value, capacity))
        return structs.decode_samples(raw, value_type.value)

    def clocks_event_reasons(self, handle: Handle) -> int:
        return self._scalar("nvmlDeviceGetCurrentClocksEventReasons", ctypes.c_ulonglong, handle)

    def power_limit_default(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle))

    def power_limit_constraints(self, handle: Handle) -> tuple[int, int]:
        low, high = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        return int(low), int(high)

    def temperature_threshold(self, handle: Handle, threshold: int) -> int:
        return int(pynvml.nvmlDeviceGetTemperatureThreshold(handle, threshold))

    def pcie_link_generation(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))

    def pcie_link_width(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle))

    def pcie_max_link_generation(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle))

    def pcie_max_link_width(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle))

    def pcie_throughput(self, handle: Handle, counter: int) -> int:
        return int(pynvml.nvmlDeviceGetPcieThroughput(handle, counter))

    def encoder_utilization(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetEncoderUtilization(handle)[0])

    def decoder_utilization(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetDecoderUtilization(handle)[0])

    def encoder_stats(self, handle: Handle) -> EncoderStats:
        sessions, fps, latency = pynvml.nvmlDeviceGetEncoderStats(handle)
        return EncoderStats(int(sessions), int(fps), int(latency))

    def bar1_memory(self, handle: Handle) -> Bar1Memory:
        info = pynvml.nvmlDeviceGetBAR1MemoryInfo(handle)
        return Bar1Memory(int(info.bar1Total), int(info.bar1Used), int(info.bar1Free))

    def persistence_mode(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetPersistenceMode(handle))

    def compute_mode(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetComputeMode(handle))

    def mig_mode(self, handle: Handle) -> tuple[int, int]:
        current, pending = pynvml.nvmlDeviceGetMigMode(handle)
        return int(current), int(pending)

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
                size = structs.PROCESS_ENTRY.size * min(count.value, capacity)
                return structs.decode_processes(ctypes.string_at(array, size))
            if ret != INSUFFICIENT_SIZE:
                raise NvmlError(ret, symbol)
            # Oversized like pynvml's wrapper, for processes starting meanwhile.
            capacity = self._process_capacity[key] = max(2 * capacity, 2 * count.value + 5)
        raise NvmlError(INSUFFICIENT_SIZE, symbol)

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

    def process_name(self, pid: int) -> str:
        return str(pynvml.nvmlSystemGetProcessName(pid))

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

    def supported_events(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetSupportedEventTypes(handle))

    def create_event_set(self) -> Handle:
        return pynvml.nvmlEventSetCreate()

    def register_events(self, handle: Handle, event_set: Handle, types: int) -> None:
        pynvml.nvmlDeviceRegisterEvents(handle, types, event_set)

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

    def free_event_set(self, event_set: Handle) -> None:
        pynvml.nvmlEventSetFree(event_set)

    def gpm_supported(self, handle: Handle) -> bool:
        return bool(pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)

    def gpm_sample_alloc(self) -> Handle:
        return pynvml.nvmlGpmSampleAlloc()

    def gpm_sample_free(self, sample: Handle) -> None:
        pynvml.nvmlGpmSampleFree(sample)

    def gpm_sample_get(self, handle: Handle, sample: Handle) -> bool:
        pynvml.nvmlGpmSampleGet(handle, sample)
        return True

    def gpm_mig_sample_get(self, handle: Handle, gpu_instance: int, sample: Handle) -> bool:
        pynvml.nvmlGpmMigSampleGet(handle, gpu_instance, sample)
        return True

    def gpm_metrics(
        self, first: Handle, second: Handle, metric_ids: Sequence[int]
    ) -> list[tuple[int, float | None]]:
        # Prebuilt and decoded from raw bytes, as field values are.
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
            answer = structs.gpm_answer_layout(
                pynvml.c_nvmlGpmMetricsGet_t, pynvml.c_nvmlGpmMetric_t, len(key)
            )
            template = self._gpm_templates[key] = (bytes(blank), answer)
        raw, answer = template
        request = pynvml.c_nvmlGpmMetricsGet_t.from_buffer_copy(raw)
        request.sample1 = first
        request.sample2 = second
        ret = self._function("nvmlGpmMetricsGet")(ctypes.byref(request))
        if ret != SUCCESS:
            raise NvmlError(ret, "nvmlGpmMetricsGet")
        return structs.decode_gpm(answer.unpack_from(request))


def mig_profile(name: str) -> str:
    """ "NVIDIA H200 MIG 1g.18gb" -> "1g.18gb"."""
    return name.rsplit(" MIG ", 1)[1] if " MIG " in name else name


def _handle_key(handle: Handle) -> int | None:
    """A device handle as a hashable address (pynvml hands out ctypes pointers)."""
    return ctypes.cast(handle, ctypes.c_void_p).value
