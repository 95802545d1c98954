"""What a collector is: a named group of metric specs and a `collect` that reads one device."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from exporter.nvml import Device, FieldRequest

if TYPE_CHECKING:
    from exporter.config import Config

IDENTITY_LABELS = ("gpu", "uuid")


@dataclass(frozen=True)
class Dcgm:
    """The dcgm-exporter field a metric (or one of its label values) stands in for.

    In `naming: dcgm` mode the exporter emits the sample under `name`, multiplied by `scale` to
    convert from our base unit to dcgm-exporter's, with dcgm-exporter's label set.
    """

    name: str
    help: str
    unit: str = ""  # dcgm-exporter's unit, for the docs
    scale: float = 1.0
    type: str = "gauge"
    match: tuple[tuple[str, str], ...] = ()  # only samples with these label values
    total: bool = False  # sum the matching samples of a device into one
    # Labels kept, renamed to dcgm-exporter's names; every other label is dropped.
    labels: tuple[tuple[str, str], ...] = ()


# eq=False: specs are hashed by identity, which the sampler does ~2,000 times per sample.
@dataclass(frozen=True, eq=False)
class MetricSpec:
    """One metric family: how it is exposed and, for docs/metrics.md, where it comes from."""

    name: str  # as exposed; counters include `_total`
    type: str  # gauge, counter or info
    help: str
    labels: tuple[str, ...] = ()  # beyond the identity labels `gpu` and `uuid`
    unit: str = ""
    source: str = ""  # the NVML call or field behind it
    dcgm: tuple[Dcgm, ...] = ()  # the dcgm-exporter fields it replaces
    dcgm_note: str = ""  # for the docs, where the relation is not one field
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


@dataclass(frozen=True)
class Container:
    """Where a process runs, as far as its cgroup tells."""

    container_id: str = ""
    pod_uid: str = ""


@dataclass(frozen=True)
class Pod:
    """Who the kubelet allocated a GPU (or MIG device) to."""

    namespace: str
    pod: str
    container: str


class Attribution(Protocol):
    """Names and containers of GPU processes: from the host's /proc, or the simulated fleet."""

    def process_name(self, pid: int) -> str | None: ...
    def container(self, pid: int) -> Container | None: ...  # None: the PID is not visible


class PodSource(Protocol):
    """The kubelet's device allocations, cached; never blocks."""

    def pods(self) -> Mapping[str, tuple[Pod, ...]]: ...  # GPU or MIG UUID -> pods
    def status(self) -> tuple[bool, float | None, int]: ...  # up, last success, errors


@dataclass(frozen=True)
class Services:
    """What collectors may use besides NVML; none of it is touched by a scrape."""

    attribution: Attribution | None = None
    pods: PodSource | None = None


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

    def configure(self, config: Config, services: Services) -> None:
        """Called when the sampler starts and on every reload."""

    def collect_global(self, out: Emitter) -> None:
        """Once per sample, after all devices: for series not tied to a GPU."""

    def close(self) -> None:
        """Releases NVML resources; called once, before NVML shuts down."""

    def fields(self, device: Device) -> tuple[FieldRequest, ...]:
        """Field values this collector reads; the sampler fetches all collectors' fields of a
        device in one nvmlDeviceGetFieldValues call before `collect` runs."""
        return ()

    def collect(self, device: Device, out: Emitter) -> None:
        raise NotImplementedError
