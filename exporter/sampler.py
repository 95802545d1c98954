"""The background loop: every interval, read each device once and publish a new Snapshot.

Devices are read one after another on a reader thread against a deadline; when a read stalls,
the rest move to another thread, so a GPU whose NVML calls hang delays neither the other GPUs
nor any scrape: it is reported down with reason `timeout`, and while its previous read is still
outstanding it is skipped rather than piled on.
Each collector runs in its own error boundary: an exception in one shows up as
`nvml_collector_success{collector} 0` and costs nothing else.
"""

from __future__ import annotations

import functools
import logging
import platform
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import ProcessCollector

from exporter import __version__, dcgm
from exporter.collectors import (
    COLLECTORS,
    Collector,
    Dcgm,
    Emitter,
    MetricSpec,
    Services,
    enabled_collectors,
)
from exporter.collectors.base import IDENTITY_LABELS, FieldPlan, Sample, field_value
from exporter.config import Config, SamplingConfig
from exporter.nvml import (
    SUCCESS,
    Device,
    DeviceLost,
    Driver,
    FieldRequest,
    FieldResult,
    Session,
    SessionLost,
    binding_version,
)
from exporter.snapshot import (
    Family,
    Format,
    Header,
    Snapshot,
    format_value,
    label_pairs,
    series_prefix,
)

log = logging.getLogger(__name__)


def _spec(
    name: str, type_: str, help_: str, labels: tuple[str, ...] = (), unit: str = ""
) -> MetricSpec:
    return MetricSpec(
        name, type_, help_, labels=labels, unit=unit, per_device=False, source="exporter"
    )


NVML_UP = _spec("nvml_up", "gauge", "1 if NVML is initialised and devices were enumerated.")
GPU_UP = MetricSpec(
    "nvml_gpu_up",
    "gauge",
    "1 if the GPU answered this sample; 0 if it is lost, needs a reset or timed out.",
    source="exporter (GPU_IS_LOST, RESET_REQUIRED, sample deadline)",
)
GPU_DOWN = MetricSpec(
    "nvml_gpu_down_info",
    "info",
    "Why a GPU is down: gpu_is_lost, reset_required, gpu_not_found, timeout (a read missed the "
    "sample deadline), or the error that kept it from opening; only while down. Always 1.",
    labels=("reason",),
    source="exporter",
)
GPU_LAST_SAMPLE = MetricSpec(
    "nvml_gpu_last_sample_timestamp_seconds",
    "gauge",
    "Unix time this GPU was last read successfully; time() minus this is its data's age.",
    unit="seconds",
    source="exporter",
)
GPU_DEVICES = _spec(
    "nvml_gpu_devices", "gauge", "GPUs NVML reports on this host, before device selection."
)
COLLECTOR_SUCCESS = _spec(
    "nvml_collector_success",
    "gauge",
    "1 if the collector ran without errors on every device in the last sample.",
    ("collector",),
)
COLLECTOR_DURATION = _spec(
    "nvml_collector_duration_seconds",
    "gauge",
    "Time the collector took in the last sample, summed over devices.",
    ("collector",),
    "seconds",
)
COLLECTOR_ERRORS = _spec(
    "nvml_collector_errors_total",
    "counter",
    "Failed reads by collector and kind: an NVML error name (unsupported values are not "
    "errors) or `exception` for a bug.",
    ("collector", "error"),
)
LAST_SAMPLE = _spec(
    "nvml_last_sample_timestamp_seconds",
    "gauge",
    "Unix time the last sample completed; values are as fresh as this.",
    unit="seconds",
)
SAMPLE_DURATION = _spec("nvml_sample_duration_seconds", "gauge", "Wall time the last sample took.")
BUILD_INFO = _spec(
    "nvml_exporter_build_info",
    "info",
    "Version of the exporter and its NVML binding; always 1.",
    ("version", "python_version", "binding_version"),
)
BACKEND_INFO = _spec(
    "nvml_exporter_backend_info",
    "info",
    "Which backend produced the data: nvml, or simulated for demos and tests; always 1.",
    ("backend",),
)
RELOAD_SUCCESS = _spec(
    "nvml_exporter_config_last_reload_successful",
    "gauge",
    "1 if the last configuration reload succeeded (or none was attempted).",
)
RELOAD_TIMESTAMP = _spec(
    "nvml_exporter_config_last_reload_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful configuration load.",
    unit="seconds",
)


