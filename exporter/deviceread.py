"""One GPU's read: its field values fetched in one batch, then every enabled collector run in
an error boundary of its own, so that an exception in one shows up as
`nvml_collector_success{collector} 0` and costs nothing else. A lost GPU or NVML session ends
the read: the GPU is reported down."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from exporter.collectors import Collector, Emitter, MetricSpec, SampleContext
from exporter.collectors.base import Sample
from exporter.exposition import PlanCache, SeriesCache, SeriesEmitter
from exporter.nvml import Device, DeviceLost, FieldRequest, SessionLost

log = logging.getLogger(__name__)

# (succeeded, seconds, errors by kind) of one collector on one GPU, or of its global series
CollectorOutcome = tuple[bool, float, Counter[str]]


@dataclass
class DeviceResult:
    samples: list[Sample] = field(default_factory=list)  # naming: dcgm
    lines: dict[MetricSpec, list[str]] = field(default_factory=dict)  # naming: nvml
    series: SeriesCache = field(default_factory=dict)
    plans: PlanCache = field(default_factory=dict)
    status: dict[str, CollectorOutcome] = field(default_factory=dict)  # by collector name
    down_reason: str | None = None
    session_lost: str | None = None


_NO_ERRORS: Counter[str] = Counter()


class CollectorFailures:
    """Logs a collector's failure with traceback once per collector and kind of error, until
    the collector works again; every failure is counted either way."""

    def __init__(self) -> None:
        # (collector name, exception type name) logged with traceback since it last worked
        self.logged: set[tuple[str, str]] = set()

    def failed(self, collector: Collector, device: Device | None, exc: Exception) -> None:
        where = {"collector": collector.name, "gpu": "" if device is None else device.index}
        key = (collector.name, type(exc).__name__)
        if key in self.logged:
            log.debug("collector failed", extra=where, exc_info=exc)
            return
        self.logged.add(key)
        log.error(
            "collector failed; further failures of this kind are counted, not logged",
            extra=where,
            exc_info=exc,
        )

    def worked(self, collector: Collector) -> None:
        """A collector that works again gets its next failure logged again."""
        healed = {key for key in self.logged if key[0] == collector.name}
        if healed:
            self.logged -= healed
            log.info("collector works again", extra={"collector": collector.name})


def read_device(
    device: Device,
    collectors: Sequence[Collector],
    out: Emitter,
    failures: CollectorFailures,
    slow_fields_interval: float,
) -> DeviceResult:
    """Runs `collectors` on `device` into `out`, with each collector's outcome."""
    result = DeviceResult()
    context = SampleContext()
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
                failures.failed(collector, device, exc)
        slow = frozenset().union(*(collector.slow_fields for collector in collectors))
        device.fetch_fields(requests, slow_fields_interval, slow)
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
            collector.collect(device, out, context)
        except DeviceLost as lost:
            return DeviceResult(down_reason=lost.reason)
        except SessionLost as lost:
            return DeviceResult(down_reason=lost.reason, session_lost=lost.reason)
        except Exception as exc:
            errors = Counter(exception=1)
            failures.failed(collector, device, exc)
        if device.errors and device.errors != before:
            errors = errors + (device.errors - before)
        if collector.name in failed:
            errors = errors + Counter(exception=1)
        elif failures.logged and not errors:
            failures.worked(collector)
        ok = not errors
        result.status[collector.name] = (ok, time.perf_counter() - started, errors)
    if isinstance(out, SeriesEmitter):
        result.lines = out.lines
        result.series = out.series
        result.plans = out.plans
    else:
        result.samples = out.samples
    return result
