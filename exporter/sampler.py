"""The background loop: every interval, read each device once and publish a new Snapshot.

Devices are read one after another on a reader thread against a deadline; when a read stalls,
the rest move to another thread, so a GPU whose NVML calls hang delays neither the other GPUs
nor any scrape: it is reported down with reason `timeout`, and while its previous read is still
outstanding it is skipped rather than piled on.

The sampler decides what is read when; exporter.deviceread runs the collectors on one GPU, each
in its own error boundary, and exporter.exposition renders what they found.
"""

from __future__ import annotations

import functools
import logging
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Protocol

from prometheus_client import ProcessCollector

from exporter import __version__
from exporter.collectors import (
    COLLECTORS,
    Collector,
    Dcgm,
    Emitter,
    MetricSpec,
    SampleContext,
    Services,
    enabled_collectors,
)
from exporter.collectors.base import IDENTITY_LABELS
from exporter.config import Config
from exporter.deviceread import CollectorFailures, CollectorOutcome, DeviceResult, read_device
from exporter.exposition import (
    FamilyBuilder,
    PlanCache,
    SeriesCache,
    SeriesEmitter,
    dcgm,
    family_header,
)
from exporter.nvml import Device, Driver, Session, SessionLost, binding_version
from exporter.readers import Readers
from exporter.selfmetrics import (
    BACKEND_INFO,
    BUILD_INFO,
    CERTIFICATE_EXPIRY,
    COLLECTOR_DURATION,
    COLLECTOR_ERRORS,
    COLLECTOR_SUCCESS,
    GPU_DEVICES,
    GPU_DOWN,
    GPU_LAST_SAMPLE,
    GPU_UP,
    LAST_SAMPLE,
    NVML_UP,
    RELOAD_SUCCESS,
    RELOAD_TIMESTAMP,
    SAMPLE_DURATION,
    SAMPLE_FAILURES,
    WEB_RELOAD_SUCCESS,
)
from exporter.snapshot import Family, Format, Header, Snapshot, label_pairs

