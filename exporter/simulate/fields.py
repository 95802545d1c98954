"""The NVML field values of a simulated GPU, each read from the device's state."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from exporter.nvml import (
    FI_ECC_DBE_AGG_TOTAL,
    FI_ECC_DBE_VOL_TOTAL,
    FI_ECC_SBE_AGG_TOTAL,
    FI_ECC_SBE_VOL_TOTAL,
    FI_MEMORY_TEMP,
    FI_NVLINK_ERROR_DL_CRC,
    FI_NVLINK_ERROR_DL_RECOVERY,
    FI_NVLINK_ERROR_DL_REPLAY,
    FI_NVLINK_GET_STATE,
    FI_NVLINK_LINK_COUNT,
    FI_NVLINK_THROUGHPUT_DATA_RX,
    FI_NVLINK_THROUGHPUT_DATA_TX,
    FI_PCIE_COUNT_RX_BYTES,
    FI_PCIE_COUNT_TX_BYTES,
    FI_PCIE_REPLAY_COUNTER,
    FI_PERF_POLICY_BOARD_LIMIT,
    FI_PERF_POLICY_LOW_UTILIZATION,
    FI_PERF_POLICY_POWER,
    FI_PERF_POLICY_RELIABILITY,
    FI_PERF_POLICY_SYNC_BOOST,
    FI_PERF_POLICY_THERMAL,
    FI_POWER_AVERAGE,
    FI_POWER_CURRENT_LIMIT,
    FI_POWER_INSTANT,
    FI_REMAPPED_COR,
    FI_REMAPPED_FAILURE,
    FI_REMAPPED_PENDING,
    FI_REMAPPED_UNC,
    FI_RETIRED_DBE,
    FI_RETIRED_PENDING,
    FI_RETIRED_SBE,
    FI_TOTAL_ENERGY_CONSUMPTION,
    NOT_SUPPORTED,
    SUCCESS,
    FieldRequest,
    FieldResult,
)
from exporter.nvml.values import FI_PCIE_COUNT_CORRECTABLE_ERRORS
from exporter.simulate.physics import DeviceState

# Fields scoped to one NVLink: the value for link `link` of the device.
_PER_LINK: dict[int, Callable[[DeviceState, int], int]] = {
    FI_NVLINK_GET_STATE: lambda s, link: 1,
    FI_NVLINK_THROUGHPUT_DATA_TX: lambda s, link: int(s.nvlink_kib[link]),
    FI_NVLINK_THROUGHPUT_DATA_RX: lambda s, link: int(s.nvlink_kib[link] * 0.98),
    FI_NVLINK_ERROR_DL_CRC: lambda s, link: 0,
    FI_NVLINK_ERROR_DL_REPLAY: lambda s, link: 0,
    FI_NVLINK_ERROR_DL_RECOVERY: lambda s, link: 0,
}


def _device_wide(s: DeviceState) -> dict[int, float]:
    """The fields that hold for the whole device, those its model has."""
    values: dict[int, float] = {
        FI_TOTAL_ENERGY_CONSUMPTION: int(s.energy_mj),
        FI_MEMORY_TEMP: round(s.temperature + 6),
        FI_PCIE_COUNT_TX_BYTES: int(s.pcie_tx_bytes),
        FI_PCIE_COUNT_RX_BYTES: int(s.pcie_rx_bytes),
        FI_PCIE_REPLAY_COUNTER: 0,
        FI_PCIE_COUNT_CORRECTABLE_ERRORS: 2 if s.index == 1 else 0,
        FI_NVLINK_LINK_COUNT: s.model.nvlinks,
        FI_ECC_SBE_VOL_TOTAL: 0,
        FI_ECC_DBE_VOL_TOTAL: 0,
        FI_ECC_SBE_AGG_TOTAL: 3 if s.index == 0 else 0,
        FI_ECC_DBE_AGG_TOTAL: 0,
        FI_PERF_POLICY_POWER: int(s.violation_ns.get(FI_PERF_POLICY_POWER, 0)),
        FI_PERF_POLICY_THERMAL: 0,
        FI_PERF_POLICY_SYNC_BOOST: 0,
        FI_PERF_POLICY_BOARD_LIMIT: 0,
        FI_PERF_POLICY_LOW_UTILIZATION: int(s.violation_ns.get(FI_PERF_POLICY_LOW_UTILIZATION, 0)),
        FI_PERF_POLICY_RELIABILITY: 0,
    }
    if s.model.row_remapping:
        values.update(
            {
                FI_REMAPPED_COR: 0,
                FI_REMAPPED_UNC: 0,
                FI_REMAPPED_PENDING: 0,
                FI_REMAPPED_FAILURE: 0,
            }
        )
    else:
        values.update({FI_RETIRED_SBE: 0, FI_RETIRED_DBE: 0, FI_RETIRED_PENDING: 0})
    if not s.model.pcie_byte_counters:
        del values[FI_PCIE_COUNT_TX_BYTES], values[FI_PCIE_COUNT_RX_BYTES]
    return values


def read(
    s: DeviceState,
    requests: Sequence[FieldRequest],
    limit_w: float,
    call_fault: Callable[[str], int],
) -> list[FieldResult]:
    """Answers `requests` as nvmlDeviceGetFieldValues does. `call_fault(function)` is the code
    injected faults give a call to `function` (SUCCESS if none), applied once per function."""
    device_wide = _device_wide(s)
    # The power fields read what power_usage and enforced_power_limit do (the model has no
    # faster dynamics than its step, so the 1 s average and the instant agree), and a
    # fault injected into either call applies to its fields as well.
    power_fields = {
        FI_POWER_AVERAGE: ("power_usage", round(s.power_w * 1000)),
        FI_POWER_INSTANT: ("power_usage", round(s.power_w * 1000)),
        FI_POWER_CURRENT_LIMIT: ("enforced_power_limit", round(limit_w * 1000)),
    }
    faulted: dict[str, int] = {}
    for field_id, _ in requests:
        if field_id in power_fields:
            function, value = power_fields[field_id]
            if function not in faulted:
                faulted[function] = call_fault(function)
            if faulted[function] == SUCCESS:
                device_wide[field_id] = value
    results: list[FieldResult] = []
    for field_id, scope in requests:
        if field_id in _PER_LINK:
            ok = 0 <= scope < s.model.nvlinks
            results.append(
                (SUCCESS, _PER_LINK[field_id](s, scope)) if ok else (NOT_SUPPORTED, None)
            )
        elif field_id in device_wide:
            results.append((SUCCESS, device_wide[field_id]))
        else:
            # Fields the model does not have, as a real driver answers them.
            results.append((NOT_SUPPORTED, None))
    return results
