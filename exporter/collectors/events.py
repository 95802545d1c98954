"""XID errors and other critical GPU events, from an NVML event set waited on by a thread.

XIDs are the driver's error reports (a GPU fell off the bus, an uncorrectable ECC error, a
crashed kernel). Sampling cannot see them, so a dedicated thread blocks in nvmlEventSetWait
and counts each event exactly once; the collector only reads those counts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.collectors.shared import SampleContext
from exporter.nvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_PSTATE,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID,
    Device,
    Driver,
    ErrorKind,
    Handle,
    NvmlEvent,
    classify,
    error_code,
    error_name,
)

log = logging.getLogger(__name__)

# An event wakes the waiter at once; the timeout bounds how long stopping waits for the waiter
# (it must be out of the driver before nvmlShutdown), at two calls a second.
WAIT_MS = 500
RETRY_SECONDS = 2.0

# What the common XIDs mean, per NVIDIA's XID documentation, in our words.
XID_MEANINGS = {
    13: "graphics engine exception, usually an application fault (illegal access, bad launch)",
    31: "GPU memory page fault, usually an application bug",
    43: "GPU stopped processing: a user application faulted, the GPU recovered",
    45: "preemptive cleanup: processes were stopped after an earlier error",
    48: "double-bit (uncorrectable) ECC error",
    61: "internal micro-controller breakpoint or warning",
    62: "internal micro-controller halt: reset the GPU",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed: service the GPU",
    74: "NVLink error",
    79: "GPU has fallen off the bus: reset or replace it",
    92: "high single-bit ECC error rate",
    94: "contained ECC error: the application was stopped, the GPU is fine",
    95: "uncontained ECC error: reset the GPU",
    119: "GSP RPC timeout: reset the GPU",
    120: "GSP error: reset the GPU",
}
# XIDs after which the GPU itself needs attention, not just the application.
CRITICAL_XIDS = frozenset({48, 62, 64, 74, 79, 95, 119, 120})

# dcgm-exporter's err_msg label values (NVIDIA's XID catalogue names, as it spells them) for
# the XIDs described above: alerts written for dcgm-exporter may match on them.
XID_NAMES = {
    0: "No Error",
    13: "Graphics Engine Exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "Preemptive cleanup, due to previous errors -- Most likely to see when running "
    "multiple cuda",
    48: "Double Bit ECC Error",
    61: "Internal micro-controller breakpoint/warning",
    62: "Internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    74: "NVLINK Error",
    79: "GPU has fallen off the bus",
    92: "High single-bit ECC error rate",
    94: "Contained ECC error",
    95: "Uncontained ECC error",
    119: "GSP RPC Timeout",
    120: "GSP Error",
}
UNKNOWN_XID_NAME = "Unknown Error"


def xid_labels(value: float) -> tuple[tuple[str, str], ...]:
    """dcgm-exporter's labels on DCGM_FI_DEV_XID_ERRORS: the XID, and its name."""
    code = int(value)
    return (("err_code", str(code)), ("err_msg", XID_NAMES.get(code, UNKNOWN_XID_NAME)))


# DCGM reports the last XID, and 0 before the first: dcgm-exporter has the series from its
# first scrape, so `DCGM_FI_DEV_XID_ERRORS > 0` alerts see the change.
DCGM_XID = Dcgm(
    "DCGM_FI_DEV_XID_ERRORS",
    "Value of the last XID error encountered.",
    value_labels=xid_labels,
)

EVENT_NAMES = {
    EVENT_SINGLE_BIT_ECC: "single_bit_ecc",
    EVENT_DOUBLE_BIT_ECC: "double_bit_ecc",
    EVENT_PSTATE: "pstate_change",
}
# Not clock changes: under a power cap the clocks change many times a second, each a wake-up of
# the waiter (docs/performance.md), and the clocks and clock_event collectors show them anyway.
WANTED_EVENTS = EVENT_XID | EVENT_SINGLE_BIT_ECC | EVENT_DOUBLE_BIT_ECC | EVENT_PSTATE


@dataclass
class _GpuEvents:
    xids: Counter[int] = field(default_factory=Counter)
    others: Counter[str] = field(default_factory=Counter)
    last_xid: int | None = None
    last_xid_time: float | None = None


