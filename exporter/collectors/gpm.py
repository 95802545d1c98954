"""Profiling metrics without DCGM: NVML GPU Performance Monitoring (Hopper and newer).

What dcgm-exporter calls profiling metrics (SM activity and occupancy, tensor core activity,
DRAM bandwidth), unprivileged: keep one GPM sample per GPU (and per MIG GPU instance) from the
previous interval, take a new one each interval, and compute every metric over the pair in one
nvmlGpmMetricsGet call.

Except graphics activity (NVML_GPM_METRIC_GRAPHICS_UTIL), which NVML computes slowly: on an H200
with driver 580 asking for it costs ~1.35 ms of CPU, every other metric together ~0.04 ms
(benchmarks/data/h200-costs.json). It is computed over a window of SLOW_WINDOW_SAMPLES intervals
or SLOW_WINDOW_SECONDS, whichever ends first, from the sample that opened the window, and holds
its value until the next window closes: an average over the last ~10 s, as dcgm-exporter's
profiling metrics are averages over its collection interval. Three samples per GPU are
allocated once and reused in turn: the previous interval's, the window's first, and the new one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.collectors.pcie import DCGM_PCIE_RX_HELP, DCGM_PCIE_TX_HELP
from exporter.collectors.shared import SampleContext, mig_instances
from exporter.nvml import (
    SUCCESS,
    Device,
    Driver,
    ErrorKind,
    Handle,
    classify,
    error_code,
    error_name,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# A GPU or GPU instance not read for this many samples is gone; its samples are freed.
FORGET_AFTER = 3
SLOW_METRICS = frozenset({1})  # NVML_GPM_METRIC_GRAPHICS_UTIL
SLOW_WINDOW_SAMPLES = 10
SLOW_WINDOW_SECONDS = 10.0

INSTANCE_LABELS = ("gpu_instance", "mig_profile", "mig_uuid")
# dcgm-exporter's names for the MIG labels it has.
_DCGM_MIG = (("gpu_instance", "GPU_I_ID"), ("mig_profile", "GPU_I_PROFILE"))


def _spec(
    name: str,
    help_: str,
    *dcgm: Dcgm,
    labels: tuple[str, ...] = (),
    unit: str = "ratio",
    cadence: str = "",
) -> MetricSpec:
    return MetricSpec(
        name,
        "gauge",
        help_ + " Whole GPU where gpu_instance is empty, else one MIG GPU instance.",
        labels=INSTANCE_LABELS + labels,
        unit=unit,
        source="nvmlGpmSampleGet / nvmlGpmMigSampleGet, nvmlGpmMetricsGet",
        dcgm=dcgm,
        cadence=cadence,
    )


def _dcgm(name: str, help_: str, unit: str = "ratio", scale: float = 1.0, **match: str) -> Dcgm:
    return Dcgm(name, help_, unit, scale, match=tuple(match.items()), labels=_DCGM_MIG)


GRAPHICS = _spec(
    "nvml_gpm_graphics_activity_ratio",
    "Fraction of time any graphics or compute engine was active.",
    _dcgm("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "Ratio of time the graphics engine is active."),
    cadence="Averaged over windows of 10 samples or 10s, as NVML computes it slowly.",
)
SM = _spec(
    "nvml_gpm_sm_activity_ratio",
    "Fraction of SMs busy, averaged over the interval.",
    _dcgm("DCGM_FI_PROF_SM_ACTIVE", "The ratio of cycles an SM has at least 1 warp assigned."),
)
OCCUPANCY = _spec(
    "nvml_gpm_sm_occupancy_ratio",
    "Resident warps as a fraction of the theoretical maximum.",
    _dcgm("DCGM_FI_PROF_SM_OCCUPANCY", "The ratio of number of warps resident on an SM."),
)
TENSOR = _spec(
    "nvml_gpm_tensor_activity_ratio",
    "Fraction of time the tensor cores were busy: any, or by kind (hmma half/bf16/fp8, imma "
    "integer, dfma and dmma double precision), where the chip reports it.",
    _dcgm(
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        pipe="any",
    ),
    labels=("pipe",),
)
PIPE = _spec(
    "nvml_gpm_pipe_activity_ratio",
    "Fraction of time the SMs did non-tensor math of this kind: fp64, fp32, fp16, integer.",
    _dcgm(
        "DCGM_FI_PROF_PIPE_FP64_ACTIVE", "Ratio of cycles the fp64 pipes are active.", pipe="fp64"
    ),
    _dcgm(
        "DCGM_FI_PROF_PIPE_FP32_ACTIVE", "Ratio of cycles the fp32 pipes are active.", pipe="fp32"
    ),
    _dcgm(
        "DCGM_FI_PROF_PIPE_FP16_ACTIVE", "Ratio of cycles the fp16 pipes are active.", pipe="fp16"
    ),
    labels=("pipe",),
)
DRAM = _spec(
    "nvml_gpm_dram_bandwidth_ratio",
    "Device memory bandwidth used, as a fraction of the maximum.",
    _dcgm("DCGM_FI_PROF_DRAM_ACTIVE", "Ratio of cycles the device memory interface is active."),
)
PCIE = _spec(
    "nvml_gpm_pcie_bytes_per_second",
    "PCIe traffic over the interval, tx (from the GPU) or rx (to it).",
    _dcgm("DCGM_FI_PROF_PCIE_TX_BYTES", DCGM_PCIE_TX_HELP, "B/s", direction="tx"),
    _dcgm("DCGM_FI_PROF_PCIE_RX_BYTES", DCGM_PCIE_RX_HELP, "B/s", direction="rx"),
    labels=("direction",),
    unit="",
)
NVLINK = _spec(
    "nvml_gpm_nvlink_bytes_per_second",
    "NVLink traffic over the interval, all links, tx or rx.",
    _dcgm(
        "DCGM_FI_PROF_NVLINK_TX_BYTES",
        "The rate of data transmitted over NVLink.",
        "B/s",
        direction="tx",
    ),
    _dcgm(
        "DCGM_FI_PROF_NVLINK_RX_BYTES",
        "The rate of data received over NVLink.",
        "B/s",
        direction="rx",
    ),
    labels=("direction",),
    unit="",
)
ENGINE = _spec(
    "nvml_gpm_engine_utilization_ratio",
    "Utilization of each video decoder (nvdec), JPEG decoder (nvjpg) and optical-flow engine "
    "(nvofa) instance, where the chip has them.",
    labels=("engine", "instance"),
)

_PERCENT = 0.01
# NVML_GPM_METRIC_NVDEC_0_UTIL .. NVML_GPM_METRIC_NVDEC_7_UTIL: one per decoder engine.
NVDEC_METRICS = frozenset(30 + n for n in range(8))
# (metric id, spec, extra label values, scale from NVML's unit to ours)
_METRICS: tuple[tuple[int, MetricSpec, tuple[str, ...], float], ...] = (
    (1, GRAPHICS, (), _PERCENT),
    (2, SM, (), _PERCENT),
    (3, OCCUPANCY, (), _PERCENT),
    (5, TENSOR, ("any",), _PERCENT),
    (6, TENSOR, ("dfma",), _PERCENT),
    (7, TENSOR, ("hmma",), _PERCENT),
    (8, TENSOR, ("dmma",), _PERCENT),
    (9, TENSOR, ("imma",), _PERCENT),
    (4, PIPE, ("integer",), _PERCENT),
    (11, PIPE, ("fp64",), _PERCENT),
    (12, PIPE, ("fp32",), _PERCENT),
    (13, PIPE, ("fp16",), _PERCENT),
    (10, DRAM, (), _PERCENT),
    (20, PCIE, ("tx",), MIB),
    (21, PCIE, ("rx",), MIB),
    (60, NVLINK, ("rx",), MIB),
    (61, NVLINK, ("tx",), MIB),
    *((30 + n, ENGINE, ("nvdec", str(n)), _PERCENT) for n in range(8)),
    *((40 + n, ENGINE, ("nvjpg", str(n)), _PERCENT) for n in range(8)),
    *((50 + n, ENGINE, ("nvofa", str(n)), _PERCENT) for n in range(2)),
)


Held = tuple[MetricSpec, float, tuple[str, ...]]
# What the device remembers an absent GPM metric under.
_GPM = "gpm_metric"


@dataclass
class _Samples:
    """One GPU's (or GPU instance's) GPM sample buffers and what they hold."""

    buffers: tuple[Handle, Handle, Handle]
    previous: Handle | None = None  # last interval's sample
    window: Handle | None = None  # the sample that opened the slow metrics' window
    window_at: float = 0.0
    window_intervals: int = 0
    held: list[Held] = field(default_factory=list)  # the slow metrics' last values
    first_window_closed: bool = False
    unseen: int = 0
    in_flight: bool = False

    def free_buffer(self) -> Handle:
        """A buffer holding neither the previous sample nor the window's first."""
        return next(b for b in self.buffers if b is not self.previous and b is not self.window)

    def reset(self) -> None:
        """After a failed sample: metrics need two good samples in a row again."""
        self.previous = self.window = None
        self.held = []
        self.first_window_closed = False


