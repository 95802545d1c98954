"""What goes wrong talking to NVML, as the exporter's own exception types: a driver raises
NvmlError; a Device turns the codes that end more than one read into SessionLost or
DeviceLost."""

from __future__ import annotations

from exporter.nvml.codes import error_name


class NvmlError(Exception):
    """An NVML return code other than SUCCESS, from either driver."""

    def __init__(self, code: int, function: str = "") -> None:
        super().__init__(f"{function or 'NVML'}: {error_name(code)} ({code})")
        self.code = code


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
