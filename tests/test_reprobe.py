"""What answered "not supported" is asked again: every nvml.REPROBE_SECONDS of the sampler's
clock (once per capability, not every sample), and at once when a GPU comes back after it was
lost or NVML is initialised again. So a value that was unsupported and becomes supported comes
back without a restart."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pynvml
import pytest
from fakes import FakeClock
from prometheus_client.parser import text_string_to_metric_families

from exporter import nvml
from exporter.collectors.nvlink import NvlinkCollector
from exporter.config import Config, FaultConfig, SamplingConfig, SimulationConfig
from exporter.nvml import (
    FI_CLOCKS_EVENT_HW_THERM_SLOWDOWN,
    FI_NVLINK_LINK_COUNT,
    FI_RETIRED_SBE,
    FI_TOTAL_ENERGY_CONSUMPTION,
    NOT_SUPPORTED,
    REPROBE_SECONDS,
    SUCCESS,
    UNINITIALIZED,
    Device,
    DeviceIdentity,
    DeviceLost,
    FieldRequest,
    FieldResult,
    Handle,
    NvmlError,
)
from exporter.nvml.pynvml_driver import PynvmlDriver
from exporter.sampler import Sampler
from exporter.simulate.driver import SimulatedDriver
from exporter.snapshot import Format

GPUS = 8
ALL = {str(i) for i in range(GPUS)}
# The dfma tensor pipe: in the fast GPM metrics, and not in the simulated H200's.
GPM_ABSENT_METRIC = 6

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class CountingDriver(SimulatedDriver):
    """The simulated fleet, counting what is asked of it; and able to lose the NVML session
    (UNINITIALIZED, as after a driver reload) for a while."""

    def __init__(self, config: SimulationConfig, clock: FakeClock) -> None:
        super().__init__(config, clock=clock)
        self.asked: Counter[tuple[object, ...]] = Counter()
        self.session_lost: tuple[float, float] | None = None  # (from, until) in elapsed()

    def temperature(self, handle: Handle, sensor: int) -> int:
        self.asked[("temperature", handle)] += 1
        return super().temperature(handle, sensor)

    def power_usage(self, handle: Handle) -> int:
        self.asked[("power_usage", handle)] += 1
        return super().power_usage(handle)

    def fan_count(self, handle: Handle) -> int:
        self.asked[("fan_count", handle)] += 1
        return super().fan_count(handle)

    def samples(self, handle: Handle, sample_type: int, since_us: int) -> list[tuple[int, float]]:
        self.asked[("samples", handle, sample_type)] += 1
        return super().samples(handle, sample_type, since_us)

    def field_values(self, handle: Handle, requests: Sequence[FieldRequest]) -> list[FieldResult]:
        for field_id, scope in requests:
            self.asked[("field", handle, field_id, scope)] += 1
        return super().field_values(handle, requests)

    def gpm_metrics(
        self, first: Handle, second: Handle, metric_ids: Sequence[int]
    ) -> list[tuple[int, float | None]]:
        for metric_id in metric_ids:
            self.asked[("gpm", metric_id)] += 1
        return super().gpm_metrics(first, second, metric_ids)

    def utilization(self, handle: Handle) -> nvml.Utilization:
        if self.session_lost is not None:
            start, end = self.session_lost
            if start <= self.elapsed() < end:
                raise NvmlError(UNINITIALIZED, "utilization")
        return super().utilization(handle)


class Fleet:
    """A sampler over CountingDriver, driven by a fake clock one interval at a time."""

    def __init__(self, faults: Sequence[FaultConfig] = (), slow_fields_interval: float = 10.0):
        config = dataclasses.replace(
            Config(backend="simulated"),
            sampling=SamplingConfig(interval=1.0, slow_fields_interval=slow_fields_interval),
            simulation=SimulationConfig(devices=GPUS, faults=tuple(faults)),
        )
        self.clock = FakeClock()
        self.start = self.clock.now
        self.driver = CountingDriver(config.simulation, self.clock)
        self.sampler = Sampler(config, self.driver, clock=self.clock)
        self.sampled = False

    @property
    def t(self) -> float:
        """Seconds since the fleet (and its faults' schedule) started."""
        return self.clock.now - self.start

    def sample(self) -> Samples:
        """One sample now; its series."""
        self.sampled = True
        text = self.sampler.sample_once().body(Format.TEXT, compressed=False).decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def step(self) -> Samples:
        """One interval later, one sample."""
        self.clock.advance(1.0)
        return self.sample()

    def run_until(self, t: float) -> Samples:
        """A sample every second up to and including `t`; the last one's series."""
        found = self.sample() if not self.sampled else {}
        while self.t < t:
            found = self.step()
        return found

    def close(self) -> None:
        self.sampler.stop(5.0)


@pytest.fixture
def fleets() -> Any:
    made: list[Fleet] = []

    def make(*faults: FaultConfig, slow_fields_interval: float = 10.0) -> Fleet:
        made.append(Fleet(faults, slow_fields_interval))
        return made[-1]

    yield make
    for fleet in made:
        fleet.close()


def gpus_with(found: Samples, name: str) -> set[str]:
    return {dict(labels)["gpu"] for (n, labels), _ in found.items() if n == name}


def collector_success(found: Samples) -> dict[str, float]:
    return {
        dict(labels)["collector"]: v
        for (n, labels), v in found.items()
        if n == "nvml_collector_success"
    }


def first_time_all_back(fleet: Fleet, name: str, gpus: set[str], until: float) -> float | None:
    """A sample every second from the next one to `until`; the first time `name` has a series
    for every GPU in `gpus`, after which it must keep them."""
    back = None
    while fleet.t < until:
        found = fleet.step()
        assert set(collector_success(found).values()) == {1.0}  # unsupported is no error
        present = gpus_with(found, name) >= gpus
        if back is None and present:
            back = fleet.t
        elif back is not None:
            assert present, f"{name} went away again at t={fleet.t}"
    return back


def test_the_period_is_thirty_seconds() -> None:
    assert REPROBE_SECONDS == 30.0


@pytest.mark.parametrize("duration", [5.0, 45.0])
def test_temperature_comes_back_within_the_period_after_not_supported_ends_on_every_gpu(
    fleets: Any, duration: float
) -> None:
    fleet = fleets(FaultConfig(kind="unsupported", function="temperature", duration=duration))
    during = fleet.sample()
    assert gpus_with(during, "nvml_temperature_celsius") == set()
    assert gpus_with(during, "nvml_power_watts") == ALL
    back = first_time_all_back(
        fleet, "nvml_temperature_celsius", ALL, until=duration + REPROBE_SECONDS + 5
    )
    assert back is not None, "temperature never came back without a restart"
    assert duration <= back <= duration + REPROBE_SECONDS


def test_power_comes_back_within_the_period_after_not_supported_ends(fleets: Any) -> None:
    # power_usage's fault covers its fields too: the average, the instant, and the call.
    fault = FaultConfig(kind="unsupported", device=3, function="power_usage", start=10, duration=20)
    fleet = fleets(fault)
    before = fleet.run_until(9)
    assert gpus_with(before, "nvml_power_watts") == ALL
    during = fleet.run_until(29)
    assert gpus_with(during, "nvml_power_watts") == ALL - {"3"}
    assert gpus_with(during, "nvml_power_limit_watts") == ALL  # another call, unaffected
    assert gpus_with(during, "nvml_energy_joules_total") == ALL
    back = first_time_all_back(fleet, "nvml_power_watts", ALL, until=30 + REPROBE_SECONDS + 5)
    assert back is not None, "power never came back without a restart"
    assert back <= 30 + REPROBE_SECONDS


def test_a_gpu_whose_every_call_was_unsupported_comes_back_whole(fleets: Any) -> None:
    fleet = fleets(FaultConfig(kind="unsupported", device=2, start=5, duration=10))
    healthy = fleet.run_until(4)
    during = fleet.run_until(14)
    assert "2" not in gpus_with(during, "nvml_temperature_celsius")
    assert "2" not in gpus_with(during, "nvml_gpm_sm_activity_ratio")
    # GPM needs two good samples in a row once its sample call works again.
    after = fleet.run_until(15 + REPROBE_SECONDS + 2)

    def names(found: Samples, gpu: str) -> set[str]:
        return {n for (n, labels) in found if dict(labels).get("gpu") == gpu}

    assert names(after, "2") == names(healthy, "2") == names(after, "0")
    assert set(collector_success(after).values()) == {1.0}


def test_xid_events_are_registered_once_the_event_query_is_supported_again(
    fleets: Any,
) -> None:
    fleet = fleets(FaultConfig(kind="unsupported", function="supported_events", duration=5))
    assert gpus_with(fleet.sample(), "nvml_xid_errors_total") == set()
    back = first_time_all_back(fleet, "nvml_xid_errors_total", ALL, until=5 + REPROBE_SECONDS)
    assert back is not None and back <= 5 + REPROBE_SECONDS


def test_a_gpu_back_after_it_was_lost_forgets_what_was_unsupported_at_once(
    fleets: Any,
) -> None:
    fleet = fleets(
        FaultConfig(kind="unsupported", function="temperature", duration=5),
        FaultConfig(kind="lost", device=3, start=10, duration=2),
    )
    during = fleet.run_until(11)
    down = {dict(k)["gpu"]: dict(k)["reason"] for (n, k) in during if n == "nvml_gpu_down_info"}
    assert down == {"3": "gpu_is_lost"}
    back = fleet.step()
    up = {dict(k)["gpu"]: v for (n, k), v in back.items() if n == "nvml_gpu_up"}
    assert up["3"] == 1
    # GPU 3 asked again the moment it answered; the others wait for their period.
    assert gpus_with(back, "nvml_temperature_celsius") == {"3"}
    later = fleet.run_until(REPROBE_SECONDS)
    assert gpus_with(later, "nvml_temperature_celsius") == ALL


def test_nvml_initialised_again_forgets_what_was_unsupported_at_once(fleets: Any) -> None:
    fleet = fleets(FaultConfig(kind="unsupported", function="temperature", duration=5))
    fleet.driver.session_lost = (10.0, 10.5)
    assert gpus_with(fleet.run_until(9), "nvml_temperature_celsius") == set()
    lost = fleet.run_until(10)
    assert lost[("nvml_up", frozenset())] == 0
    again = fleet.step()
    assert again[("nvml_up", frozenset())] == 1
    assert gpus_with(again, "nvml_temperature_celsius") == ALL


def test_what_stays_unsupported_is_asked_at_most_once_per_period(fleets: Any) -> None:
    faults = [
        FaultConfig(kind="unsupported", function=name)
        for name in ("temperature", "power_usage", "samples")
    ]
    # Slow reads every 7 s, so that they fall between re-probes.
    fleet = fleets(*faults, slow_fields_interval=7.0)
    seconds = 100
    fleet.run_until(seconds)
    # Asked at the first chance, then once per period: never more, and not never again.
    once_per_period = len(range(0, seconds + 1, int(REPROBE_SECONDS)))
    for gpu in range(GPUS):
        for key in (
            ("temperature", gpu),
            # Its fields too: the 1 s average, the instant, then this call.
            ("power_usage", gpu),
            # Each driver sample buffer: GPU and memory utilization, encoder, decoder.
            *(("samples", gpu, kind) for kind in range(1, 5)),
            # Unsupported by the simulated H200 itself: a static value (fans on an SXM
            # board), a field in every sample's batch, a slow field.
            ("fan_count", gpu),
            ("field", gpu, FI_RETIRED_SBE, 0),
            ("field", gpu, FI_CLOCKS_EVENT_HW_THERM_SLOWDOWN, 0),
        ):
            assert fleet.driver.asked[key] == once_per_period, key
        # A slow field asked again is asked alone: the others keep their own interval.
        energy = ("field", gpu, FI_TOTAL_ENERGY_CONSUMPTION, 0)
        assert fleet.driver.asked[energy] == len(range(0, seconds + 1, 7))
    # GPM's first metrics come with its second sample; metric calls name no GPU.
    first_metrics = 1
    gpm = len(range(first_metrics, seconds + 1, int(REPROBE_SECONDS)))
    assert fleet.driver.asked[("gpm", GPM_ABSENT_METRIC)] == gpm * GPUS


class LinkCountDriver:
    """Answers the NVLink count field NOT_SUPPORTED (inside a call that works) until `now`
    passes `from_`, then 18."""

    def __init__(self, clock: FakeClock, from_: float) -> None:
        self.clock, self.from_ = clock, from_
        self.calls = 0

    def field_values(self, handle: Handle, requests: Sequence[FieldRequest]) -> list[FieldResult]:
        self.calls += 1
        assert list(requests) == [(FI_NVLINK_LINK_COUNT, 0)]
        return [(SUCCESS, 18) if self.clock() >= self.from_ else (NOT_SUPPORTED, None)]


def test_nvlink_count_without_an_answer_is_asked_again_not_taken_as_no_nvlink() -> None:
    clock = FakeClock()
    drv = LinkCountDriver(clock, from_=clock.now + 5)
    dev = Device(drv, 0, DeviceIdentity(index=0, uuid="GPU-0"), clock=clock)  # type: ignore[arg-type]
    collector = NvlinkCollector()
    links = []
    for _ in range(40):
        links.append(len(collector.fields(dev)) // 6)
        clock.advance(1.0)
    assert links == [0] * int(REPROBE_SECONDS) + [18] * (40 - int(REPROBE_SECONDS))
    assert drv.calls == 2  # and the answer then stands for good


class LostDriver:
    """Every call NOT_SUPPORTED (power answers) until `lost` is set, then GPU_IS_LOST."""

    def __init__(self) -> None:
        self.lost = False

    def _answer(self) -> int:
        raise NvmlError(nvml.GPU_IS_LOST if self.lost else NOT_SUPPORTED)

    def power_usage(self, handle: Handle) -> int:
        if self.lost:
            self._answer()
        return 300_000

    def temperature(self, handle: Handle, sensor: int) -> int:
        return self._answer()

    def fan_count(self, handle: Handle) -> int:
        return self._answer()

    def field_values(self, handle: Handle, requests: Sequence[FieldRequest]) -> list[FieldResult]:
        return [(NOT_SUPPORTED, None) for _ in requests]


def test_losing_the_gpu_forgets_calls_fields_static_values_and_gpm_metrics() -> None:
    drv = LostDriver()
    clock = FakeClock()
    dev = Device(drv, 0, DeviceIdentity(index=0, uuid="GPU-0"), clock=clock)  # type: ignore[arg-type]
    assert dev.read(drv.temperature, 0) is None
    assert dev.cached(drv.fan_count) is None
    dev.fetch_fields([(nvml.FI_MEMORY_TEMP, 0)], 10.0)
    assert dev.field(nvml.FI_MEMORY_TEMP) is None
    dev.mark_absent("gpm_metric", GPM_ABSENT_METRIC)
    assert dev.is_absent(drv.temperature, 0) and dev.is_absent(drv.fan_count)
    assert dev.field_absent(nvml.FI_MEMORY_TEMP)
    assert dev.marked_absent("gpm_metric", GPM_ABSENT_METRIC)
    drv.lost = True
    clock.advance(1.0)  # well within the period: only the loss makes it ask
    assert dev.read(drv.temperature, 0) is None  # not asked: no call to find the loss
    with pytest.raises(DeviceLost):
        dev.read(drv.power_usage)
    assert not dev.is_absent(drv.temperature, 0) and not dev.is_absent(drv.fan_count)
    assert not dev.field_absent(nvml.FI_MEMORY_TEMP)
    assert not dev.marked_absent("gpm_metric", GPM_ABSENT_METRIC)


def test_nvml_initialised_again_tries_the_newest_variant_of_a_call_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[object] = []
    v2_works = False

    class V1:
        total, used, free = 100, 60, 40

    class V2(V1):
        free, reserved = 30, 10

    def memory_info(handle: object, version: object = None) -> V1:
        asked.append(version)
        if version is None:
            return V1()
        if not v2_works:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return V2()

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory_info)
    driver = PynvmlDriver()
    driver.init()
    assert driver.memory(object()).reserved is None  # v1 has no `reserved`
    driver.memory(object())
    assert asked == [pynvml.nvmlMemory_v2, None, None]
    v2_works = True  # a newer driver loaded under the exporter
    driver.init()
    assert driver.memory(object()).reserved == 10
    assert asked[3:] == [pynvml.nvmlMemory_v2]