def _process_spec(name: str, type_: str, help_: str, unit: str = "") -> MetricSpec:
    return MetricSpec(
        name, type_, help_, unit=unit, per_device=False, source="/proc/self (prometheus_client)"
    )


# Emitted by prometheus_client's ProcessCollector; listed so docs/metrics.md covers them.
PROCESS_METRICS = (
    _process_spec("process_cpu_seconds_total", "counter", "CPU time the exporter used.", "seconds"),
    _process_spec("process_resident_memory_bytes", "gauge", "Resident memory.", "bytes"),
    _process_spec("process_virtual_memory_bytes", "gauge", "Virtual memory.", "bytes"),
    _process_spec(
        "process_start_time_seconds", "gauge", "Unix time the process started.", "seconds"
    ),
    _process_spec("process_open_fds", "gauge", "Open file descriptors."),
    _process_spec("process_max_fds", "gauge", "Limit on open file descriptors."),
)

SAMPLE_FAILURES = _spec(
    "nvml_exporter_sample_failures_total",
    "counter",
    "Samples that failed with an unexpected error (a bug); the previous data stays served.",
)

WEB_RELOAD_SUCCESS = _spec(
    "nvml_exporter_web_config_last_reload_successful",
    "gauge",
    "1 if the web config file (TLS, basic auth) and the files it names were last loaded "
    "without error; 0 while a broken change is refused and the previous settings serve.",
)
CERTIFICATE_EXPIRY = _spec(
    "nvml_exporter_tls_certificate_expiry_timestamp_seconds",
    "gauge",
    "Unix time the serving TLS certificate expires (its notAfter); alert on it minus time().",
    unit="seconds",
)
# Only with web.config_file (the second only with TLS).
WEB_METRICS = (WEB_RELOAD_SUCCESS, CERTIFICATE_EXPIRY)

SELF_METRICS = (
    NVML_UP,
    GPU_UP,
    GPU_DOWN,
    GPU_LAST_SAMPLE,
    GPU_DEVICES,
    COLLECTOR_SUCCESS,
    COLLECTOR_DURATION,
    COLLECTOR_ERRORS,
    LAST_SAMPLE,
    SAMPLE_DURATION,
    BUILD_INFO,
    BACKEND_INFO,
    RELOAD_SUCCESS,
    RELOAD_TIMESTAMP,
    SAMPLE_FAILURES,
)


# (spec, extra label values) -> (line prefix, value, line): one GPU's series of the last sample.
SeriesCache = dict[tuple[MetricSpec, tuple[str, ...]], tuple[str, float, str]]
PlanCache = dict[FieldPlan, "_PlanState"]


@dataclass
class DeviceResult:
    samples: list[Sample] = field(default_factory=list)  # naming: dcgm
    lines: dict[MetricSpec, list[str]] = field(default_factory=dict)  # naming: nvml
    series: SeriesCache = field(default_factory=dict)
    plans: PlanCache = field(default_factory=dict)
    # collector name -> (succeeded, seconds, errors by kind)
    status: dict[str, tuple[bool, float, Counter[str]]] = field(default_factory=dict)
    down_reason: str | None = None
    session_lost: str | None = None


_NO_ERRORS: Counter[str] = Counter()


def _where(collector: Collector, device: Device | None) -> dict[str, object]:
    return {"collector": collector.name, "gpu": "" if device is None else device.index}


