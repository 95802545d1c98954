"""NVML's C structures read from their raw bytes with `struct`, every entry of an answer in one
unpack: ctypes attribute access costs microseconds per attribute, which for a GPU's fields and
GPM metrics costs more than the calls. The layouts are derived from the ctypes structures the
pynvml driver passes in, so this module needs no binding of its own."""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from exporter.nvml.codes import SUCCESS, UNKNOWN
from exporter.nvml.values import FieldResult, ProcessInfo

# NVML's "not available" for unsigned fields.
_UINT_NA = 0xFFFFFFFF
_ULL_NA = 0xFFFFFFFFFFFFFFFF

# nvmlSample_t: timeStamp, value union.
SAMPLE_ENTRY = struct.Struct("<Q8s")
# nvmlProcessInfo_v3_t (the same layout as _v2_t): pid, usedGpuMemory, gpuInstanceId,
# computeInstanceId, with padding after pid.
PROCESS_ENTRY = struct.Struct("<I4xQII")
# nvmlValueType_t -> how the value union holds it (c_ulong is 64-bit on Linux).
_UNION_LAYOUTS = {
    0: struct.Struct("<d"),
    1: struct.Struct("<I"),
    2: struct.Struct("<Q"),
    3: struct.Struct("<Q"),
    4: struct.Struct("<q"),
    5: struct.Struct("<i"),
    6: struct.Struct("<H"),
}


def field_entry_format(entry: Any) -> str:
    """Where nvmlFieldValue_t (the ctypes structure `entry`) keeps valueType, nvmlReturn
    (adjacent) and the value union, as the struct format of one entry."""
    type_at, value_at = entry.valueType.offset, entry.value.offset
    assert entry.nvmlReturn.offset == type_at + 4
    return f"{type_at}xII{value_at - type_at - 8}xQ{ctypes.sizeof(entry) - value_at - 8}x"


def decode_fields(flat: tuple[int, ...]) -> list[FieldResult]:
    """(code, value) per entry from (valueType, nvmlReturn, raw 64-bit union) triples."""
    results: list[FieldResult] = []
    append = results.append
    triples = iter(flat)
    for value_type, code, raw in zip(triples, triples, triples, strict=True):
        # Each entry carries its own return code; the call's SUCCESS says nothing about it.
        if code != SUCCESS:
            append((code, None))
        elif value_type in (2, 3):  # unsigned long (long): all 64 bits
            append((SUCCESS, raw))
        elif value_type == 1:  # unsigned int: the union's low half; the rest is not ours
            append((SUCCESS, raw & 0xFFFFFFFF))
        else:
            layout = _UNION_LAYOUTS.get(value_type)
            if layout is None:
                append((UNKNOWN, None))
            else:
                append((SUCCESS, layout.unpack_from(raw.to_bytes(8, "little"))[0]))
    return results


def decode_samples(raw: bytes, value_type: int) -> list[tuple[int, float]]:
    """(timestamp, value) per nvmlSample_t, the union read as `value_type` says."""
    layout = _UNION_LAYOUTS.get(value_type, _UNION_LAYOUTS[1])
    return [
        (timestamp, float(layout.unpack_from(value)[0]))
        for timestamp, value in SAMPLE_ENTRY.iter_unpack(raw)
    ]


def decode_processes(raw: bytes) -> list[ProcessInfo]:
    return [
        ProcessInfo(
            pid=pid,
            # NVML_VALUE_NOT_AVAILABLE where the driver cannot tell (WDDM on Windows).
            used_memory=None if used == _ULL_NA else used,
            gpu_instance=None if gi == _UINT_NA else gi,
            compute_instance=None if ci == _UINT_NA else ci,
        )
        for pid, used, gi, ci in PROCESS_ENTRY.iter_unpack(raw)
    ]


def gpm_answer_layout(request: Any, metric: Any, count: int) -> struct.Struct:
    """(nvmlReturn, value) of each of `count` metrics in nvmlGpmMetricsGet_t (the ctypes
    structure `request`, its entries the structure `metric`)."""
    code_at, value_at = metric.nvmlReturn.offset, metric.value.offset
    tail = ctypes.sizeof(metric) - value_at - 8
    return struct.Struct(
        f"<{request.metrics.offset}x" + f"{code_at}xI{value_at - code_at - 4}xd{tail}x" * count
    )


def decode_gpm(flat: tuple[Any, ...]) -> list[tuple[int, float | None]]:
    """(code, value) per metric; like field values, each metric carries its own return code."""
    return [
        (code, value if code == SUCCESS else None)
        for code, value in zip(flat[::2], flat[1::2], strict=True)
    ]
