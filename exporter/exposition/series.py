"""One GPU's series rendered to exposition lines as its collectors add them (`naming: nvml`),
reusing the last sample's lines and label prefixes wherever nothing changed."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.collectors import Emitter, MetricSpec
from exporter.collectors.base import FieldPlan, field_value
from exporter.nvml import SUCCESS, Device, FieldResult
from exporter.snapshot import format_value, label_pairs, series_prefix

# (spec, extra label values) -> (line prefix, value, line): one GPU's series of the last sample.
SeriesCache = dict[tuple[MetricSpec, tuple[str, ...]], tuple[str, float, str]]
PlanCache = dict[FieldPlan, "PlanState"]


@dataclass
class PlanState:
    """A field plan's last sample on one GPU."""

    results: list[FieldResult | None]
    lines: list[str | None]
    prefixes: list[str]
    complete: bool  # a line for every series
    failed: bool  # some entry failed: rendered again next sample, so the error policy sees it


class SeriesEmitter(Emitter):
    """Renders each series to its exposition line as the collector adds it. The line of the
    last sample is reused when the value is unchanged, and its prefix (name and labels) always,
    so a series costs a dictionary lookup, not a label rendering."""

    __slots__ = ("_identity", "_previous", "_previous_plans", "lines", "plans", "series")

    def __init__(self, identity: str, previous: SeriesCache, previous_plans: PlanCache) -> None:
        super().__init__()
        self._identity = identity
        self._previous = previous
        self._previous_plans = previous_plans
        self.series: SeriesCache = {}
        self.plans: PlanCache = {}
        self.lines: dict[MetricSpec, list[str]] = {}

    def add(self, spec: MetricSpec, value: float | None, *labels: str) -> None:
        if value is None:
            return
        key = (spec, labels)
        entry = self._previous.get(key)
        if entry is None:
            prefix = self._prefix(spec, labels)
            entry = (prefix, value, prefix + format_value(value) + "\n")
        elif entry[1] != value:
            entry = (entry[0], value, entry[0] + format_value(value) + "\n")
        self.series[key] = entry
        lines = self.lines.get(spec)
        if lines is None:
            lines = self.lines[spec] = []
        lines.append(entry[2])

    def _prefix(self, spec: MetricSpec, labels: tuple[str, ...]) -> str:
        pairs = self._identity
        if labels:
            pairs += "," + label_pairs(spec.labels, labels)
        return series_prefix(spec.name, pairs)

    def add_fields(self, device: Device, plan: FieldPlan) -> None:
        """A plan's series at once: when its field entries equal the last sample's, all its
        lines are the last sample's too (one list comparison for, say, 108 NVLink series);
        otherwise only the entries that changed are rendered again."""
        results = device.field_results(plan.requests_by_series)
        state = self._previous_plans.get(plan)
        if state is None or state.failed or state.results != results:
            state = self._render_plan(device, plan, results, state)
        self.plans[plan] = state
        lines = state.lines
        for spec, start, end in plan.spans:
            target = self.lines.get(spec)
            if target is None:
                target = self.lines[spec] = []
            if state.complete:
                target.extend(lines[start:end])  # type: ignore[arg-type]
            else:
                target.extend(line for line in lines[start:end] if line is not None)

    def _render_plan(
        self,
        device: Device,
        plan: FieldPlan,
        results: list[FieldResult | None],
        previous: PlanState | None,
    ) -> PlanState:
        if previous is None:
            prefixes = [self._prefix(s.spec, s.labels) for s in plan.series]
        else:
            prefixes = previous.prefixes
        state = PlanState(results, [], prefixes, complete=True, failed=False)
        for index, (series, result) in enumerate(zip(plan.series, results, strict=True)):
            if result is None or result[0] != SUCCESS:
                if result is not None:
                    device.field(*series.request)  # the error policy sees each failed read
                    state.failed = True
                state.lines.append(None)
                state.complete = False
            elif previous is not None and previous.results[index] == result:
                state.lines.append(previous.lines[index])
            else:
                value = field_value(series, result[1])  # type: ignore[arg-type]
                state.lines.append(prefixes[index] + format_value(value) + "\n")
        return state
