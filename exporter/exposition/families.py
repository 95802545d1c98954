"""Families for a snapshot: the series of every GPU and of the exporter merged into one family
per metric, under its header; with `naming: dcgm`, translated to dcgm-exporter's fields."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from exporter.collectors import Dcgm, MetricSpec
from exporter.collectors.base import Sample
from exporter.config import SamplingConfig
from exporter.exposition import dcgm
from exporter.nvml import Device
from exporter.snapshot import Family, Header, format_value, label_pairs, series_prefix


def family_header(spec: MetricSpec | Dcgm, sampling: SamplingConfig) -> Header:
    """A family's HELP, TYPE and UNIT; a GPU metric's HELP says how often it is read."""
    interval = f"{sampling.interval:g}s"
    suffix = f" Sampled every {interval}."
    if isinstance(spec, Dcgm):
        return Header(spec.name, spec.type, spec.help + suffix)
    if not spec.per_device or spec.type == "info":
        suffix = ""
    elif spec.cadence:
        slow = sampling.slow_fields_interval
        suffix = " " + spec.cadence.format(
            interval=interval, slow=f"{slow:g}s" if slow > 0 else "sample"
        )
    return Header(spec.name, spec.type, spec.help + suffix, spec.unit)


class FamilyBuilder:
    """Merges series from all devices into one family per metric, in first-seen order."""

    def __init__(
        self,
        headers: Callable[[MetricSpec | Dcgm], Header],
        naming: str = "nvml",
        host: str = "",
        prefixes: dict[tuple[MetricSpec, tuple[str, ...]], str] | None = None,
        hostname_label: str = dcgm.DEFAULT_HOSTNAME_LABEL,
        rates: dcgm.CounterRates | None = None,
    ) -> None:
        self._lines: dict[MetricSpec | Dcgm, list[str]] = {}
        # The last sample's line prefixes of the series added one by one (the self-metrics);
        # those used again are carried into `self.prefixes` for the next sample.
        self._previous = prefixes or {}
        self.prefixes: dict[tuple[MetricSpec, tuple[str, ...]], str] = {}
        self._headers = headers
        self._dcgm = naming == "dcgm"
        self._host = host
        self._identity_labels = dcgm.identity_labels(hostname_label)
        self._rates = rates
        # Several sources may stand for one DCGM field (GPM, a counter's rate, a gauge): one
        # family per field name, so its HELP and TYPE appear once.
        self._dcgm_fields: dict[str, Dcgm] = {}

    def _family(self, spec: MetricSpec | Dcgm) -> list[str]:
        lines = self._lines.get(spec)
        if lines is None:
            lines = self._lines[spec] = []
        return lines

    def add(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        key = (spec, labels)
        prefix = self._previous.get(key)
        if prefix is None:
            prefix = series_prefix(spec.name, label_pairs(spec.label_names, labels))
        self.prefixes[key] = prefix
        self._family(spec).append(prefix + format_value(value) + "\n")

    def add_lines(self, lines: Mapping[MetricSpec, list[str]]) -> None:
        for spec, series in lines.items():
            self._family(spec).extend(series)

    def add_device(self, device: Device, samples: Iterable[Sample]) -> None:
        if self._dcgm:
            self._add_dcgm(device, samples)
            return
        identity = (str(device.index), device.uuid)
        for spec, labels, value in samples:
            self.add(spec, identity + labels, value)

    def _add_dcgm(self, device: Device, samples: Iterable[Sample]) -> None:
        identity = label_pairs(self._identity_labels, dcgm.identity(device, self._host))
        translated = dcgm.translate(samples, self._rates, device.uuid, device.clock())
        for target, extra, value in translated:
            pairs = identity
            if extra:
                pairs += "," + label_pairs([k for k, _ in extra], [v for _, v in extra])
            # dcgm-exporter's counters carry no `_total`; the text renderer keeps the name.
            line = series_prefix(target.name, pairs) + format_value(value) + "\n"
            self._family(self._dcgm_fields.setdefault(target.name, target)).append(line)

    def families(self) -> list[Family]:
        if self._rates is not None:
            self._rates.sweep()
        return [Family(self._headers(spec), lines) for spec, lines in self._lines.items()]
