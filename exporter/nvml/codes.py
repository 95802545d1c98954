"""NVML's return codes, their nvml.h names, and what each means to the exporter (`classify`),
spelled once here so that every driver (the pynvml one, the simulated one) and everything above
them speaks the same language."""

from __future__ import annotations

import enum

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

# Every NVML_ERROR_* of nvml.h by its name there, lower case: NVML_ERROR_GPU_IS_LOST ->
# "gpu_is_lost". These names are the `reason` of logs and error counts.
_ERROR_NAMES = {
    UNINITIALIZED: "uninitialized",
    INVALID_ARGUMENT: "invalid_argument",
    NOT_SUPPORTED: "not_supported",
    NO_PERMISSION: "no_permission",
    5: "already_initialized",
    NOT_FOUND: "not_found",
    INSUFFICIENT_SIZE: "insufficient_size",
    8: "insufficient_power",
    DRIVER_NOT_LOADED: "driver_not_loaded",
    TIMEOUT: "timeout",
    11: "irq_issue",
    LIBRARY_NOT_FOUND: "library_not_found",
    FUNCTION_NOT_FOUND: "function_not_found",
    14: "corrupted_inforom",
    GPU_IS_LOST: "gpu_is_lost",
    RESET_REQUIRED: "reset_required",
    17: "operating_system",
    LIB_RM_VERSION_MISMATCH: "lib_rm_version_mismatch",
    19: "in_use",
    20: "memory",
    NO_DATA: "no_data",
    22: "vgpu_ecc_not_supported",
    23: "insufficient_resources",
    24: "freq_not_supported",
    ARGUMENT_VERSION_MISMATCH: "argument_version_mismatch",
    DEPRECATED: "deprecated",
    27: "not_ready",
    GPU_NOT_FOUND: "gpu_not_found",
    29: "invalid_state",
    30: "reset_type_not_supported",
    UNKNOWN: "unknown",
}


def error_name(code: int) -> str:
    return _ERROR_NAMES.get(code, f"error_{code}")


class ErrorKind(enum.Enum):
    """What a return code other than SUCCESS means for the value asked for."""

    # Not there on this GPU or driver (fans on an SXM board), or not for us to read: not an
    # error; remembered, and asked again now and then.
    ABSENT = "absent"
    # The GPU stopped answering (fell off the bus, needs a reset).
    LOST = "lost"
    # The library as a whole stopped working (driver unloaded or upgraded under us).
    SESSION = "session"
    # Nothing to report right now, not a failure.
    NO_VALUE = "no_value"
    # Anything else: this read failed, and counts as an error.
    FAULT = "fault"


_KINDS = {
    NOT_SUPPORTED: ErrorKind.ABSENT,
    FUNCTION_NOT_FOUND: ErrorKind.ABSENT,
    NO_PERMISSION: ErrorKind.ABSENT,
    ARGUMENT_VERSION_MISMATCH: ErrorKind.ABSENT,
    DEPRECATED: ErrorKind.ABSENT,
    GPU_IS_LOST: ErrorKind.LOST,
    RESET_REQUIRED: ErrorKind.LOST,
    GPU_NOT_FOUND: ErrorKind.LOST,
    UNINITIALIZED: ErrorKind.SESSION,
    DRIVER_NOT_LOADED: ErrorKind.SESSION,
    LIB_RM_VERSION_MISMATCH: ErrorKind.SESSION,
    NOT_FOUND: ErrorKind.NO_VALUE,
    NO_DATA: ErrorKind.NO_VALUE,
}


def classify(code: int) -> ErrorKind:
    """The one place that decides what an error code means."""
    return _KINDS.get(code, ErrorKind.FAULT)
