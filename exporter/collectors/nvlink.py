"""NVLink: per-link state, traffic and error counters (absent on GPUs without NVLink)."""

from __future__ import annotations

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.nvml import (
    FI_NVLINK_ERROR_DL_CRC,
    FI_NVLINK_ERROR_DL_RECOVERY,
    FI_NVLINK_ERROR_DL_REPLAY,
    FI_NVLINK_GET_STATE,
    FI_NVLINK_LINK_COUNT,
    FI_NVLINK_THROUGHPUT_DATA_RX,
    FI_NVLINK_THROUGHPUT_DATA_TX,
    SUCCESS,
    Device,
    FieldRequest,
)

LINK_UP = MetricSpec(
    "nvml_nvlink_up",
    "gauge",
    "1 if the NVLink link is active.",
    labels=("link",),
    source="field NVML_FI_DEV_NVLINK_GET_STATE per link",
)
TX_BYTES = MetricSpec(
    "nvml_nvlink_tx_bytes_total",
    "counter",
    "Payload bytes sent over the link.",
    labels=("link",),
    unit="bytes",
    source="field NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX per link (KiB * 1024)",
    dcgm=(
        Dcgm(
            "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
            "Total number of NVLink bandwidth counters for all lanes.",
            "KiB",
            1 / 1024,
            "counter",
            total=True,
        ),
    ),
)
RX_BYTES = MetricSpec(
    "nvml_nvlink_rx_bytes_total",
    "counter",
    "Payload bytes received over the link.",
    labels=("link",),
    unit="bytes",
    source="field NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX per link (KiB * 1024)",
)
ERRORS = MetricSpec(
    "nvml_nvlink_errors_total",
    "counter",
    "NVLink data-link errors: crc (corrupted flits), replay (retransmissions), recovery "
    "(link retraining).",
    labels=("link", "error"),
    source="fields NVML_FI_DEV_NVLINK_ERROR_DL_CRC, _REPLAY, _RECOVERY per link",
    dcgm=(
        Dcgm(
            "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
            "Total number of NVLink flow-control CRC errors.",
            type="counter",
            match=(("error", "crc"),),
            total=True,
        ),
        Dcgm(
            "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
            "Total number of NVLink retries.",
            type="counter",
            match=(("error", "replay"),),
            total=True,
        ),
        Dcgm(
            "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
            "Total number of NVLink recovery errors.",
            type="counter",
            match=(("error", "recovery"),),
            total=True,
        ),
    ),
)

_ERROR_FIELDS = (
    ("crc", FI_NVLINK_ERROR_DL_CRC),
    ("replay", FI_NVLINK_ERROR_DL_REPLAY),
    ("recovery", FI_NVLINK_ERROR_DL_RECOVERY),
)
_PER_LINK = (
    FI_NVLINK_GET_STATE,
    FI_NVLINK_THROUGHPUT_DATA_TX,
    FI_NVLINK_THROUGHPUT_DATA_RX,
    *(field_id for _, field_id in _ERROR_FIELDS),
)


class NvlinkCollector(Collector):
    name = "nvlink"
    metrics = (LINK_UP, TX_BYTES, RX_BYTES, ERRORS)

    @staticmethod
    def _links(device: Device) -> int:
        """Links the board has, read once; 0 on GPUs without NVLink."""
        results = device.cached(device.driver.field_values, ((FI_NVLINK_LINK_COUNT, 0),))
        if not results or results[0][0] != SUCCESS or results[0][1] is None:
            return 0
        return int(results[0][1])

    def fields(self, device: Device) -> tuple[FieldRequest, ...]:
        return tuple(
            (field_id, link) for link in range(self._links(device)) for field_id in _PER_LINK
        )

    def collect(self, device: Device, out: Emitter) -> None:
        for link in range(self._links(device)):
            label = str(link)
            state = device.field(FI_NVLINK_GET_STATE, link)
            if state is not None:
                out.add(LINK_UP, 1 if state else 0, label)
            for spec, field_id in (
                (TX_BYTES, FI_NVLINK_THROUGHPUT_DATA_TX),
                (RX_BYTES, FI_NVLINK_THROUGHPUT_DATA_RX),
            ):
                kib = device.field(field_id, link)
                if kib is not None:
                    out.add(spec, kib * 1024, label)
            for error, field_id in _ERROR_FIELDS:
                count = device.field(field_id, link)
                if count is not None:
                    out.add(ERRORS, count, label, error)
