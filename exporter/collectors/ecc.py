"""Memory health: ECC mode and error counts, row remapping (Ampere and newer), page retirement
(older GPUs)."""

from __future__ import annotations

from operator import itemgetter

from exporter.collectors.base import CallSeries, Collector, Dcgm, FieldSeries, MetricSpec, part
from exporter.nvml import (
    FI_ECC_DBE_AGG_TOTAL,
    FI_ECC_DBE_VOL_TOTAL,
    FI_ECC_SBE_AGG_TOTAL,
    FI_ECC_SBE_VOL_TOTAL,
    FI_REMAPPED_COR,
    FI_REMAPPED_FAILURE,
    FI_REMAPPED_PENDING,
    FI_REMAPPED_UNC,
    FI_RETIRED_DBE,
    FI_RETIRED_PENDING,
    FI_RETIRED_SBE,
    Device,
)

# ECC mode changes only with an administrator's command and a reset.
MODE_MAX_AGE = 30.0

ECC_ENABLED = MetricSpec(
    "nvml_ecc_enabled",
    "gauge",
    "1 if ECC is on for device memory.",
    source="nvmlDeviceGetEccMode current (at most every 30 s)",
    cadence="Read every 30s.",
)
ECC_PENDING = MetricSpec(
    "nvml_ecc_pending_enabled",
    "gauge",
    "1 if ECC will be on after the next reset.",
    source="nvmlDeviceGetEccMode pending (at most every 30 s)",
    cadence="Read every 30s.",
)


def _ecc_dcgm(name: str, help_: str, error: str, counter: str) -> Dcgm:
    return Dcgm(name, help_, type="counter", match=(("error", error), ("counter", counter)))


ECC_ERRORS = MetricSpec(
    "nvml_ecc_errors_total",
    "counter",
    "ECC errors in device memory: corrected (single-bit) or uncorrected (double-bit), since the "
    "driver loaded (volatile) or over the board's life (aggregate). Absent while ECC is off.",
    labels=("error", "counter"),
    source="fields NVML_FI_DEV_ECC_{SBE,DBE}_{VOL,AGG}_TOTAL",
    dcgm=(
        _ecc_dcgm(
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
            "Total single-bit volatile ECC errors.",
            "corrected",
            "volatile",
        ),
        _ecc_dcgm(
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            "Total double-bit volatile ECC errors.",
            "uncorrected",
            "volatile",
        ),
        _ecc_dcgm(
            "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
            "Total single-bit persistent ECC errors.",
            "corrected",
            "aggregate",
        ),
        _ecc_dcgm(
            "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
            "Total double-bit persistent ECC errors.",
            "uncorrected",
            "aggregate",
        ),
    ),
)
REMAPPED_ROWS = MetricSpec(
    "nvml_remapped_rows_total",
    "counter",
    "Memory rows remapped to spares because of correctable or uncorrectable errors.",
    labels=("error",),
    source="fields NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_UNC",
    dcgm=(
        Dcgm(
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for correctable errors",
            type="counter",
            match=(("error", "correctable"),),
        ),
        Dcgm(
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for uncorrectable errors",
            type="counter",
            match=(("error", "uncorrectable"),),
        ),
    ),
)
REMAP_PENDING = MetricSpec(
    "nvml_remapped_rows_pending",
    "gauge",
    "1 if a row remapping waits for the next GPU reset.",
    source="field NVML_FI_DEV_REMAPPED_PENDING",
)
REMAP_FAILURE = MetricSpec(
    "nvml_remapped_rows_failure",
    "gauge",
    "1 if a row could not be remapped: the GPU needs service.",
    source="field NVML_FI_DEV_REMAPPED_FAILURE",
    dcgm=(Dcgm("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed"),),
)
RETIRED_PAGES = MetricSpec(
    "nvml_retired_pages_total",
    "counter",
    "Memory pages retired because of single-bit or double-bit errors (pre-Ampere GPUs).",
    labels=("cause",),
    source="fields NVML_FI_DEV_RETIRED_SBE, NVML_FI_DEV_RETIRED_DBE",
    dcgm=(
        Dcgm(
            "DCGM_FI_DEV_RETIRED_SBE",
            "Total number of retired pages due to single-bit errors.",
            type="counter",
            match=(("cause", "single_bit"),),
        ),
        Dcgm(
            "DCGM_FI_DEV_RETIRED_DBE",
            "Total number of retired pages due to double-bit errors.",
            type="counter",
            match=(("cause", "double_bit"),),
        ),
    ),
)
RETIRED_PENDING = MetricSpec(
    "nvml_retired_pages_pending",
    "gauge",
    "1 if a page retirement waits for the next GPU reset.",
    source="field NVML_FI_DEV_RETIRED_PENDING",
    dcgm=(Dcgm("DCGM_FI_DEV_RETIRED_PENDING", "Total number of pages pending retirement."),),
)


def _ecc_mode(device: Device) -> tuple[int, int] | None:
    return device.recent(MODE_MAX_AGE, device.driver.ecc_mode)


def _ecc_on(device: Device) -> bool:
    mode = _ecc_mode(device)
    return mode is not None and mode[0] == 1


def _error_count(field_id: int, error: str, counter: str) -> FieldSeries:
    # A driver serves no ECC counter with ECC off.
    return FieldSeries(ECC_ERRORS, (field_id, 0), (error, counter), when=_ecc_on)


class EccCollector(Collector):
    name = "ecc"
    table = (
        CallSeries(ECC_ENABLED, part(_ecc_mode, itemgetter(0))),
        CallSeries(ECC_PENDING, part(_ecc_mode, itemgetter(1))),
        _error_count(FI_ECC_SBE_VOL_TOTAL, "corrected", "volatile"),
        _error_count(FI_ECC_DBE_VOL_TOTAL, "uncorrected", "volatile"),
        _error_count(FI_ECC_SBE_AGG_TOTAL, "corrected", "aggregate"),
        _error_count(FI_ECC_DBE_AGG_TOTAL, "uncorrected", "aggregate"),
        FieldSeries(REMAPPED_ROWS, (FI_REMAPPED_COR, 0), ("correctable",)),
        FieldSeries(REMAPPED_ROWS, (FI_REMAPPED_UNC, 0), ("uncorrectable",)),
        FieldSeries(REMAP_PENDING, (FI_REMAPPED_PENDING, 0)),
        FieldSeries(REMAP_FAILURE, (FI_REMAPPED_FAILURE, 0)),
        FieldSeries(RETIRED_PAGES, (FI_RETIRED_SBE, 0), ("single_bit",)),
        FieldSeries(RETIRED_PAGES, (FI_RETIRED_DBE, 0), ("double_bit",)),
        FieldSeries(RETIRED_PENDING, (FI_RETIRED_PENDING, 0)),
    )
