"""What a collector is: a named group of metric specs and a `collect` that reads one device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from exporter.nvml import Device

IDENTITY_LABELS = ("gpu", "uuid")


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: how it is exposed and, for docs/metrics.md, where it comes from."""

    name: str  # as exposed; counters include `_total`
    type: str  # gauge, counter or info
    help: str
    labels: tuple[str, ...] = ()  # beyond the identity labels `gpu` and `uuid`
    unit: str = ""
    source: str = ""  # the NVML call or field behind it
    dcgm: str = ""  # the dcgm-exporter field it replaces, if any
    per_device: bool = True  # carries the identity labels

    @property
    def label_names(self) -> tuple[str, ...]:
        return (IDENTITY_LABELS + self.labels) if self.per_device else self.labels


Sample = tuple[MetricSpec, tuple[str, ...], float]


class Emitter:
    """Collects one device's samples; the sampler merges them into metric families."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def add(self, spec: MetricSpec, value: float, *labels: str) -> None:
        self.samples.append((spec, labels, value))


class Collector:
    """A group of metrics read from each device once per sampling interval.

    Subclasses declare `name`, `default_enabled` and `metrics`, and implement `collect`, which
    reads through `device.read` (so NVML's quirks are handled in one place) and adds samples.
    An instance lives as long as the sampler, so it may keep state between intervals.
    """

    name: ClassVar[str]
    default_enabled: ClassVar[bool] = True
    # False for collectors that only restate what enumeration read, so they can still
    # describe a GPU that stopped answering.
    reads_nvml: ClassVar[bool] = True
    metrics: ClassVar[tuple[MetricSpec, ...]]

    def collect(self, device: Device, out: Emitter) -> None:
        raise NotImplementedError
