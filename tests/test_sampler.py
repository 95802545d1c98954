"""The sampler: error boundaries, lost and hanging GPUs, NVML coming up late."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import ClassVar

import pytest
from fakes import FakeClock
from prometheus_client.parser import text_string_to_metric_families

from exporter.collectors import COLLECTORS, Collector, Emitter, MetricSpec, enabled_collectors
from exporter.collectors.base import FieldPlan, FieldSeries
from exporter.collectors.shared import SampleContext
from exporter.config import (
    Config,
    DeviceSelection,
    FaultConfig,
    SamplingConfig,
    SimulationConfig,
)
from exporter.deviceread import DeviceResult
from exporter.exposition import PlanCache, SeriesEmitter
from exporter.nvml import DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH, Device, NvmlError
from exporter.readers import Readers
from exporter.sampler import Sampler
from exporter.simulate.driver import SimulatedDriver
from exporter.snapshot import Format, Snapshot

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def simulated(
    devices: int = 4,
    faults: tuple[FaultConfig, ...] = (),
    interval: float = 1.0,
    timeout: float | None = None,
    clock: FakeClock | None = None,
) -> Sampler:
    config = dataclasses.replace(
        Config(backend="simulated"),
        sampling=SamplingConfig(interval=interval, timeout=timeout),
        simulation=SimulationConfig(devices=devices, faults=faults),
    )
    if clock is None:
        return Sampler(config, SimulatedDriver(config.simulation))
    return Sampler(config, SimulatedDriver(config.simulation, clock=clock), clock=clock)


def samples(snapshot: Snapshot) -> Samples:
    text = snapshot.body(Format.TEXT, compressed=False).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by_gpu(found: Samples, name: str) -> dict[str, float]:
    return {dict(labels)["gpu"]: v for (n, labels), v in found.items() if n == name}


def gpus_with_any_series(found: Samples) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, labels in found:
        gpu = dict(labels).get("gpu")
        if gpu is not None:
            out.setdefault(gpu, set()).add(name)
    return out


def test_one_sample_describes_every_gpu() -> None:
    found = samples(simulated(devices=4).sample_once())
    assert found[("nvml_up", frozenset())] == 1
    assert found[("nvml_gpu_devices", frozenset())] == 4
    assert by_gpu(found, "nvml_gpu_up") == {"0": 1, "1": 1, "2": 1, "3": 1}
    assert len(by_gpu(found, "nvml_power_watts")) == 4
    success = {
        dict(k)["collector"]: v for (n, k), v in found.items() if n == "nvml_collector_success"
    }
    assert success == {name: 1.0 for name in enabled_collectors({})}


def test_help_says_values_are_sampled_every_interval() -> None:
    body = simulated(interval=2.5).sample_once().body(Format.TEXT, False).decode()
    assert "# HELP nvml_power_watts Power draw of the whole board. Sampled every 2.5s." in body


class BrokenCollector(Collector):
    name = "broken"
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        raise RuntimeError("a bug in one collector")


def with_broken_collector() -> Sampler:
    """Every collector on 2 simulated GPUs, plus one that always raises."""
    registry = MappingProxyType({**COLLECTORS, "broken": BrokenCollector})
    config = dataclasses.replace(
        Config(backend="simulated"),
        simulation=SimulationConfig(devices=2),
        collectors=MappingProxyType({**dict.fromkeys(COLLECTORS, True), "broken": True}),
    )
    return Sampler(config, SimulatedDriver(config.simulation), registry=registry)


def test_an_exception_in_one_collector_costs_nothing_else() -> None:
    sampler = with_broken_collector()
    sampler.sample_once()
    found = samples(sampler.sample_once())
    success = {
        dict(k)["collector"]: v for (n, k), v in found.items() if n == "nvml_collector_success"
    }
    assert success["broken"] == 0
    assert all(v == 1 for name, v in success.items() if name != "broken")
    errors = {
        dict(k)["collector"]: v for (n, k), v in found.items() if n == "nvml_collector_errors_total"
    }
    assert errors["broken"] == 4  # two devices, two samples
    assert len(by_gpu(found, "nvml_temperature_celsius")) == 2
    assert by_gpu(found, "nvml_gpu_up") == {"0": 1, "1": 1}


def test_a_lost_gpu_is_down_without_stale_series_and_others_are_unaffected() -> None:
    clock = FakeClock()
    sampler = simulated(
        devices=4,
        faults=(FaultConfig(kind="lost", device=2, start=5, duration=10),),
        clock=clock,
    )
    before = samples(sampler.sample_once())
    assert by_gpu(before, "nvml_gpu_up")["2"] == 1
    clock.advance(6)
    during = samples(sampler.sample_once())
    assert by_gpu(during, "nvml_gpu_up") == {"0": 1, "1": 1, "2": 0, "3": 1}
    series = gpus_with_any_series(during)
    assert series["2"] == {
        "nvml_gpu_up",
        "nvml_gpu_info",
        "nvml_gpu_down_info",
        "nvml_gpu_last_sample_timestamp_seconds",
    }
    assert (
        during[
            (
                "nvml_gpu_down_info",
                frozenset(
                    {
                        ("gpu", "2"),
                        ("uuid", sampler.session.devices[2].uuid),
                        ("reason", "gpu_is_lost"),
                    }
                ),
            )
        ]
        == 1
    )
    assert "nvml_power_watts" in series["0"] and "nvml_power_watts" in series["3"]
    clock.advance(10)
    after = samples(sampler.sample_once())
    assert by_gpu(after, "nvml_gpu_up")["2"] == 1
    assert "nvml_power_watts" in gpus_with_any_series(after)["2"]


def test_a_hanging_gpu_misses_the_deadline_and_is_not_piled_on() -> None:
    sampler = simulated(
        devices=3,
        faults=(
            FaultConfig(kind="slow", device=1, function="power_usage", delay=0.6, duration=0.5),
        ),
        interval=0.2,
        timeout=0.15,
    )
    started = time.monotonic()
    first = samples(sampler.sample_once())
    assert time.monotonic() - started < 0.4  # bounded by the deadline, not by the hang
    assert by_gpu(first, "nvml_gpu_up") == {"0": 1, "1": 0, "2": 1}
    assert len(by_gpu(first, "nvml_power_watts")) == 2
    # The stuck read is still outstanding: the GPU is skipped, not queued behind it.
    second = samples(sampler.sample_once())
    assert by_gpu(second, "nvml_gpu_up")["1"] == 0
    time.sleep(0.7)  # the hung call returns; the fault window has passed
    third = samples(sampler.sample_once())
    assert by_gpu(third, "nvml_gpu_up") == {"0": 1, "1": 1, "2": 1}


def test_reads_share_one_thread_until_a_read_stalls_and_shrink_back_after() -> None:
    readers: Readers[DeviceResult] = Readers()
    release = threading.Event()
    threads: dict[int, str] = {}

    def read(index: int, hang: bool = False) -> Callable[[], DeviceResult]:
        def call() -> DeviceResult:
            threads[index] = threading.current_thread().name
            if hang:
                release.wait(5)
            return DeviceResult()

        return call

    futures = readers.run({i: read(i) for i in range(4)}, time.monotonic() + 1, 0.05)
    assert all(f.done() for f in futures.values())
    assert set(threads.values()) == {"gpu-reader"}  # no GIL hand-offs between GPUs

    threads.clear()
    futures = readers.run(
        {0: read(0), 1: read(1, hang=True), 2: read(2)}, time.monotonic() + 1, 0.05
    )
    assert futures[0].done() and futures[2].done() and not futures[1].done()
    assert threads[0] == threads[1] == "gpu-reader" and threads[2] == "gpu-reader-2"

    release.set()
    futures[1].result(timeout=5)
    deadline = time.monotonic() + 5
    while readers._threads > 1:  # the freed thread retires, as one idle reader is enough
        assert time.monotonic() < deadline, "surplus reader never retired"
        time.sleep(0.01)
    threads.clear()
    futures = readers.run({i: read(i) for i in range(3)}, time.monotonic() + 1, 0.05)
    assert all(f.done() for f in futures.values())
    assert len(set(threads.values())) == 1
    readers.shutdown()


def test_slow_gpus_get_more_readers_instead_of_missing_the_deadline() -> None:
    # Every GPU answers, slowly: read one after another, 8 x 60 ms would pass the 0.3 s
    # deadline; at the pace of the first reads the sampler adds readers and all are read.
    sampler = simulated(
        devices=8,
        faults=(FaultConfig(kind="slow", function="memory", delay=0.06),),
        interval=0.3,
    )
    for _ in range(3):
        started = time.monotonic()
        sample = samples(sampler.sample_once())
        assert time.monotonic() - started < 0.45
        assert set(by_gpu(sample, "nvml_gpu_up").values()) == {1}
        assert len(by_gpu(sample, "nvml_memory_used_bytes")) == 8
    sampler.stop(2.0)


def test_reads_still_queued_at_the_deadline_are_dropped_not_run_late() -> None:
    readers: Readers[DeviceResult] = Readers()
    release = threading.Event()
    ran: list[int] = []

    def read(index: int) -> Callable[[], DeviceResult]:
        def call() -> DeviceResult:
            ran.append(index)
            release.wait(5)
            return DeviceResult()

        return call

    # A stall of 10 s: no second thread, the queue has to wait.
    futures = readers.run({i: read(i) for i in range(3)}, time.monotonic() + 0.1, 10.0)
    assert not futures[0].done() and futures[1].cancelled() and futures[2].cancelled()
    release.set()
    futures[0].result(timeout=5)
    time.sleep(0.05)  # the reader has moved on through the queue by now
    assert ran == [0]  # the cancelled reads never ran
    readers.shutdown()


def test_stopping_ends_the_event_waiter_before_nvml_shuts_down() -> None:
    before = set(threading.enumerate())  # other tests' samplers may have left theirs
    sampler = simulated(devices=2)
    sampler.sample_once()
    waiters = [t for t in set(threading.enumerate()) - before if t.name == "nvml-events"]
    assert len(waiters) == 1
    started = time.monotonic()
    assert sampler.stop(5.0)
    assert time.monotonic() - started < 2.0  # at most one wait's timeout
    assert not any(t.is_alive() for t in waiters)


def test_unsupported_value_is_absent_and_not_an_error() -> None:
    sampler = simulated(
        devices=2, faults=(FaultConfig(kind="unsupported", function="power_usage"),)
    )
    sampler.sample_once()
    found = samples(sampler.sample_once())
    assert by_gpu(found, "nvml_power_watts") == {}
    assert len(by_gpu(found, "nvml_energy_joules_total")) == 2
    assert found[("nvml_collector_success", frozenset({("collector", "power")}))] == 1


def test_nvml_missing_at_start_then_present_without_restart() -> None:
    clock = FakeClock()
    sampler = simulated(
        devices=2, faults=(FaultConfig(kind="init_failure", duration=3),), clock=clock
    )
    first = samples(sampler.sample_once())
    assert first[("nvml_up", frozenset())] == 0
    assert by_gpu(first, "nvml_gpu_up") == {}
    assert not sampler.ready
    for _ in range(8):
        clock.advance(0.5)
        sampler.sample_once()
    last = samples(sampler.snapshot)
    assert last[("nvml_up", frozenset())] == 1
    assert by_gpu(last, "nvml_gpu_up") == {"0": 1, "1": 1}
    assert sampler.ready


def test_readiness_stays_once_reached_so_a_later_outage_remains_scrapable() -> None:
    clock = FakeClock()
    sampler = simulated(devices=1, clock=clock)
    sampler.sample_once()
    assert sampler.ready
    sampler.session.shutdown()
    sampler.session.driver.init = _fail  # type: ignore[method-assign]
    clock.advance(1)
    found = samples(sampler.sample_once())
    assert found[("nvml_up", frozenset())] == 0
    assert sampler.ready


def _fail() -> None:
    raise NvmlError(DRIVER_NOT_LOADED)


def test_reconfigure_switches_collectors_from_the_next_sample() -> None:
    sampler = simulated(devices=1)
    assert by_gpu(samples(sampler.sample_once()), "nvml_temperature_celsius")
    collectors = MappingProxyType({**sampler.config.collectors, "thermal": False})
    sampler.reconfigure(dataclasses.replace(sampler.config, collectors=collectors))
    assert by_gpu(samples(sampler.sample_once()), "nvml_temperature_celsius") == {}


def test_loop_publishes_new_snapshots_and_stops_cleanly() -> None:
    sampler = simulated(devices=2, interval=0.05)
    sampler.start()
    deadline = time.monotonic() + 5
    while not sampler.has_sampled():
        assert time.monotonic() < deadline, "no first sample"
        time.sleep(0.01)
    first = sampler.snapshot
    while sampler.snapshot is first and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sampler.snapshot is not first
    assert sampler.health_problem() is None
    assert sampler.stop(2) is True
    assert sampler.health_problem() is not None


def test_snapshot_renders_each_body_once() -> None:
    snapshot = simulated(devices=1).sample_once()
    first = snapshot.body(Format.OPENMETRICS, compressed=True)
    assert snapshot.body(Format.OPENMETRICS, compressed=True) is first
    assert snapshot.body(Format.TEXT, compressed=False) is snapshot.body(Format.TEXT, False)


def test_collector_failures_are_logged_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    sampler = with_broken_collector()
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            found = samples(sampler.sample_once())
    assert len([r for r in caplog.records if "collector failed" in r.message]) == 1
    errors = found[
        (
            "nvml_collector_errors_total",
            frozenset({("collector", "broken"), ("error", "exception")}),
        )
    ]
    assert errors == 6


def test_a_gpu_that_could_not_be_opened_is_retried_and_comes_back() -> None:
    clock = FakeClock()
    sampler = simulated(
        devices=3, faults=(FaultConfig(kind="lost", device=1, duration=2),), clock=clock
    )
    first = samples(sampler.sample_once())
    assert by_gpu(first, "nvml_gpu_up") == {"0": 1, "1": 0, "2": 1}
    clock.advance(3)
    assert by_gpu(samples(sampler.sample_once()), "nvml_gpu_up")["1"] == 0  # not retried yet
    clock.advance(3)
    later = samples(sampler.sample_once())
    assert by_gpu(later, "nvml_gpu_up") == {"0": 1, "1": 1, "2": 1}
    uuids = {dict(k)["gpu"]: dict(k)["uuid"] for k in sampler_keys(later, "nvml_gpu_up")}
    assert uuids["1"].startswith("GPU-")


def sampler_keys(found: Samples, name: str) -> list[frozenset[tuple[str, str]]]:
    return [labels for (n, labels) in found if n == name]


def test_a_new_device_selection_applies_at_the_next_sample() -> None:
    sampler = simulated(devices=4)
    assert len(by_gpu(samples(sampler.sample_once()), "nvml_gpu_up")) == 4
    sampler.reconfigure(
        dataclasses.replace(sampler.config, devices=DeviceSelection(exclude=(1, 3)))
    )
    found = samples(sampler.sample_once())
    assert by_gpu(found, "nvml_gpu_up") == {"0": 1, "2": 1}
    assert found[("nvml_gpu_devices", frozenset())] == 4


class SessionBreaker(Collector):
    """Simulates the driver being unloaded under the exporter."""

    name = "breaker"
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()
    broken = True

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        if SessionBreaker.broken:
            device.read(_raise_rm_mismatch)


def _raise_rm_mismatch(handle: object) -> None:
    raise NvmlError(LIB_RM_VERSION_MISMATCH)


def test_driver_breaking_under_us_reports_nvml_down_and_reinitialises() -> None:
    clock = FakeClock()
    registry = MappingProxyType({**COLLECTORS, "breaker": SessionBreaker})
    config = dataclasses.replace(
        Config(backend="simulated"),
        simulation=SimulationConfig(devices=2),
        collectors=MappingProxyType({"power": True, "breaker": True}),
    )
    driver = SimulatedDriver(config.simulation, clock=clock)
    sampler = Sampler(config, driver, clock=clock, registry=registry)
    SessionBreaker.broken = True
    found = samples(sampler.sample_once())
    assert found[("nvml_up", frozenset())] == 0
    assert by_gpu(found, "nvml_gpu_up") == {}
    SessionBreaker.broken = False
    clock.advance(1)
    found = samples(sampler.sample_once())
    assert found[("nvml_up", frozenset())] == 1
    assert by_gpu(found, "nvml_gpu_up") == {"0": 1, "1": 1}


class _FieldDevice:
    """Just what a field plan reads: the entries of one sample, and the error policy."""

    def __init__(self, entries: dict[tuple[int, int], tuple[int, float | None]]) -> None:
        self.entries = entries
        self.policy_calls: list[tuple[int, int]] = []

    def field_results(self, requests: Sequence[tuple[int, int]]) -> list[object]:
        return [self.entries.get(request) for request in requests]

    def field(self, field_id: int, scope: int = 0) -> float | None:
        self.policy_calls.append((field_id, scope))
        return None


def test_a_field_plan_reuses_unchanged_lines_renders_changes_and_keeps_errors_visible() -> None:
    state = MetricSpec("t_link_up", "gauge", "Link state.", labels=("link",))
    sent = MetricSpec("t_tx_bytes_total", "counter", "Sent.", labels=("link",))
    plan = FieldPlan(
        [
            FieldSeries(state, (1, 0), ("0",), scale=0),
            FieldSeries(sent, (2, 0), ("0",), scale=1024),
            FieldSeries(state, (1, 1), ("1",), scale=0),
            FieldSeries(sent, (2, 1), ("1",), scale=1024),
        ]
    )
    device = _FieldDevice({(1, 0): (0, 1), (2, 0): (0, 10), (1, 1): (0, 0), (2, 1): (0, 20)})

    def sample(previous: PlanCache) -> tuple[dict[MetricSpec, list[str]], PlanCache]:
        out = SeriesEmitter('gpu="0"', {}, previous)
        out.add_fields(device, plan)  # type: ignore[arg-type]
        return out.lines, out.plans

    first, plans = sample({})
    # Each spec's series together, in link order, as one family each.
    assert first == {
        state: ['t_link_up{gpu="0",link="0"} 1\n', 't_link_up{gpu="0",link="1"} 0\n'],
        sent: [
            't_tx_bytes_total{gpu="0",link="0"} 10240\n',
            't_tx_bytes_total{gpu="0",link="1"} 20480\n',
        ],
    }
    again, plans = sample(plans)
    assert again == first
    assert again[sent][0] is first[sent][0]  # nothing unchanged was rendered again

    device.entries[(2, 1)] = (0, 30)
    changed, plans = sample(plans)
    assert changed[sent] == [first[sent][0], 't_tx_bytes_total{gpu="0",link="1"} 30720\n']

    # A failing entry is left out and goes through the error policy on every sample, even
    # when nothing changed; an absent one (not requested any more) is just left out.
    device.entries[(2, 0)] = (999, None)
    del device.entries[(1, 1)]
    for _ in range(2):
        failing, plans = sample(plans)
        assert failing[sent] == ['t_tx_bytes_total{gpu="0",link="1"} 30720\n']
        assert failing[state] == ['t_link_up{gpu="0",link="0"} 1\n']
    assert device.policy_calls == [(2, 0), (2, 0)]


def test_a_field_plan_renders_the_same_through_the_plain_emitter() -> None:
    spec = MetricSpec("t_errors_total", "counter", "Errors.", labels=("link", "error"))
    plan = FieldPlan([FieldSeries(spec, (7, link), (str(link), "crc")) for link in range(3)])

    class Device:
        def field(self, field_id: int, scope: int = 0) -> float | None:
            return None if scope == 1 else scope * 2

    out = Emitter()
    out.add_fields(Device(), plan)  # type: ignore[arg-type]
    assert out.samples == [(spec, ("0", "crc"), 0), (spec, ("2", "crc"), 4)]
