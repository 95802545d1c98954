"""Video engines: encoder and decoder utilization, and encoder sessions."""

from __future__ import annotations

import time
from functools import partial

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec
from exporter.collectors.busy import BusyTracker
from exporter.nvml import DEC_UTILIZATION_SAMPLES, ENC_UTILIZATION_SAMPLES, Device

ENCODER_UTILIZATION = MetricSpec(
    "nvml_encoder_utilization_ratio",
    "gauge",
    "Fraction of the last sampling interval the video encoder (NVENC) was busy.",
    unit="ratio",
    source="nvmlDeviceGetSamples (ENC_UTILIZATION_SAMPLES); "
    "nvmlDeviceGetEncoderUtilization where samples are unsupported",
    dcgm=(Dcgm("DCGM_FI_DEV_ENC_UTIL", "Encoder utilization (in %).", "percent", 100),),
)
ENCODER_BUSY = MetricSpec(
    "nvml_encoder_busy_seconds_total",
    "counter",
    "Time the video encoder was busy.",
    unit="seconds",
    source="sum of encoder utilization samples x sample period",
)
DECODER_UTILIZATION = MetricSpec(
    "nvml_decoder_utilization_ratio",
    "gauge",
    "Fraction of the last sampling interval the video decoder (NVDEC) was busy.",
    unit="ratio",
    source="nvmlDeviceGetSamples (DEC_UTILIZATION_SAMPLES); "
    "nvmlDeviceGetDecoderUtilization where samples are unsupported",
    dcgm=(Dcgm("DCGM_FI_DEV_DEC_UTIL", "Decoder utilization (in %).", "percent", 100),),
)
DECODER_BUSY = MetricSpec(
    "nvml_decoder_busy_seconds_total",
    "counter",
    "Time the video decoder was busy.",
    unit="seconds",
    source="sum of decoder utilization samples x sample period",
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

    def collect(self, device: Device, out: Emitter) -> None:
        drv = device.driver
        now = time.monotonic()
        for tracker, gauge, counter, instant in (
            (self._encoder, ENCODER_UTILIZATION, ENCODER_BUSY, drv.encoder_utilization),
            (self._decoder, DECODER_UTILIZATION, DECODER_BUSY, drv.decoder_utilization),
        ):
            samples = tracker.samples(device)
            ratio, busy = tracker.update(device, samples, partial(device.read, instant), now)
            if ratio is not None:
                out.add(gauge, ratio)
                out.add(counter, busy)
        stats = device.read(drv.encoder_stats)
        if stats is not None:
            out.add(ENCODER_SESSIONS, stats.sessions)
            out.add(ENCODER_FPS, stats.average_fps)
            out.add(ENCODER_LATENCY, stats.average_latency_us / 1e6)
