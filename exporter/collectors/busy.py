"""Utilization as a gauge and as a busy-time counter that misses no burst.

The gauge is the driver's instantaneous value (nvmlDeviceGetUtilizationRates and the encoder
and decoder calls: its last sample period, 1/6 s to 1 s), what nvidia-smi and dcgm-exporter
show. A kernel burst between two exporter samples can escape it, so the counter comes from the
driver's buffer of per-period samples instead: every sample newer than the last one read,
value x period, summed, so that `rate()` of it is the exact average over a window.

The buffer is read on every BUFFER_READ_EVERY-th sample, and whenever the next sample would
come more than BUFFER_READ_SECONDS after the last read, rather than every sample because, on
an H200 with driver 580, one nvmlDeviceGetSamples call costs 2.3 to 2.7 ms of CPU whatever it
returns, against about 3 us for the instantaneous value (benchmarks/data/h200-costs.json):
read every second it would be the exporter's largest cost. The buffer holds 14 to 16 s (72
samples, 5 a second, on the H200), so reads at most 10 s apart see every sample (at sampling
intervals up to 10 s; longer ones lose samples however often they read). The counter lags by
up to 10 s, so rate() wants windows of 30 s or more.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.nvml import Device

# A gap this long between two driver samples means samples were lost (the buffer wrapped
# while the exporter was stalled); count at most this much for one sample.
MAX_SAMPLE_PERIOD_US = 2_000_000
BUFFER_READ_EVERY = 10
BUFFER_READ_SECONDS = 10.0
# For the docs and HELP of each busy counter.
BUFFER_READS = "read every 10th sample or 10 s"
BUFFER_CADENCE = "Counted from the driver's sample buffer every 10th sample or 10s."


@dataclass
class _Track:
    ratio: float | None = None  # the gauge's value at the last update
    busy_seconds: float = 0.0
    # The driver's buffer: the newest sample counted, and when it last answered (a device
    # whose buffer never did counts the instantaneous value instead).
    last_timestamp_us: int | None = None
    buffer_read_at: float | None = None
    unread: int = 0  # samples since the buffer was last read
    # When the previous sample (update or idle) ran: the step to the next one is about as long.
    last_sample_at: float | None = None
    # Without a buffer: when the instantaneous value last counted towards busy time.
    last_instant_time: float | None = None

    @property
    def buffered(self) -> bool:
        return self.buffer_read_at is not None


class BusyTracker:
    """One utilization signal (GPU, memory controller, encoder, decoder) for every device."""

    def __init__(self, sample_type: int) -> None:
        self._sample_type = sample_type
        self._tracks: dict[str, _Track] = {}

    def has_value(self, device: Device) -> bool:
        """Whether a read gave the signal a value yet: only then may `idle` stand in for a
        read (before, the signal may be unsupported)."""
        track = self._tracks.get(device.uuid)
        return track is not None and track.ratio is not None

    def update(
        self, device: Device, instant_percent: int | None, now: float
    ) -> tuple[float | None, float]:
        """(gauge ratio, busy seconds so far) from this sample's instantaneous value, None
        where the device has none; the buffer then stands in for it and is read every time."""
        track = self._tracks.setdefault(device.uuid, _Track())
        average = self._read_buffer(device, track, now, every_time=instant_percent is None)
        if instant_percent is not None:
            track.ratio = instant_percent / 100
            if not track.buffered:
                self._count_instant(track, track.ratio, now)
        else:
            # The buffer's average over what it returned, or no gauge this sample.
            track.ratio = average
        return track.ratio, track.busy_seconds

    def idle(self, device: Device, now: float) -> tuple[float | None, float]:
        """For an interval the signal is known to have been idle, without asking for its
        value: the gauge is 0. The buffer is still read when due, so work that started and
        ended between two samples reaches the counter."""
        track = self._tracks.setdefault(device.uuid, _Track())
        self._read_buffer(device, track, now, every_time=False)
        track.ratio = 0.0
        if not track.buffered:
            self._count_instant(track, 0.0, now)
        return track.ratio, track.busy_seconds

    def _read_buffer(
        self, device: Device, track: _Track, now: float, every_time: bool
    ) -> float | None:
        """Counts the buffer's new samples when a read is due; their average, if any."""
        step = 0.0 if track.last_sample_at is None else now - track.last_sample_at
        track.last_sample_at = now
        due = (
            every_time
            or track.buffer_read_at is None
            or track.unread >= BUFFER_READ_EVERY - 1
            # Read now if waiting for the next sample would leave the buffer unread too long.
            or now + step - track.buffer_read_at > BUFFER_READ_SECONDS
        )
        if not due:
            track.unread += 1
            return None
        since = track.last_timestamp_us or 0
        samples = device.read_as(
            (self._sample_type,), device.driver.samples, self._sample_type, since
        )
        if samples is None:
            return None
        track.buffer_read_at, track.unread = now, 0
        if not samples:
            if track.last_timestamp_us is None:
                # Nothing in the buffer yet: the next read's samples are all new.
                track.last_timestamp_us = 0
            return None
        return self._integrate(track, sorted(samples))

    @staticmethod
    def _integrate(track: _Track, samples: list[tuple[int, float]]) -> float | None:
        """Adds the samples' busy time to the counter; returns their average ratio."""
        if track.last_timestamp_us is None:
            # The buffer's history covers an unknown window: start counting from here.
            track.last_timestamp_us = samples[-1][0]
            return samples[-1][1] / 100
        previous = track.last_timestamp_us
        if previous == 0:
            # After an empty first read: every sample is new, the first one's period taken to
            # be its successor's.
            spacing = samples[1][0] - samples[0][0] if len(samples) > 1 else 0
            previous = samples[0][0] - spacing
        weighted = total = 0.0
        for timestamp, percent in samples:
            period = min(max(0, timestamp - previous), MAX_SAMPLE_PERIOD_US)
            weighted += percent * period
            total += period
            previous = timestamp
        track.last_timestamp_us = previous
        track.busy_seconds += weighted / 100 / 1e6
        return weighted / total / 100 if total > 0 else None

    @staticmethod
    def _count_instant(track: _Track, ratio: float, now: float) -> None:
        """Without a buffer, the instantaneous value stands for the interval since the last."""
        if track.last_instant_time is not None:
            track.busy_seconds += ratio * max(0.0, now - track.last_instant_time)
        track.last_instant_time = now
