"""Memory health: ECC mode and error counts, row remapping (Ampere and newer), page retirement
(older GPUs)."""

from __future__ import annotations

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
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
    FieldRequest,
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

_ECC_FIELDS = (
    (FI_ECC_SBE_VOL_TOTAL, "corrected", "volatile"),
    (FI_ECC_DBE_VOL_TOTAL, "uncorrected", "volatile"),
    (FI_ECC_SBE_AGG_TOTAL, "corrected", "aggregate"),
    (FI_ECC_DBE_AGG_TOTAL, "uncorrected", "aggregate"),
)
_OTHER_FIELDS = (
    (FI_REMAPPED_COR, REMAPPED_ROWS, ("correctable",)),
    (FI_REMAPPED_UNC, REMAPPED_ROWS, ("uncorrectable",)),
    (FI_REMAPPED_PENDING, REMAP_PENDING, ()),
    (FI_REMAPPED_FAILURE, REMAP_FAILURE, ()),
    (FI_RETIRED_SBE, RETIRED_PAGES, ("single_bit",)),
    (FI_RETIRED_DBE, RETIRED_PAGES, ("double_bit",)),
    (FI_RETIRED_PENDING, RETIRED_PENDING, ()),
)


class EccCollector(Collector):
    name = "ecc"
    metrics = (
        ECC_ENABLED,
        ECC_PENDING,
        ECC_ERRORS,
        REMAPPED_ROWS,
        REMAP_PENDING,
        REMAP_FAILURE,
        RETIRED_PAGES,
        RETIRED_PENDING,
    )

    def fields(self, device: Device) -> tuple[FieldRequest, ...]:
        requests = tuple((field_id, 0) for field_id, _, _ in _OTHER_FIELDS)
        if self._ecc_on(device):
            requests += tuple((field_id, 0) for field_id, _, _ in _ECC_FIELDS)
        return requests

    @staticmethod
    def _ecc_on(device: Device) -> bool:
        mode = device.recent(MODE_MAX_AGE, device.driver.ecc_mode)
        return mode is not None and mode[0] == 1

    def collect(self, device: Device, out: Emitter) -> None:
        mode = device.recent(MODE_MAX_AGE, device.driver.ecc_mode)
        if mode is not None:
            out.add(ECC_ENABLED, mode[0])
            out.add(ECC_PENDING, mode[1])
            if mode[0] == 1:
                for field_id, error, counter in _ECC_FIELDS:
                    count = device.field(field_id)
                    if count is not None:
                        out.add(ECC_ERRORS, count, error, counter)
        for field_id, spec, labels in _OTHER_FIELDS:
            value = device.field(field_id)
            if value is not None:
                out.add(spec, value, *labels)
