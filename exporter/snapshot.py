"""The immutable result of one sample, which is all a scrape ever touches.

Each body (text or OpenMetrics, plain or gzip) is rendered on the first request that wants it
and cached, so a scrape after that only writes bytes, and nobody scraping costs nothing.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator, Sequence
from enum import Enum

from prometheus_client.exposition import generate_latest as render_text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as render_openmetrics


class Format(Enum):
    TEXT = "text/plain; version=0.0.4; charset=utf-8"
    OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

    @property
    def content_type(self) -> str:
        return self.value


class _Families:
    """Adapts a family list to the `collect()` interface prometheus_client's renderers expect."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class Snapshot:
    __slots__ = ("_bodies", "_lock", "families", "timestamp")

    def __init__(self, families: Sequence[Metric], timestamp: float) -> None:
        self.families = tuple(families)
        self.timestamp = timestamp
        self._bodies: dict[tuple[Format, bool], bytes] = {}
        self._lock = threading.Lock()

    def body(self, fmt: Format, compressed: bool) -> bytes:
        cached = self._bodies.get((fmt, compressed))
        if cached is not None:
            return cached
        with self._lock:
            cached = self._bodies.get((fmt, compressed))
            if cached is None:
                if compressed:
                    # Level 1: most of the size win for a fraction of the CPU of level 9.
                    cached = gzip.compress(self._render_plain(fmt), compresslevel=1, mtime=0)
                else:
                    cached = self._render_plain(fmt)
                self._bodies[(fmt, compressed)] = cached
            return cached

    def _render_plain(self, fmt: Format) -> bytes:
        plain = self._bodies.get((fmt, False))
        if plain is None:
            source = _Families(self.families)
            render = render_openmetrics if fmt is Format.OPENMETRICS else render_text
            plain = render(source)
            self._bodies[(fmt, False)] = plain
        return plain
