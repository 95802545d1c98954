"""When the faults a simulation is configured with fire, and what a call gets when they do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from exporter.nvml import GPU_IS_LOST, NOT_SUPPORTED, SUCCESS

if TYPE_CHECKING:
    # Types only: the configuration imports this package's catalogue of models.
    from exporter.config import FaultConfig


class FaultInjector:
    """The configured faults over simulated time: `elapsed` reads the seconds since the
    simulation started."""

    def __init__(self, faults: Sequence[FaultConfig], elapsed: Callable[[], float]) -> None:
        self._faults = faults
        self._elapsed = elapsed
        self._xid_lock = threading.Lock()
        self._delivered: set[int] = set()  # xid faults already reported

    def _active(self, fault: FaultConfig) -> bool:
        t = self._elapsed()
        return t >= fault.start and (fault.duration is None or t < fault.start + fault.duration)

    def apply(self, device: int, function: str, named_only: bool = False) -> int:
        """Applies the faults active for `function` on the device: sleeps for a slow one;
        returns the code a failing one answers with, else SUCCESS. `named_only` leaves out
        faults that name no function, for a call that already had them applied."""
        accepted = (function,) if named_only else (None, function)
        for fault in self._faults:
            if fault.device not in (None, device) or not self._active(fault):
                continue
            if fault.kind == "lost":
                return GPU_IS_LOST
            if fault.function in accepted:
                if fault.kind == "unsupported":
                    return NOT_SUPPORTED
                if fault.kind == "slow":
                    time.sleep(fault.delay)
        return SUCCESS

    def init_fails(self) -> bool:
        return any(fault.kind == "init_failure" and self._active(fault) for fault in self._faults)

    def take_due_xid(self) -> tuple[int, int] | None:
        """The device and XID of an xid fault that is due and not yet reported, which counts
        as reported from now on; None if there is none."""
        with self._xid_lock:
            for number, fault in enumerate(self._faults):
                due = fault.kind == "xid" and self._elapsed() >= fault.start
                if due and number not in self._delivered and fault.device is not None:
                    self._delivered.add(number)
                    return fault.device, fault.xid or 0
        return None
