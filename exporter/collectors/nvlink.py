"""NVLink: per-link state, traffic and error counters (absent on GPUs without NVLink)."""

from __future__ import annotations

import functools

from exporter.collectors.base import Collector, Dcgm, Emitter, FieldPlan, FieldSeries, MetricSpec
from exporter.collectors.shared import SampleContext
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

# DCGM adds the received and transmitted counters of all links (NVML's, in KiB) and reports
# their rate, divided by 1000 ("MB/s" in its field table), although dcgm-exporter declares
# the field a counter; dashboards plot it as bandwidth.
DCGM_BANDWIDTH_TOTAL = Dcgm(
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    "Total number of NVLink bandwidth counters for all lanes.",
    "KiB/s / 1000, received + transmitted",
    1 / (1024 * 1000),
    "counter",
    total=True,
    rate=True,
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
    dcgm=(DCGM_BANDWIDTH_TOTAL,),
)
RX_BYTES = MetricSpec(
    "nvml_nvlink_rx_bytes_total",
    "counter",
    "Payload bytes received over the link.",
    labels=("link",),
    unit="bytes",
    source="field NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX per link (KiB * 1024)",
    dcgm=(DCGM_BANDWIDTH_TOTAL,),
)
ERRORS = MetricSpec(
    "nvml_nvlink_errors_total",
    "counter",
    "NVLink data-link errors: crc (corrupted flits), replay (retransmissions), recovery "
    "(link retraining).",
    labels=("link", "error"),
    source="fields NVML_FI_DEV_NVLINK_ERROR_DL_CRC, _REPLAY, _RECOVERY per link (every "
    "sampling.slow_fields_interval)",
    cadence="Read every {slow}.",
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


_LINK_COUNT = ((FI_NVLINK_LINK_COUNT, 0),)


@functools.cache
def _plan(links: int) -> FieldPlan:
    """The series of a board with this many links, built once: with 18 links they are half of
    a GPU's series, and all of them are field values."""
    series: list[FieldSeries] = []
    for link in range(links):
        label = (str(link),)
        series.append(FieldSeries(LINK_UP, (FI_NVLINK_GET_STATE, link), label, scale=0))
        series.append(FieldSeries(TX_BYTES, (FI_NVLINK_THROUGHPUT_DATA_TX, link), label, 1024))
        series.append(FieldSeries(RX_BYTES, (FI_NVLINK_THROUGHPUT_DATA_RX, link), label, 1024))
        for error, field_id in _ERROR_FIELDS:
            series.append(FieldSeries(ERRORS, (field_id, link), (*label, error)))
    return FieldPlan(series)


class NvlinkCollector(Collector):
    name = "nvlink"
    metrics = (LINK_UP, TX_BYTES, RX_BYTES, ERRORS)
    # Counters of rare events, and many of them: every slow_fields_interval is plenty.
    slow_fields = frozenset(field_id for _, field_id in _ERROR_FIELDS)

    @staticmethod
    def _links(device: Device) -> int:
        """Links the board has, read once; 0 on GPUs without NVLink (which answer 0)."""
        drv = device.driver
        results = device.cached(drv.field_values, _LINK_COUNT)
        if not results:
            return 0
        if results[0][0] != SUCCESS or results[0][1] is None:
            # The call worked but its entry did not: asked again in time like an absent
            # value, rather than taken as "no NVLink" for good.
            device.forget_answer(drv.field_values, _LINK_COUNT)
            return 0
        return int(results[0][1])

    def fields(self, device: Device) -> tuple[FieldRequest, ...]:
        return _plan(self._links(device)).requests

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        out.add_fields(device, _plan(self._links(device)))
