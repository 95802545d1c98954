"""What a collector is: a named group of metric specs and a `collect` that reads one device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

from exporter.collectors.shared import SampleContext
from exporter.nvml import Device, FieldRequest
from exporter.workload import Attribution, PodSource

if TYPE_CHECKING:
    from exporter.config import Config

IDENTITY_LABELS = ("gpu", "uuid")

T = TypeVar("T")


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
    # DCGM reports this counter as a rate: per second over the sampling interval (absent
    # until a GPU has been read twice), `scale` applied to the rate.
    rate: bool = False
    # Another source of the same field is better where a GPU has both (the field is then
    # emitted once, from that source).
    fallback: bool = False
    # Labels dcgm-exporter derives from the value, such as the XID's err_code and err_msg.
    value_labels: Callable[[float], tuple[tuple[str, str], ...]] | None = None


# eq=False: specs are hashed by identity, which the sampler does for every series of a sample.
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
    # dcgm-exporter fields that exist wherever this metric does, at 0 (with their value
    # labels for 0) until a sample of a metric they belong to gives them a value.
    dcgm_baseline: tuple[Dcgm, ...] = ()
    dcgm_note: str = ""  # for the docs, where the relation is not one field
    per_device: bool = True  # carries the identity labels
    # How fresh the value is, where not read every sample: replaces the HELP suffix "Sampled
    # every {interval}."; {interval} and {slow} (sampling.slow_fields_interval) are filled in.
    cadence: str = ""

    @property
    def label_names(self) -> tuple[str, ...]:
        return (IDENTITY_LABELS + self.labels) if self.per_device else self.labels


Sample = tuple[MetricSpec, tuple[str, ...], float]


Reader = Callable[[Device], "float | None"]


@dataclass(frozen=True, eq=False)
class CallSeries:
    """A series read by an NVML call rather than a field: one row of a collector's `table`.

    `read` should be cheap to repeat within a sample (`device.cached` or `device.recent`)
    where several rows take their values from one answer."""

    spec: MetricSpec
    read: Reader
    labels: tuple[str, ...] = ()
    scale: float = 1  # multiplies NVML's value into the metric's unit
    divisor: float = 1  # divides it, where NVML's unit is a multiple (mW, ns)

    def value(self, device: Device) -> float | None:
        raw = self.read(device)
        return None if raw is None else convert(raw, self.scale, self.divisor)


@dataclass(frozen=True, eq=False)
class FieldSeries:
    """A series whose value is one NVML field: one row of a collector's `table`.

    `scale` 0 turns the value into 1 (non-zero) or 0, for states. Where the GPU does not
    support the field, the `alternatives` are asked in its place, in order; where no field
    answers, `fallback` (a dedicated call, possibly for a metric of its own) is read instead.
    """

    spec: MetricSpec
    request: FieldRequest
    labels: tuple[str, ...] = ()
    scale: float = 1
    divisor: float = 1
    alternatives: tuple[int, ...] = ()
    fallback: CallSeries | None = None
    # The fallback only while the field is unsupported, not whenever it gave no value: a slow
    # field between its reads has none, and mixing two sources of one counter could make it
    # go back.
    fallback_only_unsupported: bool = False
    # Asked and emitted only where this holds for the device (ECC counters with ECC on).
    when: Callable[[Device], bool] | None = None
    # A field the driver answers slowly (docs/performance.md): read every
    # sampling.slow_fields_interval, its last answer standing in between.
    slow: bool = False

    def wanted(self, device: Device) -> FieldRequest:
        """The field to ask for: the first of the field and its alternatives not known to be
        unsupported (the last, if all are)."""
        field_id, scope = self.request
        for candidate in (field_id, *self.alternatives[:-1]):
            if not device.field_absent(candidate, scope):
                return (candidate, scope)
        return (self.alternatives[-1], scope) if self.alternatives else self.request

    def emit(self, device: Device, out: Emitter) -> None:
        field_id, scope = self.request
        for candidate in (field_id, *self.alternatives):
            value = device.field(candidate, scope)
            if value is not None:
                out.add(self.spec, field_value(self, value), *self.labels)
                return
            if device.field_failed(candidate, scope):
                return  # counted once; asking another way would count it twice
            if self.fallback_only_unsupported and not device.field_absent(candidate, scope):
                return
        if self.fallback is not None:
            out.add(self.fallback.spec, self.fallback.value(device), *self.fallback.labels)


Row = FieldSeries | CallSeries


def part(read: Callable[[Device], T | None], pick: Callable[[T], float]) -> Reader:
    """One value of an answer that holds several (a mode and its pending value, say); give
    rows the same `read` where it is cached, so the call is made once."""

    def read_part(device: Device) -> float | None:
        answer = read(device)
        return None if answer is None else pick(answer)

    return read_part


def convert(value: float, scale: float, divisor: float) -> float:
    if scale != 1:
        value = value * scale
    return value / divisor if divisor != 1 else value


def field_value(series: FieldSeries, value: float) -> float:
    if not series.scale:
        return 1 if value else 0
    return convert(value, series.scale, series.divisor)


class FieldPlan:
    """Series that are field values and nothing else, in output order: each spec's series
    together. Built once (per board layout), hashed by identity."""

    __slots__ = ("requests", "requests_by_series", "series", "spans")

    def __init__(self, series: Sequence[FieldSeries]) -> None:
        order = list(dict.fromkeys(s.spec for s in series))
        self.series = tuple(sorted(series, key=lambda s: order.index(s.spec)))
        self.requests_by_series = tuple(s.request for s in self.series)
        self.requests = tuple(dict.fromkeys(self.requests_by_series))
        # (spec, first, end) of each spec's run of series.
        spans: list[tuple[MetricSpec, int, int]] = []
        for index, entry in enumerate(self.series):
            if spans and spans[-1][0] is entry.spec:
                spans[-1] = (entry.spec, spans[-1][1], index + 1)
            else:
                spans.append((entry.spec, index, index + 1))
        self.spans = tuple(spans)


class Emitter:
    """Collects one device's samples; the sampler merges them into metric families."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def add(self, spec: MetricSpec, value: float | None, *labels: str) -> None:
        """Adds a series; a value of None (not read this time) adds nothing."""
        if value is not None:
            self.samples.append((spec, labels, value))

    def add_fields(self, device: Device, plan: FieldPlan) -> None:
        """The plan's series from the device's field values of this sample."""
        for series in plan.series:
            value = device.field(*series.request)
            if value is not None:
                self.add(series.spec, field_value(series, value), *series.labels)