log = logging.getLogger(__name__)


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
        self._readers: Readers[DeviceResult] = Readers()
        self._series: dict[tuple[int, str], tuple[SeriesCache, PlanCache]] = {}
        self._headers: dict[MetricSpec | Dcgm, Header] = {}
        self._prefixes: dict[tuple[MetricSpec, tuple[str, ...]], str] = {}
        self._pending: dict[int, Future[DeviceResult]] = {}
        self._error_totals: Counter[tuple[str, str]] = Counter()
        self._down: dict[int, str] = {}
        self._last_read: dict[tuple[str, str], float] = {}
        self._demand: set[tuple[Format, bool]] = set()
        self._failures = CollectorFailures()
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
        builder = FamilyBuilder(self._header)
        builder.add(BUILD_INFO, (__version__, platform.python_version(), binding_version()), 1)
        builder.add(BACKEND_INFO, (self.config.backend,), 1)
        return builder.families()

    def _header(self, spec: MetricSpec | Dcgm) -> Header:
        header = self._headers.get(spec)
        if header is None:
            header = self._headers[spec] = family_header(spec, self.config.sampling)
        return header

    def _read_device(self, device: Device, collectors: Sequence[Collector]) -> DeviceResult:
        out: Emitter
        if self.config.naming == "dcgm":
            out = Emitter()
        else:
            identity = label_pairs(IDENTITY_LABELS, (str(device.index), device.uuid))
            series, plans = self._series.get((device.index, device.uuid), ({}, {}))
            out = SeriesEmitter(identity, series, plans)
        slow_fields_interval = self.config.sampling.slow_fields_interval
        return read_device(device, collectors, out, self._failures, slow_fields_interval)

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
        """Reads the GPUs and the collectors' global series, then publishes them all, with the
        exporter's own health, as the new snapshot."""
        started = self._clock()
        up, devices, results = self._read_gpus()
        builder = FamilyBuilder(
            self._header,
            self.config.naming,
            self._host,
            self._prefixes,
            # Read each sample, so a reload that changes it applies from the next one.
            hostname_label=self.config.dcgm.hostname_label,
            rates=self._dcgm_rates,
        )
        builder.add(NVML_UP, (), 1 if up else 0)
        self._note_transitions(devices, results)
        if up:
            builder.add(GPU_DEVICES, (), self.session.total_devices)
        status = self._add_gpus(builder, devices, results)
        self._add_global_series(builder, status)
        self._add_collector_health(builder, status)
        self._add_exporter_health(builder, started)
        snapshot = self._publish(builder)
        if any(r.down_reason is None for r in results.values()):
            self.ready = True
        return snapshot

    def _read_gpus(self) -> tuple[bool, list[Device], dict[int, DeviceResult]]:
        """Whether NVML is up, the GPUs to report and what each read found."""
        if not self._prepare_session():
            return False, [], {}
        devices = self.session.devices
        # The deadline counts from here: a slow nvmlInit is not the GPUs' fault.
        results = self._read_devices(devices, self._clock()) if devices else {}
        lost = next((r.session_lost for r in results.values() if r.session_lost), None)
        if lost is not None:
            self.session.lost(lost)
            return False, [], {}
        return True, devices, results

    def _add_gpus(
        self,
        builder: FamilyBuilder,
        devices: Sequence[Device],
        results: Mapping[int, DeviceResult],
    ) -> dict[str, list[CollectorOutcome]]:
        """Each GPU's health and series; returns its collectors' outcomes by collector name."""
        wall = self._wall()  # the time of the reads that succeeded
        offline = [c for c in self._collectors if not c.reads_nvml]
        status: dict[str, list[CollectorOutcome]] = {}
        series: dict[tuple[int, str], tuple[SeriesCache, PlanCache]] = {}
        for device in devices:
            result = results[device.index]
            self._add_gpu_health(builder, device, result.down_reason, wall)
            if result.down_reason is not None:
                # Static identity stays visible for a down GPU, so alerts can name its serial.
                out = Emitter()
                for collector in offline:
                    collector.collect(device, out, SampleContext())
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
        return status

    def _add_gpu_health(
        self, builder: FamilyBuilder, device: Device, down_reason: str | None, wall: float
    ) -> None:
        identity = (str(device.index), device.uuid)
        builder.add(GPU_UP, identity, 0 if down_reason else 1)
        if down_reason is None:
            self._last_read[identity] = wall
        else:
            builder.add(GPU_DOWN, (*identity, down_reason), 1)
        if identity in self._last_read:
            builder.add(GPU_LAST_SAMPLE, identity, self._last_read[identity])

    def _add_global_series(
        self, builder: FamilyBuilder, status: dict[str, list[CollectorOutcome]]
    ) -> None:
        """The series collectors report once for the host, each in its own error boundary."""
        for collector in self._collectors:
            out = Emitter()
            try:
                collector.collect_global(out)
            except Exception as exc:
                status.setdefault(collector.name, []).append((False, 0.0, Counter(exception=1)))
                self._failures.failed(collector, None, exc)
            for spec, labels, value in out.samples:
                builder.add(spec, labels, value)

    def _add_collector_health(
        self, builder: FamilyBuilder, status: Mapping[str, list[CollectorOutcome]]
    ) -> None:
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

    def _add_exporter_health(self, builder: FamilyBuilder, started: float) -> None:
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

    def _publish(self, builder: FamilyBuilder) -> Snapshot:
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

    def has_sampled(self) -> bool:
        return self._first_sample.is_set()

    # Liveness fails after this many intervals without a published sample.
    STALE_INTERVALS = 10

    def health_problem(self) -> str | None:
        """Why the exporter should be restarted, or None: a dead or stuck sampler loop."""
        if self._thread is None or not self._thread.is_alive():
            return "the sampler thread is not running"
        sampling = self.config.sampling
        allowance = sampling.deadline + self.STALE_INTERVALS * sampling.interval + 5
        silent = self._clock() - self.heartbeat
        if silent > allowance:
            return f"no sample published for {silent:.0f}s"
        return None

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