class GpmCollector(Collector):
    name = "gpm"
    metrics = (GRAPHICS, SM, OCCUPANCY, TENSOR, PIPE, DRAM, PCIE, NVLINK, ENGINE)

    def __init__(self) -> None:
        # (GPU uuid, GPU instance or None) -> its samples; touched by that GPU's worker only,
        # except for freeing, which happens under the lock.
        self._samples: dict[tuple[str, int | None, str], _Samples] = {}
        self._drivers: dict[tuple[str, int | None, str], Driver] = {}
        self._lock = threading.Lock()

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        drv = device.driver
        # A GPU's answer (its architecture's) stands for good; only its absence is asked again.
        if not device.cached(drv.gpm_supported):
            return
        instances = mig_instances(device)
        targets: list[tuple[int | None, tuple[str, str, str]]] = [(None, ("", "", ""))]
        targets += [
            (m.gpu_instance, (str(m.gpu_instance), m.profile, m.uuid))
            for m in instances
            if m.compute_instance == 0  # GPM samples a GPU instance, not a compute instance
        ]
        for gpu_instance, labels in targets:
            self._collect_one(device, gpu_instance, labels, out, context)

    def _collect_one(
        self,
        device: Device,
        gpu_instance: int | None,
        labels: tuple[str, str, str],
        out: Emitter,
        context: SampleContext,
    ) -> None:
        drv = device.driver
        # By the instance's UUID too: a repartitioned GPU may reuse a GPU instance id.
        key = (device.uuid, gpu_instance, labels[2])
        samples = self._samples.get(key)
        if samples is None:
            buffers: list[Handle] = []
            for _ in range(3):
                buffer = device.read_system(drv.gpm_sample_alloc)
                if buffer is None:
                    _free_buffers(drv, buffers)
                    return
                buffers.append(buffer)
            samples = _Samples((buffers[0], buffers[1], buffers[2]))
            with self._lock:
                self._samples[key] = samples
                self._drivers[key] = drv
        samples.unseen = 0
        # While NVML holds its buffers (a read can hang past the sample's deadline), they are
        # not freed under it.
        samples.in_flight = True
        try:
            self._sample(device, samples, gpu_instance, labels, out, context)
        finally:
            samples.in_flight = False

    def _sample(
        self,
        device: Device,
        samples: _Samples,
        gpu_instance: int | None,
        labels: tuple[str, str, str],
        out: Emitter,
        context: SampleContext,
    ) -> None:
        drv = device.driver
        current = samples.free_buffer()
        if gpu_instance is None:
            taken = device.read_as((), drv.gpm_sample_get, current)
        else:
            taken = device.read_as(("mig",), drv.gpm_mig_sample_get, gpu_instance, current)
        if not taken:
            samples.reset()
            return
        now = device.clock()
        if samples.previous is not None:
            samples.window_intervals += 1
        if samples.window is not None and (
            not samples.first_window_closed  # closes at once, so the metric is there early
            or samples.window_intervals >= SLOW_WINDOW_SAMPLES
            or now - samples.window_at >= SLOW_WINDOW_SECONDS
        ):
            # Whatever the answer, the window closes: a failure is not retried every sample.
            samples.held = self._metrics(device, samples.window, current, labels, True, context)
            samples.window, samples.first_window_closed = None, True
        if samples.window is None:
            samples.window, samples.window_at, samples.window_intervals = current, now, 0
        fast = (
            self._metrics(device, samples.previous, current, labels, False, context)
            if samples.previous is not None
            else []
        )
        for spec, value, values in (*samples.held, *fast):
            out.add(spec, value, *values)
        samples.previous = current

    def _metrics(
        self,
        device: Device,
        first: Handle,
        second: Handle,
        labels: tuple[str, str, str],
        slow: bool,
        context: SampleContext,
    ) -> list[Held]:
        """The fast or the slow metrics over two samples, as (spec, value, label values)."""
        # Metrics the GPU answered NOT_SUPPORTED for are remembered by the device, not here:
        # it asks them again in time, and at once when the GPU comes back after it was lost.
        wanted = [
            entry
            for entry in _METRICS
            if (entry[0] in SLOW_METRICS) == slow and not device.marked_absent(_GPM, entry[0])
        ]
        if not wanted:
            return []
        ids = [metric_id for metric_id, _, _, _ in wanted]
        results = device.read_system(device.driver.gpm_metrics, first, second, ids)
        if results is None:
            return []
        found: list[Held] = []
        whole_gpu = labels[0] == ""
        nvdec_busy: bool | None = None  # None: no NVDEC engine measured
        for (metric_id, spec, extra, scale), (code, value) in zip(wanted, results, strict=True):
            if code == SUCCESS and value is not None:
                found.append((spec, value * scale, (*labels, *extra)))
            elif classify(code) is ErrorKind.ABSENT and whole_gpu:
                # The chip lacks it; MIG instances may lack what the GPU has, so only the
                # whole GPU's answer decides.
                device.mark_absent(_GPM, metric_id, reason=error_name(code))
            if metric_id in NVDEC_METRICS and classify(code) is not ErrorKind.ABSENT:
                # An engine the chip has: idle only if measured, and at exactly 0.
                nvdec_busy = bool(nvdec_busy) or code != SUCCESS or value != 0
        if whole_gpu and nvdec_busy is False:
            # For the video collector: its decoder samples would say nothing new.
            context.gpm_nvdec_idle = True
        return found

    def collect_global(self, out: Emitter) -> None:
        """Frees the samples of GPUs and instances that went away."""
        with self._lock:
            gone = []
            for key, samples in self._samples.items():
                samples.unseen += 1
                if samples.unseen > FORGET_AFTER and not samples.in_flight:
                    gone.append(key)
            for key in gone:
                self._free(key)

    def close(self) -> None:
        with self._lock:
            for key, samples in list(self._samples.items()):
                if not samples.in_flight:  # else left to the process's exit
                    self._free(key)

    def _free(self, key: tuple[str, int | None, str]) -> None:
        samples = self._samples.pop(key)
        _free_buffers(self._drivers.pop(key), samples.buffers)


def _free_buffers(drv: Driver, buffers: Sequence[Handle]) -> None:
    for buffer in buffers:
        try:
            drv.gpm_sample_free(buffer)
        except Exception as exc:
            # After the driver went away, there is nothing left to free.
            if error_code(exc) is None:
                raise
            log.debug("freeing a GPM sample failed", extra={"reason": str(exc)})
