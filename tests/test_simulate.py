"""The simulated fleet: reproducible, physically consistent, and able to fail on demand."""

from __future__ import annotations

import time

import pytest
from fakes import FakeClock

from exporter import nvml
from exporter.config import FaultConfig, SimulationConfig
from exporter.nvml import CLOCK_SM, TEMPERATURE_GPU, NvmlError
from exporter.simulate.driver import SimulatedDriver
from exporter.simulate.models import MODELS
from exporter.simulate.physics import STEP_SECONDS


def driver(
    clock: FakeClock, seed: int = 0, devices: int = 2, model: str = "NVIDIA H200", **kw: object
) -> SimulatedDriver:
    config = SimulationConfig(devices=devices, seed=seed, model=model, **kw)  # type: ignore[arg-type]
    return SimulatedDriver(config, clock=clock)


def reading(d: SimulatedDriver, handle: int) -> tuple[object, ...]:
    return (
        d.uuid(handle),
        d.utilization(handle),
        d.memory(handle),
        d.power_usage(handle),
        d.total_energy(handle),
        d.temperature(handle, TEMPERATURE_GPU),
        d.clock(handle, CLOCK_SM),
    )


def test_same_seed_and_time_give_the_same_fleet() -> None:
    a_clock, b_clock = FakeClock(), FakeClock()
    a, b = driver(a_clock), driver(b_clock)
    a_clock.advance(37.3)
    # Read b at several intermediate times: the state at t must not depend on read history.
    for t in (5.0, 12.2, 37.3):
        b_clock.now = 1000.0 + t
        b.power_usage(0)
    assert reading(a, 0) == reading(b, 0)
    assert reading(a, 1) == reading(b, 1)


def test_different_seeds_and_devices_differ() -> None:
    clock = FakeClock()
    a, b = driver(clock, seed=1), driver(clock, seed=2)
    clock.advance(60)
    assert a.uuid(0) != b.uuid(0) and a.uuid(0) != a.uuid(1)
    assert reading(a, 0) != reading(b, 0)


def test_energy_is_the_integral_of_power() -> None:
    clock = FakeClock()
    d = driver(clock, devices=1)
    clock.advance(10)
    start = d.total_energy(0)
    integral_mj = 0.0
    for _ in range(600):  # one minute, one model step at a time
        clock.advance(STEP_SECONDS)
        integral_mj += d.power_usage(0) * STEP_SECONDS
    assert d.total_energy(0) - start == pytest.approx(integral_mj, rel=0.001)


def test_memory_used_free_and_reserved_add_up_to_total() -> None:
    clock = FakeClock()
    d = driver(clock, devices=3)
    for _ in range(20):
        clock.advance(7)
        for handle in range(3):
            m = d.memory(handle)
            assert m.reserved is not None
            assert m.used + m.free + m.reserved == m.total == MODELS["NVIDIA H200"].memory_bytes
            assert m.used > 0


def test_power_is_capped_at_the_limit_and_the_sm_clock_drops() -> None:
    clock = FakeClock()
    d = driver(clock, devices=1)
    d.power_limit_w[0] = 250.0
    capped = []
    for _ in range(600):
        clock.advance(1)
        watts = d.power_usage(0) / 1000
        assert watts <= 250.0 + 1e-6
        if d.utilization(0).gpu >= 90:
            capped.append(d.clock(0, CLOCK_SM))
    assert capped, "the simulated load should reach a heavy phase within ten minutes"
    assert max(capped) < MODELS["NVIDIA H200"].max_sm_mhz


def test_values_stay_in_physical_ranges_over_an_hour() -> None:
    clock = FakeClock()
    d = driver(clock, devices=2)
    for _ in range(360):
        clock.advance(10)
        for handle in range(2):
            u = d.utilization(handle)
            assert 0 <= u.memory <= u.gpu <= 100
            assert 20 <= d.temperature(handle, TEMPERATURE_GPU) <= 95
            assert 75_000 * 0.9 <= d.power_usage(handle) <= 700_000
            assert d.enforced_power_limit(handle) == 700_000


