"""A GPU's field values, read in one nvmlDeviceGetFieldValues call per sample for all its
collectors: which fields to ask this time (no duplicates, none known to be absent, the slow
ones only every so often), and the entries that stand until the next batch.

Some fields cost the driver far more CPU than most (docs/performance.md); their collectors mark
them slow, and where they are counters that rarely need second resolution they join the batch
only every `sampling.slow_fields_interval`, their last answer standing in between."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from exporter.nvml.codes import SUCCESS
from exporter.nvml.values import FieldRequest, FieldResult

_NEVER = float("inf")
Requests = tuple[FieldRequest, ...]


class FieldBatch:
    """One GPU's field requests and the entries answered to them."""

    def __init__(self) -> None:
        # The entries of the last batch.
        self._entries: dict[FieldRequest, FieldResult] = {}
        # The slow fields' answers from the last batch that asked for them, and when that was.
        self._slow_answers: dict[FieldRequest, FieldResult] = {}
        self._slow_read_at = float("-inf")
        # How often the slow fields are read, as the sampler last asked: calls that stand in
        # for a slow field are read as seldom (Device.read_slowly).
        self.slow_every = 0.0
        # Request lists as the collectors ask -> what is asked of NVML (no duplicates, nothing
        # known to be absent), split into the fields asked every time and the slow ones.
        self._plans: dict[tuple[Requests, frozenset[int]], tuple[Requests, Requests]] = {}
        # When the first field a plan leaves out as absent may be asked again: the plans are
        # built afresh then.
        self._plans_until = _NEVER

    def replan(self) -> None:
        """Builds the plans afresh at the next batch: which fields are absent has changed."""
        self._plans.clear()
        self._plans_until = _NEVER

    def due(
        self,
        requests: Sequence[FieldRequest],
        now: float,
        slow_every: float,
        slow_fields: frozenset[int],
        absent_until: Callable[[FieldRequest, float], float | None],
    ) -> tuple[Requests, Requests]:
        """What to ask of NVML now for `requests`, and which of those are slow fields asked
        afresh; the last batch's entries are dropped. `absent_until` tells until when a field
        that answered "absent" is left out, None for a field to ask."""
        self.slow_every = slow_every
        key = (tuple(requests), slow_fields)
        if now >= self._plans_until:
            self.replan()
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 16:  # request lists differ only by mode changes
                self.replan()
            wanted = []
            for request in dict.fromkeys(key[0]):
                until = absent_until(request, now)
                if until is None:
                    wanted.append(request)
                else:
                    self._plans_until = min(self._plans_until, until)
            plan = self._plans[key] = (
                tuple(r for r in wanted if r[0] not in slow_fields),
                tuple(r for r in wanted if r[0] in slow_fields),
            )
        every, slow = plan
        self._entries = {}
        # A little early rather than a whole sample late: the clock is read when the device's
        # turn comes, a few ms after the tick.
        if slow and now - self._slow_read_at >= slow_every * 0.95:
            self._slow_read_at = now
            self._slow_answers = {}
            return every + slow, slow
        # A slow field with no answer to stand in (new to the list, failed last time, or due
        # again after it was absent) is asked at once, alone: the others' stand.
        fresh = tuple(r for r in slow if r not in self._slow_answers)
        return (every + fresh if fresh else every), fresh

    def answered(self, asked: Requests, results: Sequence[FieldResult], fresh: Requests) -> None:
        """Keeps the entries NVML answered to `asked`."""
        self._entries = dict(zip(asked, results, strict=True))
        for request in fresh:
            # Only answers stand in: a field that failed is asked again at the next sample.
            entry = self._entries[request]
            if entry[0] == SUCCESS:
                self._slow_answers[request] = entry

    def entry(self, request: FieldRequest) -> FieldResult | None:
        """The field's entry from the last batch, or a slow field's answer from an earlier one
        (only answers are kept, so a failure is always this sample's)."""
        return self._entries.get(request) or self._slow_answers.get(request)
