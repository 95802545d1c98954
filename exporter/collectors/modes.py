"""Device settings an administrator changes: persistence, compute mode, MIG mode."""

from __future__ import annotations

from exporter.collectors.base import Collector, Emitter, MetricSpec
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


class ModesCollector(Collector):
    name = "modes"
    metrics = (PERSISTENCE, COMPUTE_MODE, MIG_ENABLED, MIG_PENDING)

    def collect(self, device: Device, out: Emitter) -> None:
        drv = device.driver
        persistence = device.recent(MODE_MAX_AGE, drv.persistence_mode)
        if persistence is not None:
            out.add(PERSISTENCE, persistence)
        compute = device.recent(MODE_MAX_AGE, drv.compute_mode)
        if compute is not None:
            out.add(COMPUTE_MODE, compute)
        mig = device.recent(MODE_MAX_AGE, drv.mig_mode)
        if mig is not None:
            out.add(MIG_ENABLED, mig[0])
            out.add(MIG_PENDING, mig[1])