class _Readers:
    """Daemon threads that read devices, normally one: reading GPUs one after another on one
    thread costs far less CPU than a thread per GPU, whose NVML calls would hand the GIL back
    and forth on every call. While reads are queued and no thread is idle, another is started
    when nothing has finished for `stall` seconds (an NVML call hanging) or when, at the pace
    so far, the queue would not be through by the deadline (slow GPUs); so one stuck or slow
    GPU never holds up the others. Surplus threads exit once idle.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one NVML call
    hanging forever would keep a stopping exporter from ever exiting.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Future[DeviceResult], Callable[[], DeviceResult]] | None
        ]
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._started = 0

    def _spawn(self) -> None:
        with self._lock:
            self._threads += 1
            self._started += 1
            name = "gpu-reader" if self._started == 1 else f"gpu-reader-{self._started}"
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._idle and self._threads > 1:
                    self._threads -= 1
                    return
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                with self._lock:
                    self._threads -= 1
                return
            future, call = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def run(
        self, calls: Mapping[int, Callable[[], DeviceResult]], deadline: float, stall: float
    ) -> dict[int, Future[DeviceResult]]:
        """Queues the reads and waits for them until `deadline` (time.monotonic)."""
        futures: dict[int, Future[DeviceResult]] = {}
        for key, call in calls.items():
            future: Future[DeviceResult] = Future()
            self._jobs.put((future, call))
            futures[key] = future
        with self._lock:
            idle = self._idle
        if not idle:
            self._spawn()
        pending = set(futures.values())
        started = time.monotonic()
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Woken when all are done, not on each: every wake-up takes the GIL from the reader.
            _, pending = wait_futures(pending, timeout=min(stall, remaining))
            queued = sum(1 for f in pending if not f.running() and not f.done())
            finished = len(futures) - len(pending)
            if queued and self._behind(finished, queued, started, deadline, stall):
                self._spawn()
        for future in pending:
            # Still queued at the deadline: dropped rather than run late, in front of the next
            # sample's reads. (A read already running cannot be stopped.)
            future.cancel()
        return futures

    def _behind(
        self, finished: int, queued: int, started: float, deadline: float, stall: float
    ) -> bool:
        """Whether the queued reads need another thread: none is idle, and either nothing has
        finished for `stall` (a read hangs) or, at the pace so far, one thread would not get
        through them before the deadline (slow reads)."""
        with self._lock:
            if self._idle:
                return False
        now = time.monotonic()
        if not finished:
            return now - started >= stall
        return (now - started) / finished * queued > deadline - now

    def shutdown(self) -> None:
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)


@dataclass
class _PlanState:
    """A field plan's last sample on one GPU."""

    results: list[FieldResult | None]
    lines: list[str | None]
    prefixes: list[str]
    complete: bool  # a line for every series
    failed: bool  # some entry failed: rendered again next sample, so the error policy sees it


class _SeriesEmitter(Emitter):
    """Renders each series to its exposition line as the collector adds it. The line of the
    last sample is reused when the value is unchanged, and its prefix (name and labels) always,
    so a series costs a dictionary lookup, not a label rendering."""

    __slots__ = ("_identity", "_previous", "_previous_plans", "lines", "plans", "series")

    def __init__(self, identity: str, previous: SeriesCache, previous_plans: PlanCache) -> None:
        super().__init__()
        self._identity = identity
        self._previous = previous
        self._previous_plans = previous_plans
        self.series: SeriesCache = {}
        self.plans: PlanCache = {}
        self.lines: dict[MetricSpec, list[str]] = {}

    def add(self, spec: MetricSpec, value: float, *labels: str) -> None:
        key = (spec, labels)
        entry = self._previous.get(key)
        if entry is None:
            prefix = self._prefix(spec, labels)
            entry = (prefix, value, prefix + format_value(value) + "\n")
        elif entry[1] != value:
            entry = (entry[0], value, entry[0] + format_value(value) + "\n")
        self.series[key] = entry
        lines = self.lines.get(spec)
        if lines is None:
            lines = self.lines[spec] = []
        lines.append(entry[2])

    def _prefix(self, spec: MetricSpec, labels: tuple[str, ...]) -> str:
        pairs = self._identity
        if labels:
            pairs += "," + label_pairs(spec.labels, labels)
        return series_prefix(spec.name, pairs)

    def add_fields(self, device: Device, plan: FieldPlan) -> None:
        """A plan's series at once: when its field entries equal the last sample's, all its
        lines are the last sample's too (one list comparison for, say, 108 NVLink series);
        otherwise only the entries that changed are rendered again."""
        results = device.field_results(plan.requests_by_series)
        state = self._previous_plans.get(plan)
        if state is None or state.failed or state.results != results:
            state = self._render_plan(device, plan, results, state)
        self.plans[plan] = state
        lines = state.lines
        for spec, start, end in plan.spans:
            target = self.lines.get(spec)
            if target is None:
                target = self.lines[spec] = []
            if state.complete:
                target.extend(lines[start:end])  # type: ignore[arg-type]
            else:
                target.extend(line for line in lines[start:end] if line is not None)

    def _render_plan(
        self,
        device: Device,
        plan: FieldPlan,
        results: list[FieldResult | None],
        previous: _PlanState | None,
    ) -> _PlanState:
        if previous is None:
            prefixes = [self._prefix(s.spec, s.labels) for s in plan.series]
        else:
            prefixes = previous.prefixes
        state = _PlanState(results, [], prefixes, complete=True, failed=False)
        for index, (series, result) in enumerate(zip(plan.series, results, strict=True)):
            if result is None or result[0] != SUCCESS:
                if result is not None:
                    device.field(*series.request)  # the error policy sees each failed read
                    state.failed = True
                state.lines.append(None)
                state.complete = False
            elif previous is not None and previous.results[index] == result:
                state.lines.append(previous.lines[index])
            else:
                value = field_value(series, result[1])  # type: ignore[arg-type]
                state.lines.append(prefixes[index] + format_value(value) + "\n")
        return state


