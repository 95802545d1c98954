"""The immutable result of one sample, which is all a scrape ever touches.

A family's samples are rendered to exposition lines once, when the sampler builds it; both text
formats share those lines and differ only in the headers, so rendering a body is a join. Each
body (text or OpenMetrics, plain or gzip) is built on the first request that wants it and
cached, so a scrape after that only writes bytes, and nobody scraping costs nothing.
"""

from __future__ import annotations

import gzip
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from prometheus_client.metrics_core import Metric


class Format(Enum):
    TEXT = "text/plain; version=0.0.4; charset=utf-8"
    OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

    @property
    def content_type(self) -> str:
        return self.value


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# Integral values below this print as integers, as dcgm-exporter prints DCGM's integer
# fields: every int64 counter, and none of the 300-digit expansions of huge doubles.
_INTEGER_BELOW = 2.0**63


def format_value(value: float) -> str:
    """A sample value as exposition text: an integral value as an integer (`56`, not `56.0`
    or `5.6e+01`), so queries comparing with `==` and dashboards written for dcgm-exporter
    see what they expect; anything else exactly, as Go prints it (and prometheus_client's
    floatToGoString)."""
    number = float(value)
    if number.is_integer() and -_INTEGER_BELOW < number < _INTEGER_BELOW:
        # An int (a driver's counter) exactly, even past the 53 bits a double holds.
        return str(value) if type(value) is int else str(int(number))
    text = repr(number)
    dot = text.find(".")
    if dot > 6 and value > 0:
        # Go switches to an exponent sooner than Python: 1234567.5 -> 1.2345675e+06.
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    if dot < 0 and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return text


def series_prefix(name: str, labels: str) -> str:
    """`name{labels} ` from already escaped `k="v"` pairs: a line is this plus the value."""
    return f"{name}{{{labels}}} " if labels else f"{name} "


def label_pairs(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{k}="{escape_label(v)}"' for k, v in zip(names, values, strict=True))


@dataclass(frozen=True, slots=True)
class Header:
    """What a family says about itself, rendered for each format."""

    name: str  # the samples' name: a counter's includes `_total`, an info's `_info`
    type: str  # gauge, counter, info or untyped
    help: str
    unit: str = ""
    text: str = field(init=False)
    openmetrics: str = field(init=False)

    def __post_init__(self) -> None:
        # Text 0.0.4 names the TYPE line after the samples, which also fits dcgm-exporter's
        # counters (no `_total`); OpenMetrics names the family without the suffix.
        kind = {"info": "gauge"}.get(self.type, self.type)
        text = f"# HELP {self.name} {escape_help(self.help)}\n# TYPE {self.name} {kind}\n"
        family = self.name
        if self.type == "counter":
            family = family.removesuffix("_total")
        elif self.type == "info":
            family = family.removesuffix("_info")
        om_type = {"untyped": "unknown"}.get(self.type, self.type)
        om = f"# HELP {family} {escape_label(self.help)}\n# TYPE {family} {om_type}\n"
        # OpenMetrics carries a # UNIT line when the name ends in the unit, as it requires.
        if self.unit and family.endswith("_" + self.unit):
            om += f"# UNIT {family} {self.unit}\n"
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "openmetrics", om)


@dataclass(frozen=True, slots=True)
class Family:
    header: Header
    lines: Sequence[str]  # `name{labels} value\n`, in order

    @property
    def name(self) -> str:
        return self.header.name

    @classmethod
    def from_metric(cls, metric: Metric) -> Family:
        """A prometheus_client family (the process metrics) in this form."""
        type_ = {"unknown": "untyped"}.get(metric.type, metric.type)
        name = metric.samples[0].name if metric.samples else metric.name
        lines = [
            series_prefix(s.name, label_pairs(list(s.labels), list(s.labels.values())))
            + format_value(s.value)
            + "\n"
            for s in metric.samples
        ]
        return cls(Header(name, type_, metric.documentation, metric.unit), lines)


def _join(families: Sequence[Family], openmetrics: bool) -> bytes:
    """Each family's header for the format, then its lines, which both formats share."""
    parts: list[str] = []
    for family in families:
        if family.lines:
            parts.append(family.header.openmetrics if openmetrics else family.header.text)
            parts.extend(family.lines)
    if openmetrics:
        parts.append("# EOF\n")
    return "".join(parts).encode()


def render_text(families: Sequence[Family]) -> bytes:
    return _join(families, openmetrics=False)


def render_openmetrics(families: Sequence[Family]) -> bytes:
    return _join(families, openmetrics=True)


class Snapshot:
    __slots__ = ("_bodies", "_demand", "_lock", "families", "openmetrics", "timestamp")

    def __init__(
        self,
        families: Sequence[Family],
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
            render = render_openmetrics if fmt is Format.OPENMETRICS else render_text
            plain = render(self.families)
            self._bodies[(fmt, False)] = plain
        return plain