class EventWatcher:
    """One event set for all GPUs and a daemon thread waiting on it."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._lock = threading.Lock()
        self._event_set: Handle | None = None
        self._registered: dict[str, Handle] = {}  # uuid -> the handle registered
        self._counts: dict[str, _GpuEvents] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failure = ""
        self._retired: list[Handle] = []  # replaced event sets, freed by the waiter

    def register(self, device: Device) -> None:
        """Adds a GPU to the event set, once per handle (a re-initialised NVML gives new ones)."""
        with self._lock:
            if self._registered.get(device.uuid) is device.handle:
                return
            if device.uuid in self._registered:
                # NVML was re-initialised: the old set and its registrations are gone.
                self._reset_locked()
            if self._event_set is None:
                self._event_set = device.read_system(self._driver.create_event_set)
                if self._event_set is None:
                    return
            supported = device.cached(self._driver.supported_events)
            if supported is None:
                # Not known yet (absent for now, or failed): not registered, so that it is
                # tried again, as often as the device asks the driver again.
                return
            types = supported & WANTED_EVENTS
            if types:
                # The event set is an unhashable ctypes handle: remember absence by types only.
                device.read_as((types,), self._driver.register_events, self._event_set, types)
                if device.is_absent(self._driver.register_events, types):
                    return
            self._registered[device.uuid] = device.handle
            counts = self._counts.setdefault(device.uuid, _GpuEvents())
            if types & EVENT_XID:
                # Critical XIDs start at 0, so `increase()` sees the very first one.
                for xid in CRITICAL_XIDS:
                    counts.xids.setdefault(xid, 0)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nvml-events", daemon=True)
            self._thread.start()

    def _reset_locked(self) -> None:
        if self._event_set is not None:
            if self._thread is not None and self._thread.is_alive():
                # The waiter may be inside nvmlEventSetWait on it: it frees the set itself
                # once that wait returns.
                self._retired.append(self._event_set)
            else:
                self._free(self._event_set)
        self._event_set = None
        self._registered.clear()

    def _free(self, event_set: Handle) -> None:
        try:
            self._driver.free_event_set(event_set)
        except Exception as exc:
            if error_code(exc) is None:
                raise

    def counts(self, uuid: str) -> _GpuEvents | None:
        with self._lock:
            current = self._counts.get(uuid)
            if current is None:
                return None
            return _GpuEvents(
                Counter(current.xids),
                Counter(current.others),
                current.last_xid,
                current.last_xid_time,
            )

    def stop(self, timeout: float) -> bool:
        """Ends the waiter before NVML shuts down; False if it is still inside a wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        with self._lock:
            for event_set in self._retired:
                self._free(event_set)
            self._retired.clear()
            if self._event_set is not None:
                self._free(self._event_set)
                self._event_set = None
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                event_set = self._event_set
            if event_set is None:
                self._stop.wait(RETRY_SECONDS)
                continue
            try:
                event = self._driver.wait_event(event_set, WAIT_MS)
            except Exception as exc:
                event = None
                self._wait_failed(exc)
            with self._lock:
                for retired in self._retired:
                    self._free(retired)
                self._retired.clear()
            if event is not None:
                self._record(event)

    def _wait_failed(self, exc: Exception) -> None:
        code = error_code(exc)
        reason = error_name(code) if code is not None else type(exc).__name__
        if reason != self._failure:
            self._failure = reason
            log.warning("waiting for GPU events failed; retrying", extra={"reason": reason})
        if code is not None and classify(code) is ErrorKind.SESSION:
            with self._lock:
                self._event_set = None
                self._registered.clear()
        self._stop.wait(RETRY_SECONDS)

    def _record(self, event: NvmlEvent) -> None:
        self._failure = ""
        with self._lock:
            counts = self._counts.setdefault(event.uuid, _GpuEvents())
            if event.type & EVENT_XID:
                counts.xids[event.data] += 1
                counts.last_xid = event.data
                counts.last_xid_time = time.time()
            else:
                counts.others[EVENT_NAMES.get(event.type, f"type_{event.type:#x}")] += 1
        if event.type & EVENT_XID:
            meaning = XID_MEANINGS.get(event.data, "see NVIDIA's XID documentation")
            (log.error if event.data in CRITICAL_XIDS else log.warning)(
                "XID error", extra={"uuid": event.uuid, "xid": event.data, "meaning": meaning}
            )


XID_ERRORS = MetricSpec(
    "nvml_xid_errors_total",
    "counter",
    "XID errors the driver reported for this GPU since the exporter started, by XID code.",
    labels=("xid",),
    source="nvmlEventSetWait_v2, nvmlEventTypeXidCriticalError",
    # Present from the first sample wherever the GPU's XIDs are watched.
    dcgm_baseline=(DCGM_XID,),
)
XID_LAST = MetricSpec(
    "nvml_xid_last_code",
    "gauge",
    "The most recent XID on this GPU (absent until one happens).",
    source="nvmlEventSetWait_v2, nvmlEventTypeXidCriticalError",
    dcgm=(DCGM_XID,),
    dcgm_note='labels err_code, err_msg; 0 with err_code="0", err_msg="No Error" before the '
    'first XID; err_msg names the common XIDs, "Unknown Error" the others',
)
XID_LAST_TIME = MetricSpec(
    "nvml_xid_last_timestamp_seconds",
    "gauge",
    "Unix time of the most recent XID on this GPU (absent until one happens).",
    unit="seconds",
    source="nvmlEventSetWait_v2",
)
EVENTS = MetricSpec(
    "nvml_events_total",
    "counter",
    "Other NVML events: single_bit_ecc, double_bit_ecc, pstate_change.",
    labels=("event",),
    source="nvmlEventSetWait_v2",
)


class EventsCollector(Collector):
    name = "events"
    metrics = (XID_ERRORS, XID_LAST, XID_LAST_TIME, EVENTS)

    def __init__(self) -> None:
        self._watcher: EventWatcher | None = None
        self._watcher_lock = threading.Lock()

    def _watcher_for(self, device: Device) -> EventWatcher:
        with self._watcher_lock:
            if self._watcher is None:
                self._watcher = EventWatcher(device.driver)
            return self._watcher

    def close(self) -> None:
        with self._watcher_lock:
            watcher, self._watcher = self._watcher, None
        # One wait's timeout and a little: nvmlShutdown must not run under a waiting thread.
        if watcher is not None and not watcher.stop(WAIT_MS / 1000 + 0.5):
            log.warning("the GPU event waiter did not stop in time")

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        watcher = self._watcher_for(device)
        watcher.register(device)
        counts = watcher.counts(device.uuid)
        if counts is None:
            return
        for xid, count in sorted(counts.xids.items()):
            out.add(XID_ERRORS, count, str(xid))
        for name, count in sorted(counts.others.items()):
            out.add(EVENTS, count, name)
        if counts.last_xid is not None and counts.last_xid_time is not None:
            out.add(XID_LAST, counts.last_xid)
            out.add(XID_LAST_TIME, counts.last_xid_time)