@dataclass(frozen=True)
class Services:
    """What collectors may use besides NVML; none of it is touched by a scrape."""

    attribution: Attribution | None = None
    pods: PodSource | None = None


class Collector:
    """A group of metrics read from each device once per sampling interval.

    Subclasses declare `name`, `default_enabled`, and their metrics in `table`, one row per
    series read from a field or a call, in the order they are emitted; `fields` and `collect`
    follow from the table. Metrics that need more than a row (a loop over fans, a state kept
    between samples) are listed in `metrics` and read by an overridden `collect`, which calls
    `collect_table` where the table's series belong. Reads go through `device` (so NVML's
    quirks are handled in one place). An instance lives as long as the sampler, so it may keep
    state between intervals.
    """

    name: ClassVar[str]
    default_enabled: ClassVar[bool] = True
    # False for collectors that only restate what enumeration read, so they can still
    # describe a GPU that stopped answering.
    reads_nvml: ClassVar[bool] = True
    table: ClassVar[tuple[Row, ...]] = ()
    # Collectors whose results in the SampleContext this one reads; they run before it.
    after: ClassVar[tuple[str, ...]] = ()
    # Every family the collector emits, in the docs' order: those declared, then the table's.
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()
    # Field ids read only every sampling.slow_fields_interval: those declared, and the table's
    # rows marked slow.
    slow_fields: ClassVar[frozenset[int]] = frozenset()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        specs: list[MetricSpec] = [*cls.metrics]
        for row in cls.table:
            specs.append(row.spec)
            if isinstance(row, FieldSeries) and row.fallback is not None:
                specs.append(row.fallback.spec)
        cls.metrics = tuple(dict.fromkeys(specs))
        cls.slow_fields = cls.slow_fields | {
            row.request[0] for row in cls.table if isinstance(row, FieldSeries) and row.slow
        }

    def configure(self, config: Config, services: Services) -> None:
        """Called when the sampler starts and on every reload."""

    def collect_global(self, out: Emitter) -> None:
        """Once per sample, after all devices: for series not tied to a GPU."""

    def close(self) -> None:
        """Releases NVML resources; called once, before NVML shuts down."""

    def fields(self, device: Device) -> tuple[FieldRequest, ...]:
        """Field values this collector reads; the sampler fetches all collectors' fields of a
        device in one nvmlDeviceGetFieldValues call before `collect` runs."""
        return tuple(
            row.wanted(device)
            for row in self.table
            if isinstance(row, FieldSeries) and (row.when is None or row.when(device))
        )

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        """Reads the device once per sample; `context` holds what the collectors of this GPU
        share in this sample."""
        self.collect_table(device, out)

    def collect_table(self, device: Device, out: Emitter) -> None:
        for row in self.table:
            if isinstance(row, CallSeries):
                out.add(row.spec, row.value(device), *row.labels)
            elif row.when is None or row.when(device):
                row.emit(device, out)