def _header(spec: MetricSpec | Dcgm, sampling: SamplingConfig) -> Header:
    interval = f"{sampling.interval:g}s"
    suffix = f" Sampled every {interval}."
    if isinstance(spec, Dcgm):
        return Header(spec.name, spec.type, spec.help + suffix)
    if not spec.per_device or spec.type == "info":
        suffix = ""
    elif spec.cadence:
        slow = sampling.slow_fields_interval
        suffix = " " + spec.cadence.format(
            interval=interval, slow=f"{slow:g}s" if slow > 0 else "sample"
        )
    return Header(spec.name, spec.type, spec.help + suffix, spec.unit)


class _FamilyBuilder:
    """Merges series from all devices into one family per metric, in first-seen order."""

    def __init__(
        self,
        headers: Callable[[MetricSpec | Dcgm], Header],
        naming: str = "nvml",
        host: str = "",
        prefixes: dict[tuple[MetricSpec, tuple[str, ...]], str] | None = None,
        hostname_label: str = dcgm.DEFAULT_HOSTNAME_LABEL,
        rates: dcgm.CounterRates | None = None,
    ) -> None:
        self._lines: dict[MetricSpec | Dcgm, list[str]] = {}
        # The last sample's line prefixes of the series added one by one (the self-metrics);
        # those used again are carried into `self.prefixes` for the next sample.
        self._previous = prefixes or {}
        self.prefixes: dict[tuple[MetricSpec, tuple[str, ...]], str] = {}
        self._headers = headers
        self._dcgm = naming == "dcgm"
        self._host = host
        self._identity_labels = dcgm.identity_labels(hostname_label)
        self._rates = rates
        # Several sources may stand for one DCGM field (GPM, a counter's rate, a gauge): one
        # family per field name, so its HELP and TYPE appear once.
        self._dcgm_fields: dict[str, Dcgm] = {}

    def _family(self, spec: MetricSpec | Dcgm) -> list[str]:
        lines = self._lines.get(spec)
        if lines is None:
            lines = self._lines[spec] = []
        return lines

    def add(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        key = (spec, labels)
        prefix = self._previous.get(key)
        if prefix is None:
            prefix = series_prefix(spec.name, label_pairs(spec.label_names, labels))
        self.prefixes[key] = prefix
        self._family(spec).append(prefix + format_value(value) + "\n")

    def add_lines(self, lines: Mapping[MetricSpec, list[str]]) -> None:
        for spec, series in lines.items():
            self._family(spec).extend(series)

    def add_device(self, device: Device, samples: Iterable[Sample]) -> None:
        if self._dcgm:
            self._add_dcgm(device, samples)
            return
        identity = (str(device.index), device.uuid)
        for spec, labels, value in samples:
            self.add(spec, identity + labels, value)

    def _add_dcgm(self, device: Device, samples: Iterable[Sample]) -> None:
        identity = label_pairs(self._identity_labels, dcgm.identity(device, self._host))
        translated = dcgm.translate(samples, self._rates, device.uuid, device.clock())
        for target, extra, value in translated:
            pairs = identity
            if extra:
                pairs += "," + label_pairs([k for k, _ in extra], [v for _, v in extra])
            # dcgm-exporter's counters carry no `_total`; the text renderer keeps the name.
            line = series_prefix(target.name, pairs) + format_value(value) + "\n"
            self._family(self._dcgm_fields.setdefault(target.name, target)).append(line)

    def families(self) -> list[Family]:
        if self._rates is not None:
            self._rates.sweep()
        return [Family(self._headers(spec), lines) for spec, lines in self._lines.items()]


class WebStatus(Protocol):
    """What the sampler reports of the web server's security settings (exporter.webconfig)."""

    @property
    def reload_successful(self) -> bool: ...
    @property
    def certificate_expiry(self) -> float | None: ...


class Sampler:
    def __init__(
        self,
        config: Config,
        driver: Driver,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        registry: Mapping[str, type[Collector]] = COLLECTORS,
        services: Services | None = None,
    ) -> None:
        self._registry = registry
        self._services = services or Services()
        self._clock = clock
        self._wall = wall_clock
        self.session = Session(driver, config.devices, clock=clock)
        self._instances: dict[str, Collector] = {}
        self._host = dcgm.hostname()
        self._dcgm_rates = dcgm.CounterRates()  # naming: dcgm
        self.config = config
        self._collectors = self._select(config)
        self._readers = _Readers()
        self._series: dict[tuple[int, str], tuple[SeriesCache, PlanCache]] = {}
        self._headers: dict[MetricSpec | Dcgm, Header] = {}
        self._prefixes: dict[tuple[MetricSpec, tuple[str, ...]], str] = {}
        self._pending: dict[int, Future[DeviceResult]] = {}
        self._error_totals: Counter[tuple[str, str]] = Counter()
        self._down: dict[int, str] = {}
        self._last_read: dict[tuple[str, str], float] = {}
        self._demand: set[tuple[Format, bool]] = set()
        self._logged_failures: set[tuple[str, str]] = set()
        self._process = ProcessCollector(registry=None)
        self._stop = threading.Event()
        self._first_sample = threading.Event()
        self._thread: threading.Thread | None = None
        self.reload_successful = True
        self.reload_timestamp = wall_clock()
        self.web_status: WebStatus | None = None
        self.ready = False
        self.heartbeat = clock()
        self.sample_failures = 0
        self._static = self._static_families()
        self.snapshot = Snapshot(self._static, wall_clock())

    # --- configuration ---------------------------------------------------------------------

    @property
    def services(self) -> Services:
        return self._services

    def _select(self, config: Config) -> list[Collector]:
        selected = []
        for name in enabled_collectors(config.collectors, self._registry):
            if name not in self._instances:
                self._instances[name] = self._registry[name]()
            collector = self._instances[name]
            collector.configure(config, self._services)
            selected.append(collector)
        return selected

    def reconfigure(self, config: Config, services: Services | None = None) -> None:
        """Applies a reloaded configuration from the next sample on, with new services (pod
        watcher, process attribution) when their settings changed.

        Called from another thread: it only swaps references; the sampler thread itself
        re-enumerates for a new device selection, so NVML is never touched from two places.
        """
        if services is not None:
            self._services = services
        self._collectors = self._select(config)
        self._headers = {}  # help texts name the interval
        self.config = config

    # --- sampling ----------------------------------------------------------------------------

    def _static_families(self) -> list[Family]:
        builder = _FamilyBuilder(self._header)
        builder.add(BUILD_INFO, (__version__, platform.python_version(), binding_version()), 1)
        builder.add(BACKEND_INFO, (self.config.backend,), 1)
        return builder.families()

    def _header(self, spec: MetricSpec | Dcgm) -> Header:
        header = self._headers.get(spec)
        if header is None:
            header = self._headers[spec] = _header(spec, self.config.sampling)
        return header

    def _read_device(self, device: Device, collectors: Sequence[Collector]) -> DeviceResult:
        result = DeviceResult()
        out: Emitter
        if self.config.naming == "dcgm":
            out = Emitter()
        else:
            identity = label_pairs(IDENTITY_LABELS, (str(device.index), device.uuid))
            series, plans = self._series.get((device.index, device.uuid), ({}, {}))
            out = _SeriesEmitter(identity, series, plans)
        device.memo = {}
        requests: list[FieldRequest] = []
        failed: set[str] = set()
        try:
            for collector in collectors:
                try:
                    requests.extend(collector.fields(device))
                except (DeviceLost, SessionLost):
                    raise
                except Exception as exc:
                    failed.add(collector.name)
                    self._log_collector_failure(collector, device, exc)
            device.fetch_fields(requests, self.config.sampling.slow_fields_interval)
        except DeviceLost as lost:
            return DeviceResult(down_reason=lost.reason)
        except SessionLost as lost:
            return DeviceResult(down_reason=lost.reason, session_lost=lost.reason)
        for collector in collectors:
            started = time.perf_counter()
            # Copied only when there is something to copy: this runs per collector and GPU.
            before = Counter(device.errors) if device.errors else _NO_ERRORS
            errors = _NO_ERRORS
            try:
                collector.collect(device, out)
            except DeviceLost as lost:
                return DeviceResult(down_reason=lost.reason)
            except SessionLost as lost:
                return DeviceResult(down_reason=lost.reason, session_lost=lost.reason)
            except Exception as exc:
                errors = Counter(exception=1)
                self._log_collector_failure(collector, device, exc)
            if device.errors and device.errors != before:
                errors = errors + (device.errors - before)
            if collector.name in failed:
                errors = errors + Counter(exception=1)
            elif self._logged_failures and not errors:
                self._collector_recovered(collector)
            ok = not errors
            result.status[collector.name] = (ok, time.perf_counter() - started, errors)
        if isinstance(out, _SeriesEmitter):
            result.lines = out.lines
            result.series = out.series
            result.plans = out.plans
        else:
            result.samples = out.samples
        return result

    def _collector_recovered(self, collector: Collector) -> None:
        """A collector that works again gets its next failure logged again."""
        healed = {key for key in self._logged_failures if key[0] == collector.name}
        if healed:
            self._logged_failures -= healed
            log.info("collector works again", extra={"collector": collector.name})

    def _log_collector_failure(
        self, collector: Collector, device: Device | None, exc: Exception
    ) -> None:
        """With traceback once per collector and kind of error; it is counted either way."""
        key = (collector.name, type(exc).__name__)
        if key in self._logged_failures:
            log.debug("collector failed", extra=_where(collector, device), exc_info=exc)
            return
        self._logged_failures.add(key)
        log.error(
            "collector failed; further failures of this kind are counted, not logged",
            extra=_where(collector, device),
            exc_info=exc,
        )

    def _read_devices(self, devices: Sequence[Device], started: float) -> dict[int, DeviceResult]:
        collectors = self._collectors
        calls: dict[int, Callable[[], DeviceResult]] = {}
        results: dict[int, DeviceResult] = {}
        for device in devices:
            if device.down_reason is not None:
                results[device.index] = DeviceResult(down_reason=device.down_reason)
                continue
            pending = self._pending.get(device.index)
            if pending is not None and not pending.done():
                results[device.index] = DeviceResult(down_reason="timeout")
                continue
            calls[device.index] = functools.partial(self._read_device, device, collectors)
        deadline = self.config.sampling.deadline
        remaining = max(0.0, started + deadline - self._clock())
        # A read silent for a quarter of the deadline (at most 0.25 s) is taken to hang.
        stall = min(deadline / 4, 0.25)
        futures = self._readers.run(calls, time.monotonic() + remaining, stall) if calls else {}
        for index, future in futures.items():
            if future.cancelled():
                # Never started: the other GPUs' reads took the time. Nothing outstanding.
                results[index] = DeviceResult(down_reason="timeout")
                self._pending.pop(index, None)
            elif future.done():
                results[index] = future.result()
                self._pending.pop(index, None)
            else:
                self._pending[index] = future
                results[index] = DeviceResult(down_reason="timeout")
        return results

    def _note_transitions(
        self, devices: Sequence[Device], results: dict[int, DeviceResult]
    ) -> None:
        for device in devices:
            reason = results[device.index].down_reason
            previous = self._down.get(device.index)
            if reason is not None and previous != reason:
                log.warning(
                    "GPU down", extra={"gpu": device.index, "uuid": device.uuid, "reason": reason}
                )
                self._down[device.index] = reason
            elif reason is None and previous is not None:
                log.info("GPU up again", extra={"gpu": device.index, "uuid": device.uuid})
                del self._down[device.index]

    def _prepare_session(self) -> bool:
        """Brings NVML up (with backoff), applies a new selection, re-opens failed GPUs."""
        session = self.session
        if not session.start():
            return False
        try:
            if session.selection != self.config.devices:
                session.reselect(self.config.devices)
            session.reopen_failed()
            session.check_topology()
        except SessionLost as lost:
            session.lost(lost.reason)
            return False
        return True

    def sample_once(self) -> Snapshot:
        started = self._clock()
        up = self._prepare_session()
        builder = _FamilyBuilder(
            self._header,
            self.config.naming,
            self._host,
            self._prefixes,
            # Read each sample, so a reload that changes it applies from the next one.
            hostname_label=self.config.dcgm.hostname_label,
            rates=self._dcgm_rates,
        )
        devices = self.session.devices if up else []
        # The deadline counts from here: a slow nvmlInit is not the GPUs' fault.
        results = self._read_devices(devices, self._clock()) if devices else {}
        lost = next((r.session_lost for r in results.values() if r.session_lost), None)
        if lost is not None:
            self.session.lost(lost)
            up, devices, results = False, [], {}
        builder.add(NVML_UP, (), 1 if up else 0)
        self._note_transitions(devices, results)
        wall = self._wall()
        if up:
            builder.add(GPU_DEVICES, (), self.session.total_devices)
        offline = [c for c in self._collectors if not c.reads_nvml]
        status: dict[str, list[tuple[bool, float, Counter[str]]]] = {}
        series: dict[tuple[int, str], tuple[SeriesCache, PlanCache]] = {}
        for device in devices:
            result = results[device.index]
            identity = (str(device.index), device.uuid)
            builder.add(GPU_UP, identity, 0 if result.down_reason else 1)
            if result.down_reason is None:
                self._last_read[identity] = wall
            else:
                builder.add(GPU_DOWN, (*identity, result.down_reason), 1)
            if identity in self._last_read:
                builder.add(GPU_LAST_SAMPLE, identity, self._last_read[identity])
            if result.down_reason is not None:
                # Static identity stays visible for a down GPU, so alerts can name its serial.
                out = Emitter()
                for collector in offline:
                    collector.collect(device, out)
                builder.add_device(device, out.samples)
                continue
            if result.lines:
                builder.add_lines(result.lines)
                series[(device.index, device.uuid)] = (result.series, result.plans)
            else:
                builder.add_device(device, result.samples)
            for name, outcome in result.status.items():
                status.setdefault(name, []).append(outcome)
        # Series of GPUs gone or down are forgotten, so the cache cannot grow with churn.
        self._series = series
        for collector in self._collectors:
            out = Emitter()
            try:
                collector.collect_global(out)
            except Exception as exc:
                status.setdefault(collector.name, []).append((False, 0.0, Counter(exception=1)))
                self._log_collector_failure(collector, None, exc)
            for spec, labels, value in out.samples:
                builder.add(spec, labels, value)
        for name, outcomes in status.items():
            for _, _, errors in outcomes:
                for kind, count in errors.items():
                    self._error_totals[(name, kind)] += count
            builder.add(COLLECTOR_SUCCESS, (name,), 1 if all(ok for ok, _, _ in outcomes) else 0)
            builder.add(COLLECTOR_DURATION, (name,), sum(seconds for _, seconds, _ in outcomes))
        for collector in self._collectors:
            # "exception" is always there, so rate() sees the first one.
            self._error_totals.setdefault((collector.name, "exception"), 0)
        enabled = {c.name for c in self._collectors}
        for (name, kind), total in sorted(self._error_totals.items()):
            if name in enabled:
                builder.add(COLLECTOR_ERRORS, (name, kind), total)
        finished = self._clock()
        builder.add(SAMPLE_DURATION, (), finished - started)
        builder.add(LAST_SAMPLE, (), self._wall())
        builder.add(RELOAD_SUCCESS, (), 1 if self.reload_successful else 0)
        builder.add(RELOAD_TIMESTAMP, (), self.reload_timestamp)
        builder.add(SAMPLE_FAILURES, (), self.sample_failures)
        web = self.web_status
        if web is not None:
            builder.add(WEB_RELOAD_SUCCESS, (), 1 if web.reload_successful else 0)
            expiry = web.certificate_expiry
            if expiry is not None:
                builder.add(CERTIFICATE_EXPIRY, (), expiry)
        self._prefixes = builder.prefixes
        process = [Family.from_metric(metric) for metric in self._process.collect()]
        families = builder.families() + self._static + process
        snapshot = Snapshot(
            families, self._wall(), openmetrics=self.config.naming != "dcgm", demand=self._demand
        )
        # Bodies scraped since the last sample are rendered here, before publishing, so busy
        # scrapers never wait for a render; with nobody scraping, nothing is rendered.
        wanted = list(self._demand)
        self._demand.clear()
        for fmt, compressed in wanted:
            snapshot.render(fmt, compressed)
        self.snapshot = snapshot
        # Only a published snapshot proves the loop works; /healthz goes by this.
        self.heartbeat = self._clock()
        if any(r.down_reason is None for r in results.values()):
            self.ready = True
        return snapshot

    # --- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = self._clock()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:
                # A bug must not kill the loop; /healthz turns red if it keeps happening.
                self.sample_failures += 1
                if self.sample_failures == 1 or log.isEnabledFor(logging.DEBUG):
                    log.exception("sample failed; further failures are counted")
            self._first_sample.set()
            next_tick += self.config.sampling.interval
            now = self._clock()
            next_tick = max(next_tick, now)
            self._stop.wait(next_tick - now)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def wait_for_first_sample(self, timeout: float) -> bool:
        return self._first_sample.wait(timeout)

    def has_sampled(self) -> bool:
        return self._first_sample.is_set()

    # Liveness fails after this many intervals without a published sample.
    STALE_INTERVALS = 10

    def health_problem(self, now: float | None = None) -> str | None:
        """Why the exporter should be restarted, or None: a dead or stuck sampler loop."""
        if self._thread is None or not self._thread.is_alive():
            return "the sampler thread is not running"
        sampling = self.config.sampling
        allowance = sampling.deadline + self.STALE_INTERVALS * sampling.interval + 5
        silent = (self._clock() if now is None else now) - self.heartbeat
        if silent > allowance:
            return f"no sample published for {silent:.0f}s"
        return None

    def alive(self, now: float | None = None) -> bool:
        return self.health_problem(now) is None

    def readiness_problem(self) -> str | None:
        """Why Prometheus should not scrape yet, or None. Latched once ready, so that a later
        outage shows as nvml_up 0 in the data instead of the target vanishing."""
        if self.ready:
            return None
        if not self.session.up:
            reason = self.session.last_error or "not initialised yet"
            return f"NVML is not available ({reason})"
        return "no GPU has been read yet"

    def stop(self, timeout: float) -> bool:
        """Stops the loop and shuts NVML down; False if a device read was still stuck."""
        self._stop.set()
        deadline = self._clock() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - self._clock()))
        stuck = [f for f in self._pending.values() if not f.done()]
        self._readers.shutdown()
        if stuck or (self._thread is not None and self._thread.is_alive()):
            # nvmlShutdown while another thread is inside NVML is undefined; leave it to exit.
            return False
        for collector in self._instances.values():
            try:
                collector.close()
            except Exception:
                log.exception("closing a collector failed", extra={"collector": collector.name})
        self.session.shutdown()
        return True
