"""Video engines: encoder and decoder utilization, and encoder sessions.

Each engine's gauge is the driver's instantaneous value, asked for only when the engine can be
busy: the encoder while nvmlDeviceGetEncoderStats reports a session now or at the previous
sample, the decoder unless GPM measured every NVDEC engine at exactly 0 over the same interval;
otherwise it is 0 without a call. The busy counters come from the engines' sample buffers,
read every 10th sample or 10 s whatever the gauge did (see busy.py), so work that started and
ended between two samples (an encoder session shorter than the interval) still reaches them,
once.
"""

from __future__ import annotations

from collections.abc import Callable

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.collectors.busy import BUFFER_CADENCE, BUFFER_READS, BusyTracker
from exporter.collectors.shared import SampleContext
from exporter.nvml import DEC_UTILIZATION_SAMPLES, ENC_UTILIZATION_SAMPLES, Device, Handle

ENCODER_UTILIZATION = MetricSpec(
    "nvml_encoder_utilization_ratio",
    "gauge",
    "Fraction of the driver's last sample period the video encoder (NVENC) was busy; 0 "
    "without an open encoder session.",
    unit="ratio",
    source="nvmlDeviceGetEncoderUtilization; 0 where no encoder session was open at this or "
    "the previous sample; the average of nvmlDeviceGetSamples (ENC_UTILIZATION_SAMPLES) where "
    "the call is unsupported",
    dcgm=(Dcgm("DCGM_FI_DEV_ENC_UTIL", "Encoder utilization (in %).", "percent", 100),),
)
ENCODER_BUSY = MetricSpec(
    "nvml_encoder_busy_seconds_total",
    "counter",
    "Time the video encoder was busy.",
    unit="seconds",
    source="sum of nvmlDeviceGetSamples (ENC_UTILIZATION_SAMPLES) x sample period, " + BUFFER_READS,
    cadence=BUFFER_CADENCE,
)
DECODER_UTILIZATION = MetricSpec(
    "nvml_decoder_utilization_ratio",
    "gauge",
    "Fraction of the driver's last sample period the video decoder (NVDEC) was busy; 0 "
    "where GPM measured the decoders idle.",
    unit="ratio",
    source="nvmlDeviceGetDecoderUtilization; 0 where GPM measured every NVDEC engine idle; "
    "the average of nvmlDeviceGetSamples (DEC_UTILIZATION_SAMPLES) where the call is "
    "unsupported",
    dcgm=(Dcgm("DCGM_FI_DEV_DEC_UTIL", "Decoder utilization (in %).", "percent", 100),),
)
DECODER_BUSY = MetricSpec(
    "nvml_decoder_busy_seconds_total",
    "counter",
    "Time the video decoder was busy.",
    unit="seconds",
    source="sum of nvmlDeviceGetSamples (DEC_UTILIZATION_SAMPLES) x sample period, " + BUFFER_READS,
    cadence=BUFFER_CADENCE,
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


class VideoCollector(Collector):
    name = "video"
    after = ("gpm",)  # its finding that the decoders were idle spares their reads
    metrics = (
        ENCODER_UTILIZATION,
        ENCODER_BUSY,
        DECODER_UTILIZATION,
        DECODER_BUSY,
        ENCODER_SESSIONS,
        ENCODER_FPS,
        ENCODER_LATENCY,
    )

    def __init__(self) -> None:
        self._encoder = BusyTracker(ENC_UTILIZATION_SAMPLES)
        self._decoder = BusyTracker(DEC_UTILIZATION_SAMPLES)
        # Encoder sessions at each GPU's previous sample.
        self._sessions: dict[str, int | None] = {}

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        drv = device.driver
        now = device.clock()
        # Read first: it decides whether the encoder's value is worth a call.
        stats = device.read(drv.encoder_stats)
        sessions = None if stats is None else stats.sessions
        # Both ends of the interval without a session: nothing was encoding, except perhaps a
        # session that opened and closed in between, which the buffer read counts.
        encoder_idle = sessions == 0 and self._sessions.get(device.uuid) == 0
        self._sessions[device.uuid] = sessions
        for tracker, specs, instant, idle in (
            (
                self._encoder,
                (ENCODER_UTILIZATION, ENCODER_BUSY),
                drv.encoder_utilization,
                encoder_idle,
            ),
            (
                self._decoder,
                (DECODER_UTILIZATION, DECODER_BUSY),
                drv.decoder_utilization,
                context.gpm_nvdec_idle,
            ),
        ):
            self._read(device, tracker, specs, instant, idle, now, out)
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
        now: float,
        out: Emitter,
    ) -> None:
        """One engine's gauge and counter; its value is not asked for while it is idle."""
        if idle and tracker.has_value(device):
            ratio, busy = tracker.idle(device, now)
        else:
            ratio, busy = tracker.update(device, device.read(instant), now)
        if ratio is not None:
            out.add(specs[0], ratio)
            out.add(specs[1], busy)
