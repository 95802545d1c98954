"""GPM on a simulated GPU: a sample is a copy of the device's activity integrals, and a metric
is the difference of two copies over the simulated time between them."""

from __future__ import annotations

from collections.abc import Sequence

from exporter.nvml import INVALID_ARGUMENT, NOT_SUPPORTED, SUCCESS, NvmlError
from exporter.simulate.models import MIB
from exporter.simulate.physics import DeviceState


class GpmSample:
    """A simulated GPM sample: a copy of the activity integrals when it was taken."""

    def __init__(self) -> None:
        self.values: dict[str, float] | None = None


# GPM metric id -> (activity integral, scale to NVML's unit: percent or MiB/s). The H200
# has seven NVDEC and seven NVJPG engines and one NVOFA; they idle under LLM inference.
GPM_SOURCES = {
    1: ("graphics", 100.0),
    2: ("sm", 100.0),
    3: ("occupancy", 100.0),
    4: ("integer", 100.0),
    5: ("tensor", 100.0),
    7: ("hmma", 100.0),
    9: ("imma", 100.0),
    10: ("dram", 100.0),
    11: ("fp64", 100.0),
    12: ("fp32", 100.0),
    13: ("fp16", 100.0),
    20: ("pcie_tx", 1 / MIB),
    21: ("pcie_rx", 1 / MIB),
    60: ("nvlink_rx", 1 / MIB),
    61: ("nvlink_tx", 1 / MIB),
    **{30 + n: ("idle", 1.0) for n in range(7)},
    **{40 + n: ("idle", 1.0) for n in range(7)},
    50: ("idle", 1.0),
}


def instance_share(s: DeviceState, slot: int) -> float:
    """The share of the GPU's activity that MIG instance `slot` sees: steady, its process's
    size over the largest process's."""
    weights = [p.base_bytes for p in s.processes]
    return weights[slot] / max(weights) if weights else 0.0


def read_activity(s: DeviceState, share: float) -> dict[str, float]:
    """The device's activity integrals so far, `share` of them for a MIG instance."""
    values = {k: v * share for k, v in s.activity.items() if k != "time"}
    values["time"] = s.activity.get("time", 0.0)
    values["pcie_tx"] = s.pcie_tx_bytes * share
    values["pcie_rx"] = s.pcie_rx_bytes * share
    values["nvlink_tx"] = sum(s.nvlink_kib) * 1024 * share
    values["nvlink_rx"] = sum(s.nvlink_kib) * 1024 * 0.98 * share
    return values


def metrics(
    first: GpmSample, second: GpmSample, metric_ids: Sequence[int]
) -> list[tuple[int, float | None]]:
    before, after = first.values, second.values
    if before is None or after is None:
        raise NvmlError(INVALID_ARGUMENT, "gpm_metrics")
    elapsed = after["time"] - before["time"]
    results: list[tuple[int, float | None]] = []
    for metric_id in metric_ids:
        key, scale = GPM_SOURCES.get(metric_id, ("", 0.0))
        if not key:
            results.append((NOT_SUPPORTED, None))
            continue
        delta = after.get(key, 0.0) - before.get(key, 0.0)
        results.append((SUCCESS, delta / elapsed * scale if elapsed > 0 else 0.0))
    return results