def test_fanless_model_reports_fans_unsupported_and_fan_model_reports_speed() -> None:
    clock = FakeClock()
    with pytest.raises(NvmlError) as err:
        driver(clock).fan_count(0)
    assert err.value.code == nvml.NOT_SUPPORTED
    l40s = driver(clock, model="NVIDIA L40S")
    clock.advance(30)
    assert l40s.fan_count(0) == 1
    assert 30 <= l40s.fan_speed(0, 0) <= 100


def test_lost_fault_applies_only_to_its_device_and_window() -> None:
    clock = FakeClock()
    d = driver(clock, devices=2, faults=(FaultConfig(kind="lost", device=1, start=10, duration=5),))
    d.power_usage(1)
    clock.advance(11)
    with pytest.raises(NvmlError) as err:
        d.power_usage(1)
    assert err.value.code == nvml.GPU_IS_LOST
    assert d.power_usage(0) > 0
    clock.advance(5)
    assert d.power_usage(1) > 0


def test_unsupported_fault_targets_one_function() -> None:
    d = driver(FakeClock(), faults=(FaultConfig(kind="unsupported", function="total_energy"),))
    with pytest.raises(NvmlError) as err:
        d.total_energy(0)
    assert err.value.code == nvml.NOT_SUPPORTED
    assert d.power_usage(0) > 0


def test_slow_fault_blocks_the_call() -> None:
    d = driver(FakeClock(), faults=(FaultConfig(kind="slow", device=0, delay=0.2),))
    started = time.monotonic()
    d.power_usage(0)
    assert time.monotonic() - started >= 0.2


def test_init_failure_until_the_driver_appears() -> None:
    clock = FakeClock()
    d = driver(clock, faults=(FaultConfig(kind="init_failure", duration=3),))
    with pytest.raises(NvmlError) as err:
        d.init()
    assert err.value.code == nvml.DRIVER_NOT_LOADED
    clock.advance(3)
    d.init()


POWER_FIELDS = [
    (nvml.FI_POWER_AVERAGE, 0),
    (nvml.FI_POWER_INSTANT, 0),
    (nvml.FI_POWER_CURRENT_LIMIT, 0),
]


def test_power_fields_read_what_the_power_calls_read() -> None:
    clock = FakeClock()
    d = driver(clock, devices=2)
    clock.advance(42.7)
    d.power_limit_w[1] = 500.0
    for handle in (0, 1):
        watts = d.power_usage(handle)
        assert d.field_values(handle, POWER_FIELDS) == [
            (nvml.SUCCESS, watts),
            (nvml.SUCCESS, watts),
            (nvml.SUCCESS, d.enforced_power_limit(handle)),
        ]
    assert d.field_values(1, POWER_FIELDS)[2] == (nvml.SUCCESS, 500_000)


def test_faults_on_the_power_calls_apply_to_their_fields() -> None:
    faults = (
        FaultConfig(kind="unsupported", device=1, function="power_usage"),
        FaultConfig(kind="slow", device=0, function="enforced_power_limit", delay=0.2),
    )
    d = driver(FakeClock(), devices=2, faults=faults)
    limit = (nvml.SUCCESS, 700_000)
    unsupported = (nvml.NOT_SUPPORTED, None)
    assert d.field_values(1, POWER_FIELDS) == [unsupported, unsupported, limit]
    started = time.monotonic()
    assert d.field_values(0, [(nvml.FI_MEMORY_TEMP, 0)])[0][0] == nvml.SUCCESS
    assert time.monotonic() - started < 0.2  # no power field asked for, no delay
    assert d.field_values(0, POWER_FIELDS)[2] == limit
    assert time.monotonic() - started >= 0.2
