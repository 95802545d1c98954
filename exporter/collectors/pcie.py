"""PCIe traffic, replays and correctable errors, and the link's current and maximum generation
and width."""

from __future__ import annotations

from exporter.collectors.base import CallSeries, Collector, Dcgm, FieldSeries, MetricSpec, Reader
from exporter.nvml import (
    FI_PCIE_COUNT_RX_BYTES,
    FI_PCIE_COUNT_TX_BYTES,
    FI_PCIE_REPLAY_COUNTER,
    PCIE_RX_BYTES,
    PCIE_TX_BYTES,
)
from exporter.nvml.values import FI_PCIE_COUNT_CORRECTABLE_ERRORS

# The link trains down when idle and back up under load; a few seconds of lag is plenty.
LINK_STATE_MAX_AGE = 10.0

# DCGM's PCIe profiling fields are rates in bytes per second, averaged over its sampling
# window. GPM gives them on Hopper and newer (gpm.py); elsewhere they are the byte counters'
# rate over the sampling interval, or the 20 ms throughput where the counters are missing.
DCGM_PCIE_TX_HELP = "The rate of data transmitted over the PCIe bus (in B/s)."
DCGM_PCIE_RX_HELP = "The rate of data received over the PCIe bus (in B/s)."

TX_BYTES = MetricSpec(
    "nvml_pcie_tx_bytes_total",
    "counter",
    "Bytes the GPU sent over PCIe.",
    unit="bytes",
    source="field NVML_FI_DEV_PCIE_COUNT_TX_BYTES",
    dcgm=(Dcgm("DCGM_FI_PROF_PCIE_TX_BYTES", DCGM_PCIE_TX_HELP, "B/s", rate=True, fallback=True),),
)
RX_BYTES = MetricSpec(
    "nvml_pcie_rx_bytes_total",
    "counter",
    "Bytes the GPU received over PCIe.",
    unit="bytes",
    source="field NVML_FI_DEV_PCIE_COUNT_RX_BYTES",
    dcgm=(Dcgm("DCGM_FI_PROF_PCIE_RX_BYTES", DCGM_PCIE_RX_HELP, "B/s", rate=True, fallback=True),),
)
TX_THROUGHPUT = MetricSpec(
    "nvml_pcie_tx_bytes_per_second",
    "gauge",
    "PCIe send throughput over a 20 ms window; only where the byte counter is unsupported.",
    source="nvmlDeviceGetPcieThroughput TX_BYTES (KiB/s * 1024)",
    dcgm=(Dcgm("DCGM_FI_PROF_PCIE_TX_BYTES", DCGM_PCIE_TX_HELP, "B/s", fallback=True),),
)
RX_THROUGHPUT = MetricSpec(
    "nvml_pcie_rx_bytes_per_second",
    "gauge",
    "PCIe receive throughput over a 20 ms window; only where the byte counter is unsupported.",
    source="nvmlDeviceGetPcieThroughput RX_BYTES (KiB/s * 1024)",
    dcgm=(Dcgm("DCGM_FI_PROF_PCIE_RX_BYTES", DCGM_PCIE_RX_HELP, "B/s", fallback=True),),
)
REPLAYS = MetricSpec(
    "nvml_pcie_replays_total",
    "counter",
    "PCIe link-level replays (retransmissions); growth points at a marginal link or riser.",
    source="field NVML_FI_DEV_PCIE_REPLAY_COUNTER (every sampling.slow_fields_interval)",
    cadence="Read every {slow}.",
    dcgm=(Dcgm("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total PCIe retries.", type="counter"),),
)
CORRECTABLE_ERRORS = MetricSpec(
    "nvml_pcie_correctable_errors_total",
    "counter",
    "PCIe correctable errors the GPU's link has seen and recovered from; a count that keeps "
    "growing points at a marginal link, riser or slot before it costs replays or a fatal error.",
    source="field NVML_FI_DEV_PCIE_COUNT_CORRECTABLE_ERRORS (every sampling.slow_fields_interval)",
    cadence="Read every {slow}.",
)
LINK_GENERATION = MetricSpec(
    "nvml_pcie_link_generation",
    "gauge",
    "Current PCIe link generation (it drops when the link idles).",
    source="nvmlDeviceGetCurrPcieLinkGeneration (at most every 10 s)",
    cadence="Read every 10s.",
    dcgm=(Dcgm("DCGM_FI_DEV_PCIE_LINK_GEN", "PCIe current link generation."),),
)
LINK_WIDTH = MetricSpec(
    "nvml_pcie_link_width",
    "gauge",
    "Current PCIe link width in lanes.",
    source="nvmlDeviceGetCurrPcieLinkWidth (at most every 10 s)",
    cadence="Read every 10s.",
    dcgm=(Dcgm("DCGM_FI_DEV_PCIE_LINK_WIDTH", "PCIe current link width."),),
)
LINK_MAX_GENERATION = MetricSpec(
    "nvml_pcie_link_max_generation",
    "gauge",
    "Highest PCIe generation the GPU and the slot support together.",
    source="nvmlDeviceGetMaxPcieLinkGeneration (read once)",
    dcgm=(Dcgm("DCGM_FI_DEV_PCIE_MAX_LINK_GEN", "PCIe maximum link generation."),),
)
LINK_MAX_WIDTH = MetricSpec(
    "nvml_pcie_link_max_width",
    "gauge",
    "Widest PCIe link the GPU and the slot support together, in lanes.",
    source="nvmlDeviceGetMaxPcieLinkWidth (read once)",
    dcgm=(Dcgm("DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH", "PCIe maximum link width."),),
)


def _throughput(direction: int) -> Reader:
    return lambda device: device.read(device.driver.pcie_throughput, direction)


def _bytes(spec: MetricSpec, field_id: int, rate: MetricSpec, direction: int) -> FieldSeries:
    # Older GPUs only have the throughput call, which blocks for its measuring window.
    return FieldSeries(
        spec,
        (field_id, 0),
        fallback=CallSeries(rate, _throughput(direction), scale=1024),
        fallback_only_unsupported=True,
    )


class PcieCollector(Collector):
    name = "pcie"
    metrics = (TX_BYTES, RX_BYTES, TX_THROUGHPUT, RX_THROUGHPUT)
    table = (
        _bytes(TX_BYTES, FI_PCIE_COUNT_TX_BYTES, TX_THROUGHPUT, PCIE_TX_BYTES),
        _bytes(RX_BYTES, FI_PCIE_COUNT_RX_BYTES, RX_THROUGHPUT, PCIE_RX_BYTES),
        FieldSeries(REPLAYS, (FI_PCIE_REPLAY_COUNTER, 0), slow=True),
        FieldSeries(CORRECTABLE_ERRORS, (FI_PCIE_COUNT_CORRECTABLE_ERRORS, 0), slow=True),
        CallSeries(
            LINK_GENERATION, lambda d: d.recent(LINK_STATE_MAX_AGE, d.driver.pcie_link_generation)
        ),
        CallSeries(LINK_WIDTH, lambda d: d.recent(LINK_STATE_MAX_AGE, d.driver.pcie_link_width)),
        CallSeries(LINK_MAX_GENERATION, lambda d: d.cached(d.driver.pcie_max_link_generation)),
        CallSeries(LINK_MAX_WIDTH, lambda d: d.cached(d.driver.pcie_max_link_width)),
    )
