"""Video engines: encoder and decoder utilization, and encoder sessions.

The engines' sample buffers are read only when the engine can have been busy: the encoder
while nvmlDeviceGetEncoderStats reports a session now or at the previous sample, the decoder
unless GPM measured every NVDEC engine at exactly 0 over the same interval. Otherwise the ratio
is 0 and the buffer stays unread; a catch-up read at least every CATCH_UP_EVERY samples, and at
least every CATCH_UP_SECONDS, then integrates the stretch, so work that started and ended
between two samples (an encoder session shorter than the interval) still reaches the busy
counter, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.collectors.busy import BusyTracker
from exporter.collectors.shared import gpm_nvdec_idle
from exporter.nvml import DEC_UTILIZATION_SAMPLES, ENC_UTILIZATION_SAMPLES, Device, Handle

# An idle engine's buffer is still read on every this-many-th sample, and after this many seconds
# whatever the interval: the driver's buffer holds about 16 s of samples (100 at up to 6 a
# second), and a catch-up must come before it wraps. For the decoder the catch-up is belt and
# braces (consecutive GPM intervals leave no gap, so an exact 0 over each of them means nothing
# to catch up).
CATCH_UP_EVERY = 10
CATCH_UP_SECONDS = 10.0

ENCODER_UTILIZATION = MetricSpec(
    "nvml_encoder_utilization_ratio",
    "gauge",
    "Fraction of the last sampling interval the video encoder (NVENC) was busy.",
    unit="ratio",
    source="nvmlDeviceGetSamples (ENC_UTILIZATION_SAMPLES); "
    "nvmlDeviceGetEncoderUtilization where samples are unsupported; "
    "0 where no encoder session was open at this or the previous sample",
    dcgm=(Dcgm("DCGM_FI_DEV_ENC_UTIL", "Encoder utilization (in %).", "percent", 100),),
)
ENCODER_BUSY = MetricSpec(
    "nvml_encoder_busy_seconds_total",
    "counter",
    "Time the video encoder was busy.",
    unit="seconds",
    source="sum of encoder utilization samples x sample period (buffer read while a session is "
    "open, else at least every 10th sample and every 10 s)",
)
DECODER_UTILIZATION = MetricSpec(
    "nvml_decoder_utilization_ratio",
    "gauge",
    "Fraction of the last sampling interval the video decoder (NVDEC) was busy.",
    unit="ratio",
    source="nvmlDeviceGetSamples (DEC_UTILIZATION_SAMPLES); "
    "nvmlDeviceGetDecoderUtilization where samples are unsupported; "
    "0 where GPM measured every NVDEC engine idle",
    dcgm=(Dcgm("DCGM_FI_DEV_DEC_UTIL", "Decoder utilization (in %).", "percent", 100),),
)
DECODER_BUSY = MetricSpec(
    "nvml_decoder_busy_seconds_total",
    "counter",
    "Time the video decoder was busy.",
    unit="seconds",
    source="sum of decoder utilization samples x sample period (buffer read unless GPM measured "
    "every NVDEC engine at 0, and at least every 10th sample and every 10 s)",
)
ENCODER_SESSIONS = MetricSpec(
    "nvml_encoder_sessions",
    "gauge",
    "Active video encoder sessions. NVML reports no decoder session count.",
    source="nvmlDeviceGetEncoderStats .sessionCount",
)
ENCODER_FPS = MetricSpec(
    "nvml_encoder_average_fps",
    "gauge",
    "Average frames per second over the active encoder sessions.",
    source="nvmlDeviceGetEncoderStats .averageFps",
)
ENCODER_LATENCY = MetricSpec(
    "nvml_encoder_average_latency_seconds",
    "gauge",
    "Average encode latency over the active encoder sessions.",
    unit="seconds",
    source="nvmlDeviceGetEncoderStats .averageLatency (us / 1e6)",
)


@dataclass
class _Engine:
    """One engine's buffer reads: skipped in a row, and when it was last read."""

    skipped: int = 0
    read_at: float = float("-inf")


@dataclass
class _Skips:
    """Per GPU: encoder sessions at the previous sample, and each engine's reads."""

    sessions: int | None = None
    encoder: _Engine = field(default_factory=_Engine)
    decoder: _Engine = field(default_factory=_Engine)


class VideoCollector(Collector):
    name = "video"
    metrics = (
        ENCODER_UTILIZATION,
        ENCODER_BUSY,
        DECODER_UTILIZATION,
        DECODER_BUSY,
        ENCODER_SESSIONS,
        ENCODER_FPS,
        ENCODER_LATENCY,
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._encoder = BusyTracker(ENC_UTILIZATION_SAMPLES)
        self._decoder = BusyTracker(DEC_UTILIZATION_SAMPLES)
        self._skips: dict[str, _Skips] = {}

    def collect(self, device: Device, out: Emitter) -> None:
        drv = device.driver
        now = self._clock()
        skips = self._skips.setdefault(device.uuid, _Skips())
        # Read first: it decides whether the encoder's buffer is worth a call.
        stats = device.read(drv.encoder_stats)
        sessions = None if stats is None else stats.sessions
        # Both ends of the interval without a session: nothing was encoding, except perhaps a
        # session that opened and closed in between, which the catch-up read counts.
        encoder_idle = sessions == 0 and skips.sessions == 0
        skips.sessions = sessions
        self._read(
            device,
            self._encoder,
            (ENCODER_UTILIZATION, ENCODER_BUSY),
            drv.encoder_utilization,
            encoder_idle,
            skips.encoder,
            now,
            out,
        )
        self._read(
            device,
            self._decoder,
            (DECODER_UTILIZATION, DECODER_BUSY),
            drv.decoder_utilization,
            gpm_nvdec_idle(device),
            skips.decoder,
            now,
            out,
        )
        if stats is not None:
            out.add(ENCODER_SESSIONS, stats.sessions)
            out.add(ENCODER_FPS, stats.average_fps)
            out.add(ENCODER_LATENCY, stats.average_latency_us / 1e6)

    @staticmethod
    def _read(
        device: Device,
        tracker: BusyTracker,
        specs: tuple[MetricSpec, MetricSpec],
        instant: Callable[[Handle], int],
        idle: bool,
        engine: _Engine,
        now: float,
        out: Emitter,
    ) -> None:
        """Reads one engine's utilization, or skips it while idle."""
        if (
            idle
            and engine.skipped < CATCH_UP_EVERY - 1
            and now - engine.read_at < CATCH_UP_SECONDS
            and tracker.has_value(device)
        ):
            ratio, busy = tracker.idle(device, now)
            engine.skipped += 1
        else:
            samples = tracker.samples(device)
            ratio, busy = tracker.update(device, samples, partial(device.read, instant), now)
            engine.skipped, engine.read_at = 0, now
        if ratio is not None:
            out.add(specs[0], ratio)
            out.add(specs[1], busy)
