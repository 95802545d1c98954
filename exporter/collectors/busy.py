"""Utilization that does not miss short bursts: NVML's utilization samples, integrated.

NVML's instantaneous utilization describes only the driver's last sample period (1/6 s to 1 s),
so a kernel burst between two exporter samples can vanish. The driver keeps a buffer of those
per-period samples; reading every sample newer than the last one seen gives the true average
over the interval, and summing value x period gives a busy-time counter whose `rate()` is the
exact average utilization over any window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from exporter.nvml import Device

# A gap this long between two driver samples means samples were lost (the buffer wrapped
# while the exporter was stalled); count at most this much for one sample.
MAX_SAMPLE_PERIOD_US = 2_000_000


@dataclass
class _Track:
    last_timestamp_us: int | None = None
    ratio: float | None = None
    busy_seconds: float = 0.0
    last_instant_time: float | None = None
    # When the last update or idle() happened, and whether it was idle(): the next read then
    # covers several intervals, of which only the last is the gauge's.
    last_update: float | None = None
    skipped: bool = False


class BusyTracker:
    """One utilization signal (GPU, memory controller, encoder, decoder) for every device."""

    def __init__(self, sample_type: int) -> None:
        self._sample_type = sample_type
        self._tracks: dict[str, _Track] = {}

    def forget(self, uuid: str) -> None:
        self._tracks.pop(uuid, None)

    def samples(self, device: Device) -> list[tuple[int, float]] | None:
        """New driver samples since the last call; None when the device has no sample buffer."""
        track = self._tracks.setdefault(device.uuid, _Track())
        since = track.last_timestamp_us or 0
        return device.read_as((self._sample_type,), device.driver.samples, self._sample_type, since)

    def update(
        self,
        device: Device,
        samples: list[tuple[int, float]] | None,
        instant_percent: Callable[[], int | None],
        now: float,
    ) -> tuple[float | None, float]:
        """Returns (average ratio over the interval, busy seconds so far)."""
        track = self._tracks.setdefault(device.uuid, _Track())
        window_us = None
        if track.skipped and track.last_update is not None:
            window_us = max(1, round((now - track.last_update) * 1e6))
        if samples is None:
            self._from_instant(track, instant_percent(), now)
        elif samples:
            self._from_samples(track, sorted(samples), window_us)
        track.last_update, track.skipped = now, False
        return track.ratio, track.busy_seconds

    def has_value(self, device: Device) -> bool:
        """Whether a read gave the device's signal a value yet: only then may idle() stand in
        for a read (before, the signal may be unsupported, or its buffer not yet filled)."""
        track = self._tracks.get(device.uuid)
        return track is not None and track.ratio is not None

    def idle(self, device: Device, now: float) -> tuple[float | None, float]:
        """For an interval the signal is known to have been idle, without reading it: the ratio
        is 0 and the counter unchanged. The sample buffer is left unread, so the next read
        integrates the whole skipped stretch from where the last read stopped: what the
        engine did in between is counted once, late rather than never."""
        track = self._tracks.setdefault(device.uuid, _Track())
        track.ratio = 0.0
        if track.last_instant_time is not None:
            # Without a buffer the skipped interval counts as idle, not at the next reading.
            track.last_instant_time = now
        track.last_update, track.skipped = now, True
        return track.ratio, track.busy_seconds

    @staticmethod
    def _from_samples(
        track: _Track, samples: list[tuple[int, float]], window_us: int | None = None
    ) -> None:
        """Integrates new samples into the counter. The ratio averages all of them, or, after
        skipped intervals, only the last `window_us` of them: the last interval's share."""
        if track.last_timestamp_us is None:
            # The buffer's history covers an unknown window: start counting from here.
            track.last_timestamp_us = samples[-1][0]
            track.ratio = samples[-1][1] / 100
            return
        previous = track.last_timestamp_us
        start = samples[-1][0] - window_us if window_us is not None else None
        weighted = total = recent_weighted = recent_total = 0.0
        for timestamp, percent in samples:
            period = min(max(0, timestamp - previous), MAX_SAMPLE_PERIOD_US)
            weighted += percent * period
            total += period
            if start is not None:
                inside = max(0, timestamp - max(timestamp - period, start))
                recent_weighted += percent * inside
                recent_total += inside
            previous = timestamp
        track.last_timestamp_us = previous
        if total > 0:
            track.busy_seconds += weighted / 100 / 1e6
            track.ratio = weighted / total / 100
        if recent_total > 0:
            track.ratio = recent_weighted / recent_total / 100

    @staticmethod
    def _from_instant(track: _Track, percent: int | None, now: float) -> None:
        """Fallback without a sample buffer: the instantaneous value stands for the interval."""
        if percent is None:
            track.ratio = None
            track.last_instant_time = None
            return
        ratio = percent / 100
        if track.last_instant_time is not None:
            track.busy_seconds += ratio * max(0.0, now - track.last_instant_time)
        track.last_instant_time = now
        track.ratio = ratio
