"""The real NVML backend, through pynvml's real ctypes code, against the stand-in library.

Proves symbol names and versions, struct layouts and error codes, which the simulated backend
cannot: every exported value must equal the stand-in's raw value after unit conversion.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nvml_stub
import pytest
from conftest import ExporterProcess, Scrape, start_exporter

from exporter.metricsdoc import documented
from exporter.nvml import CLOCK_GRAPHICS, CLOCK_MEM, CLOCK_SM, CLOCK_VIDEO

pytestmark = pytest.mark.slow

Labels = dict[str, str]
Expectation = Callable[[nvml_stub.Device, Labels], float | None]

_CLOCKS = {"graphics": CLOCK_GRAPHICS, "sm": CLOCK_SM, "memory": CLOCK_MEM, "video": CLOCK_VIDEO}


def _fan(dev: nvml_stub.Device, labels: Labels) -> float:
    return dev.fan_speeds[int(labels["fan"])] / 100


# What each GPU metric must equal, from the stand-in's raw NVML values.
EXPECTED: dict[str, Expectation] = {
    "nvml_gpu_info": lambda dev, labels: 1.0,
    "nvml_gpu_up": lambda dev, labels: 1.0,
    "nvml_gpu_utilization_ratio": lambda dev, labels: dev.utilization_gpu / 100,
    "nvml_memory_controller_utilization_ratio": lambda dev, labels: dev.utilization_memory / 100,
    "nvml_memory_total_bytes": lambda dev, labels: dev.memory_total,
    "nvml_memory_used_bytes": lambda dev, labels: dev.memory_used,
    "nvml_memory_free_bytes": lambda dev, labels: dev.memory_free,
    "nvml_memory_reserved_bytes": lambda dev, labels: dev.memory_reserved,
    "nvml_temperature_celsius": lambda dev, labels: dev.temperature_gpu,
    "nvml_fan_speed_ratio": _fan,
    "nvml_power_watts": lambda dev, labels: dev.power_usage / 1000,
    "nvml_power_limit_watts": lambda dev, labels: dev.power_limit_enforced / 1000,
    "nvml_energy_joules_total": lambda dev, labels: dev.energy / 1000,
    "nvml_clock_hertz": lambda dev, labels: dev.clocks[(_CLOCKS[labels["clock"]], 0)] * 1e6,
    "nvml_performance_state": lambda dev, labels: dev.performance_state,
}


def by_gpu(scrape: Scrape, name: str) -> dict[str, float]:
    return {dict(labels)["gpu"]: v for labels, v in scrape.values(name).items()}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[nvml_stub.Fleet]:
    with nvml_stub.Fleet(tmp_path) as stub:
        yield stub


def start(fleet: nvml_stub.Fleet, *args: str) -> ExporterProcess:
    return start_exporter(["--sampling.interval", "200ms", *args], env=fleet.env())


@pytest.fixture
def running() -> Iterator[list[ExporterProcess]]:
    processes: list[ExporterProcess] = []
    yield processes
    for process in processes:
        process.stop()


def test_every_gpu_metric_equals_the_stand_in_value_after_conversion(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    fleet.devices[5].fan_speeds = [40, 55]
    fleet.apply()
    proc = start(fleet)
    running.append(proc)
    scrape = proc.get()
    assert scrape.values("nvml_up") == {frozenset(): 1.0}
    assert scrape.values("nvml_gpu_devices") == {frozenset(): 8.0}
    per_device = {name for name, spec in documented().items() if spec.per_device}
    assert set(EXPECTED) == per_device, "a documented GPU metric lacks a conformance check"
    checked = 0
    for name, expect in EXPECTED.items():
        series = scrape.values(name)
        assert series, f"{name} missing from the output"
        for labels_set, value in series.items():
            labels = dict(labels_set)
            dev = fleet.devices[int(labels["gpu"])]
            assert labels["uuid"] == dev.uuid
            assert value == pytest.approx(expect(dev, labels), rel=1e-12), (name, labels)
            checked += 1
    # Every device has every metric, except fans, which only device 5 has (two of them).
    assert checked == 8 * (len(EXPECTED) - 1) + 2 + 3 * 8  # clocks have four domains


def test_gpu_info_labels_come_from_the_stand_in(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    proc = start(fleet)
    running.append(proc)
    info = {dict(k)["gpu"]: dict(k) for k in proc.get().values("nvml_gpu_info")}
    for dev in fleet.devices:
        labels = info[str(dev.index)]
        assert labels == {
            "gpu": str(dev.index),
            "uuid": dev.uuid,
            "name": dev.name,
            "pci_bus_id": dev.pci_bus_id,
            "serial": dev.serial,
            "vbios_version": dev.vbios_version,
            "architecture": "hopper",
            "device": f"nvidia{dev.minor_number}",
            "driver_version": fleet.driver_version,
            "cuda_version": "12.4",
        }


def test_driver_missing_at_start_then_loaded_without_restart(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    fleet.fail_init(nvml_stub.NVML_ERROR_DRIVER_NOT_LOADED)
    proc = start(fleet)
    running.append(proc)
    assert proc.get().values("nvml_up") == {frozenset(): 0.0}
    assert proc.get("/readyz").status == 503
    assert proc.get("/healthz").status == 200
    fleet.clear_init_failure()
    proc.wait_for(lambda: proc.get().values("nvml_up") == {frozenset(): 1.0}, timeout=10)
    assert len(proc.get().values("nvml_gpu_up")) == 8
    assert proc.get("/readyz").status == 200
    assert proc.proc.poll() is None


def test_gpu_lost_mid_run_goes_down_alone_and_comes_back(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    proc = start(fleet)
    running.append(proc)
    assert set(by_gpu(proc.get(), "nvml_gpu_up").values()) == {1.0}
    fleet.set_gpu_lost(3)
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["3"] == 0)
    scrape = proc.get()
    assert by_gpu(scrape, "nvml_gpu_up") == {str(i): (0.0 if i == 3 else 1.0) for i in range(8)}
    for name in EXPECTED:
        if name not in ("nvml_gpu_up", "nvml_gpu_info", "nvml_fan_speed_ratio"):
            assert "3" not in by_gpu(scrape, name), f"stale {name} for the lost GPU"
            assert len(by_gpu(scrape, name)) == 7
    assert "3" in by_gpu(scrape, "nvml_gpu_info")
    fleet.set_gpu_lost(3, lost=False)
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["3"] == 1)
    assert by_gpu(proc.get(), "nvml_power_watts")["3"] == fleet.devices[3].power_usage / 1000


def test_unsupported_function_is_absent_quiet_and_not_called_again(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    fleet.fail("nvmlDeviceGetPowerUsage", nvml_stub.NVML_ERROR_NOT_SUPPORTED, device=2)
    proc = start(fleet)
    running.append(proc)
    power = by_gpu(proc.get(), "nvml_power_watts")
    assert "2" not in power and len(power) == 7
    assert "2" in by_gpu(proc.get(), "nvml_energy_joules_total")
    time.sleep(1.0)  # several intervals
    assert proc.stop() == 0
    calls = fleet.calls()
    samples = calls["nvmlDeviceGetUtilizationRates"] // 8
    assert samples >= 4
    # Seven devices every sample, device 2 exactly once.
    assert calls["nvmlDeviceGetPowerUsage"] == 7 * samples + 1
    assert "power_usage" not in "\n".join(
        line for line in proc.log_lines if "level=warn" in line or "level=error" in line
    )


def test_missing_versioned_symbol_falls_back_to_the_older_call(
    tmp_path: Path, running: list[ExporterProcess]
) -> None:
    with nvml_stub.Fleet(tmp_path, omit=["nvmlDeviceGetTemperatureV"]) as fleet:
        proc = start(fleet)
        running.append(proc)
        temps = by_gpu(proc.get(), "nvml_temperature_celsius")
        assert temps == {str(d.index): float(d.temperature_gpu) for d in fleet.devices}
        assert fleet.calls()["nvmlDeviceGetTemperatureV"] == 0


def test_function_missing_from_the_library_is_absent_without_errors(
    tmp_path: Path, running: list[ExporterProcess]
) -> None:
    omit = ["nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"]
    with nvml_stub.Fleet(tmp_path, omit=omit) as fleet:
        proc = start(fleet)
        running.append(proc)
        scrape = proc.get()
        assert scrape.values("nvml_temperature_celsius") == {}
        assert scrape.values("nvml_collector_success")[frozenset({("collector", "thermal")})] == 1
        assert len(scrape.values("nvml_power_watts")) == 8


def test_a_blocking_call_keeps_scrapes_fast_and_other_gpus_fresh(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    proc = start(fleet)
    running.append(proc)
    baseline = scrape_latencies(proc, 30)
    fleet.block("nvmlDeviceGetPowerUsage", 3000, device=1)
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["1"] == 0)
    before = proc.get().values("nvml_last_sample_timestamp_seconds")
    during = scrape_latencies(proc, 30)
    after = proc.get()
    assert after.values("nvml_last_sample_timestamp_seconds") != before  # still sampling
    assert by_gpu(after, "nvml_gpu_up") == {str(i): (0.0 if i == 1 else 1.0) for i in range(8)}
    assert len(by_gpu(after, "nvml_power_watts")) == 7
    assert statistics.median(during) < max(0.05, 3 * statistics.median(baseline))
    assert max(during) < 0.5
    fleet.block("nvmlDeviceGetPowerUsage", 0, device=1)
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["1"] == 1, timeout=10)
    proc.signal(signal.SIGTERM)
    assert proc.proc.wait(5) == 0


def scrape_latencies(proc: ExporterProcess, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        assert proc.get().status == 200
        out.append(time.perf_counter() - started)
        time.sleep(0.01)
    return out
