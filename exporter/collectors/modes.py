"""Device settings an administrator changes: persistence, compute mode, MIG mode."""

from __future__ import annotations

from operator import itemgetter

from exporter.collectors.base import CallSeries, Collector, MetricSpec, part
from exporter.nvml import Device

# These change only by an administrator's command; reading them every interval is waste.
MODE_MAX_AGE = 30.0

PERSISTENCE = MetricSpec(
    "nvml_persistence_mode_enabled",
    "gauge",
    "1 if persistence mode keeps the driver loaded while no process uses the GPU.",
    source="nvmlDeviceGetPersistenceMode (at most every 30 s)",
    cadence="Read every 30s.",
)
COMPUTE_MODE = MetricSpec(
    "nvml_compute_mode",
    "gauge",
    "Compute mode: 0 default (shared), 2 prohibited, 3 exclusive process.",
    source="nvmlDeviceGetComputeMode (at most every 30 s)",
    cadence="Read every 30s.",
    dcgm_note="DCGM_FI_DEV_COMPUTE_MODE (not a default counter)",
)
MIG_ENABLED = MetricSpec(
    "nvml_mig_mode_enabled",
    "gauge",
    "1 if Multi-Instance GPU mode is on.",
    source="nvmlDeviceGetMigMode current (at most every 30 s)",
    cadence="Read every 30s.",
    dcgm_note="DCGM_FI_DEV_MIG_MODE (not a default counter)",
)
MIG_PENDING = MetricSpec(
    "nvml_mig_mode_pending_enabled",
    "gauge",
    "1 if Multi-Instance GPU mode will be on after the next reset.",
    source="nvmlDeviceGetMigMode pending (at most every 30 s)",
    cadence="Read every 30s.",
)


def _mig_mode(device: Device) -> tuple[int, int] | None:
    return device.recent(MODE_MAX_AGE, device.driver.mig_mode)


class ModesCollector(Collector):
    name = "modes"
    table = (
        CallSeries(PERSISTENCE, lambda d: d.recent(MODE_MAX_AGE, d.driver.persistence_mode)),
        CallSeries(COMPUTE_MODE, lambda d: d.recent(MODE_MAX_AGE, d.driver.compute_mode)),
        CallSeries(MIG_ENABLED, part(_mig_mode, itemgetter(0))),
        CallSeries(MIG_PENDING, part(_mig_mode, itemgetter(1))),
    )
