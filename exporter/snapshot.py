"""The immutable result of one sample, which is all a scrape ever touches.

Each body (text or OpenMetrics, plain or gzip) is rendered on the first request that wants it
and cached, so a scrape after that only writes bytes, and nobody scraping costs nothing.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator, Sequence
from enum import Enum

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as render_openmetrics
from prometheus_client.utils import floatToGoString


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


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_text(families: _Families) -> bytes:
    """The Prometheus text format 0.0.4.

    Our own rather than prometheus_client's: that one names a counter's TYPE line after the
    family plus `_total`, which cannot express dcgm-exporter's counters (no `_total`). Here the
    TYPE line of a counter or info family is named after its samples, which is right for both.
    """
    out: list[str] = []
    for family in families.collect():
        if not family.samples:
            continue
        name = family.samples[0].name if family.type in ("counter", "info") else family.name
        kind = {"info": "gauge", "unknown": "untyped"}.get(family.type, family.type)
        out.append(f"# HELP {name} {_escape_help(family.documentation)}\n# TYPE {name} {kind}\n")
        for sample in family.samples:
            value = floatToGoString(sample.value)  # type: ignore[no-untyped-call]
            if sample.labels:
                labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels.items())
                out.append(f"{sample.name}{{{labels}}} {value}\n")
            else:
                out.append(f"{sample.name} {value}\n")
    return "".join(out).encode()


class Snapshot:
    __slots__ = ("_bodies", "_demand", "_lock", "families", "openmetrics", "timestamp")

    def __init__(
        self,
        families: Sequence[Metric],
        timestamp: float,
        openmetrics: bool = True,
        demand: set[tuple[Format, bool]] | None = None,
    ) -> None:
        self.families = tuple(families)
        self.timestamp = timestamp
        # Shared with the sampler: which bodies scrapes asked for, so the next snapshot can
        # have them ready before it is published.
        self._demand = demand
        # dcgm-exporter's names break OpenMetrics' counter rules, so that mode is text only.
        self.openmetrics = openmetrics
        self._bodies: dict[tuple[Format, bool], bytes] = {}
        self._lock = threading.Lock()

    def body(self, fmt: Format, compressed: bool) -> bytes:
        if not self.openmetrics:
            fmt = Format.TEXT
        if self._demand is not None:
            self._demand.add((fmt, compressed))
        return self.render(fmt, compressed)

    def render(self, fmt: Format, compressed: bool) -> bytes:
        """The body, rendered once and cached; does not count as demand."""
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
