"""NVML's lifecycle: init with capped exponential backoff, enumeration, re-opening GPUs that
failed to open, shutdown."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from exporter.nvml.codes import ErrorKind, classify, error_name
from exporter.nvml.device import Device, DeviceIdentity, Selection, System
from exporter.nvml.driver import Driver
from exporter.nvml.errors import DeviceLost, NvmlError, error_code
from exporter.nvml.values import ARCHITECTURES

# One logger for the package: its lines say `logger=exporter.nvml` whichever module wrote them.
log = logging.getLogger(__package__)


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
        except NvmlError as exc:
            self._failed(error_name(exc.code), now)
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
        except NvmlError:
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
        except (NvmlError, DeviceLost) as exc:
            if isinstance(exc, NvmlError) and classify(exc.code) is ErrorKind.SESSION:
                raise
            reason = exc.reason if isinstance(exc, DeviceLost) else error_name(exc.code)
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
        # A library that stopped working may fail to shut down as well; nothing is left to do.
        with contextlib.suppress(NvmlError):
            self.driver.shutdown()

    def shutdown(self) -> None:
        if self.up:
            self.up = False
            self.devices = []
            self._shutdown_quietly()
