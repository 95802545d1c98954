"""One GPU as the collectors see it. `Device.read` and its variants apply the error policy to
every call, whichever driver is behind it, by what `classify` makes of the return code:
- ABSENT: the value is absent; remembered per device and call, so it is not attempted again
  every interval, but asked once more every REPROBE_SECONDS, and forgotten when the GPU is lost
  (it is read afresh once back);
- LOST: the device is down (`DeviceLost`);
- SESSION: NVML as a whole is (`SessionLost`);
- NO_VALUE: the value is absent this time, and that is no failure;
- FAULT: the value is absent this time, counted as an error, logged once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from exporter.nvml.codes import SUCCESS, ErrorKind, classify, error_name
from exporter.nvml.driver import Driver
from exporter.nvml.errors import DeviceLost, NvmlError, SessionLost
from exporter.nvml.fields import FieldBatch
from exporter.nvml.values import FieldRequest, FieldResult, Handle

# One logger for the package: its lines say `logger=exporter.nvml` whichever module wrote them.
log = logging.getLogger(__package__)

P = ParamSpec("P")
T = TypeVar("T")

# How long an ABSENT answer (NOT_SUPPORTED, say) stands before the call, field or GPM metric is
# asked once more, in the sampler's clock. Most such answers are for good (fans on an SXM
# board), so asking every sample would be waste; but some are not: a driver can answer
# NOT_SUPPORTED while a GPU is being reconfigured or recovering, and a value that becomes
# supported must come back without a restart. One call per capability per period keeps what
# stays unsupported cheap, and a value that comes back is missing for at most this long.
REPROBE_SECONDS = 30.0


_UNKNOWN = object()
# What a Device remembers an answer under: a call's name (or "field", or a name a collector
# chooses) and its arguments.
_Key = tuple[str, tuple[object, ...]]


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
        self._fields = FieldBatch()
        # Failing calls already logged; a call is logged again only after it worked again.
        self._failing: set[tuple[str, int]] = set()
        # Errors by name, read by the sampler around each collector to attribute them to it.
        self.errors: Counter[str] = Counter()
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
        if self._absent_now(key):
            return None
        try:
            result = call()
        except NvmlError as exc:
            self._apply_policy(key, exc.code, exc)
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
        kind = classify(code)
        self._raise_if_down(kind, code, cause)
        if kind is ErrorKind.NO_VALUE:
            return
        if kind is ErrorKind.ABSENT:
            self._mark_absent(key, error_name(code))
            return
        name = key[0]
        self.errors[error_name(code)] += 1
        if (name, code) not in self._failing:
            self._failing.add((name, code))
            log.warning(
                "NVML call failed; counted from now on, logged again once it has recovered",
                extra={"gpu": self.index, "call": name, "reason": error_name(code)},
            )

    def _raise_if_down(self, kind: ErrorKind, code: int, cause: BaseException | None) -> None:
        """SessionLost or DeviceLost for an error that ends more than this one read."""
        if kind is ErrorKind.SESSION:
            raise SessionLost(error_name(code)) from cause
        if kind is ErrorKind.LOST:
            self.forget_absent()
            raise DeviceLost(error_name(code)) from cause

    def _mark_absent(self, key: _Key, reason: str) -> None:
        self._absent[key] = self.clock() + REPROBE_SECONDS
        if key[0] == "field":
            # Left out of the batch from now on (until it is due again).
            self._fields.replan()
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

    def _absent_now(self, key: _Key, now: float | None = None) -> bool:
        """Whether `key` answered "absent" less than REPROBE_SECONDS ago; a mark that is due
        is dropped, so that the next read asks."""
        if not self._absent:  # the common case, answered without a lookup
            return False
        until = self._absent.get(key)
        if until is None:
            return False
        if (self.clock() if now is None else now) < until:
            return True
        del self._absent[key]
        return False

    def _field_absent_until(self, request: FieldRequest, now: float) -> float | None:
        """Until when a field that answered "absent" is left out of the batch; None to ask it."""
        key = ("field", request)
        return self._absent[key] if self._absent_now(key, now) else None

    def forget_absent(self) -> None:
        """Forgets every "absent" answer at once, so that each is asked at the next read: for a
        GPU that was lost (reset, re-seated, its driver state rebuilt), which may answer
        differently once back."""
        self._absent.clear()
        self._fields.replan()
        # Absence that `recent` holds as a None answer, too.
        self._recent = {key: entry for key, entry in self._recent.items() if entry[1] is not None}

    def mark_absent(self, name: str, *args: object, reason: str = "not_supported") -> None:
        """Remembers as absent something a collector judges by an answer's content rather than
        its return code (a GPM metric's own code, say); asked again like an absent call."""
        self._mark_absent((name, args), reason)

    def marked_absent(self, name: str, *args: object) -> bool:
        """Whether `mark_absent(name, *args)` still stands."""
        return self._absent_now((name, args))

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
            or (entry[1] is None and key in self._absent and not self._absent_now(key, now))
        ):
            entry = self._recent[key] = (now, self.read(fn, *args, **kwargs))
        return entry[1]  # type: ignore[return-value]

    def read_slowly(
        self, fn: Callable[Concatenate[Handle, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T | None:
        """Like `recent`, as seldom as the slow fields are read: for a call that stands in for
        a slow field where the GPU lacks it."""
        return self.recent(self._fields.slow_every, fn, *args, **kwargs)

    def fetch_fields(
        self,
        requests: Sequence[FieldRequest],
        slow_every: float,
        slow_fields: frozenset[int] = frozenset(),
    ) -> None:
        """Reads every field the collectors want in one nvmlDeviceGetFieldValues call; those
        in `slow_fields` once `slow_every` seconds have passed, their last entries standing
        until then."""
        now = self.clock()
        asked, fresh = self._fields.due(
            requests, now, slow_every, slow_fields, self._field_absent_until
        )
        if not asked:
            return
        try:
            results = self.driver.field_values(self.handle, asked)
        except NvmlError as exc:
            self._raise_if_down(classify(exc.code), exc.code, exc)
            # The whole call failed (an old driver without it, say): each field inherits the
            # outcome, so its collector sees it exactly as if its own entry had failed.
            results = [(exc.code, None)] * len(asked)
        self._fields.answered(asked, results, fresh)

    def field(self, field_id: int, scope: int = 0) -> float | None:
        """A value from the last `fetch_fields` (or, for a slow field, the last that read
        them), with the error policy applied to its entry once."""
        result = self._fields.entry((field_id, scope))
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
        return [self._fields.entry(request) for request in requests]

    def is_absent(self, fn: Callable[..., object], *args: object) -> bool:
        """Whether the call answered "absent" less than REPROBE_SECONDS ago."""
        return self._absent_now((fn.__name__, args))

    def field_failed(self, field_id: int, scope: int = 0) -> bool:
        """True when the field's entry in the last `fetch_fields` failed with an error that
        counts (not unsupported, not merely without a value): asking another way in the same
        sample would count the failure twice."""
        result = self._fields.entry((field_id, scope))
        if result is None or result[0] == SUCCESS:
            return False
        return classify(result[0]) not in (ErrorKind.ABSENT, ErrorKind.NO_VALUE)

    def field_absent(self, field_id: int, scope: int = 0) -> bool:
        """True once the field's entry answered NOT_SUPPORTED (or another absent code), until
        it is due to be asked again: meanwhile it is not requested, and a collector may ask
        for an alternative instead."""
        return self._absent_now(("field", (field_id, scope)))
