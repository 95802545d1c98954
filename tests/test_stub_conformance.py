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

from exporter import nvml
from exporter.collectors import COLLECTORS, clock_events
from exporter.collectors.base import FieldSeries, field_value
from exporter.metricsdoc import documented
from exporter.nvml import CLOCK_GRAPHICS, CLOCK_MEM, CLOCK_SM, CLOCK_VIDEO, LIB_RM_VERSION_MISMATCH

pytestmark = pytest.mark.slow

Labels = dict[str, str]
Expectation = Callable[[nvml_stub.Device, Labels], float | None]

_CLOCKS = {"graphics": CLOCK_GRAPHICS, "sm": CLOCK_SM, "memory": CLOCK_MEM, "video": CLOCK_VIDEO}
_THRESHOLDS = {"shutdown": 0, "slowdown": 1, "memory_max": 2, "gpu_max": 3}
_EVENT_BITS = dict(clock_events.REASONS)
_NVLINK_ERRORS = {
    "crc": nvml.FI_NVLINK_ERROR_DL_CRC,
    "replay": nvml.FI_NVLINK_ERROR_DL_REPLAY,
    "recovery": nvml.FI_NVLINK_ERROR_DL_RECOVERY,
}


def _fan(dev: nvml_stub.Device, labels: Labels) -> float:
    return dev.fan_speeds[int(labels["fan"])] / 100


def _field(field_id: int) -> Expectation:
    return lambda dev, labels: dev.field_value(field_id)


def _link_field(field_id: int, scale: float) -> Expectation:
    return lambda dev, labels: _scaled(dev.field_value(field_id, int(labels["link"])), scale)


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _from_tables() -> dict[str, Expectation]:
    """Metrics whose every series is a plain field row of its collector's table (no alternative
    field, no fallback call): each must equal the stand-in's value of that field, converted as
    the row says. A new field metric is checked here without a line of its own."""
    rows: dict[str, dict[tuple[str, ...], FieldSeries]] = {}
    other: set[str] = set()
    for cls in COLLECTORS.values():
        for row in cls.table:
            if isinstance(row, FieldSeries) and not row.alternatives and row.fallback is None:
                rows.setdefault(row.spec.name, {})[row.labels] = row
            else:
                other.add(row.spec.name)

    def expectation(by_labels: dict[tuple[str, ...], FieldSeries]) -> Expectation:
        def expect(dev: nvml_stub.Device, labels: Labels) -> float | None:
            spec = next(iter(by_labels.values())).spec
            row = by_labels[tuple(labels[name] for name in spec.labels)]
            raw = dev.field_value(*row.request)
            return None if raw is None else field_value(row, raw)

        return expect

    return {name: expectation(by_labels) for name, by_labels in rows.items() if name not in other}


# What each GPU metric must equal, from the stand-in's raw NVML values. Counters fed by sample
# buffers start at 0 and stay there while the stand-in's buffers do not grow. An encoder
# without a session reads 0 without being asked (the stand-in's idle encoders answer 0 anyway).
EXPECTED: dict[str, Expectation] = {
    "nvml_gpu_info": lambda dev, labels: 1.0,
    "nvml_gpu_up": lambda dev, labels: 1.0,
    "nvml_gpu_utilization_ratio": lambda dev, labels: dev.utilization_gpu / 100,
    "nvml_gpu_busy_seconds_total": lambda dev, labels: 0.0,
    "nvml_memory_controller_utilization_ratio": lambda dev, labels: dev.utilization_memory / 100,
    "nvml_memory_controller_busy_seconds_total": lambda dev, labels: 0.0,
    "nvml_encoder_utilization_ratio": lambda dev, labels: dev.encoder_utilization / 100,
    "nvml_encoder_busy_seconds_total": lambda dev, labels: 0.0,
    "nvml_decoder_utilization_ratio": lambda dev, labels: dev.decoder_utilization / 100,
    "nvml_decoder_busy_seconds_total": lambda dev, labels: 0.0,
    "nvml_encoder_sessions": lambda dev, labels: dev.encoder_session_count,
    "nvml_encoder_average_fps": lambda dev, labels: dev.encoder_average_fps,
    "nvml_encoder_average_latency_seconds": lambda dev, labels: dev.encoder_average_latency / 1e6,
    "nvml_memory_total_bytes": lambda dev, labels: dev.memory_total,
    "nvml_memory_used_bytes": lambda dev, labels: dev.memory_used,
    "nvml_memory_free_bytes": lambda dev, labels: dev.memory_free,
    "nvml_memory_reserved_bytes": lambda dev, labels: dev.memory_reserved,
    "nvml_bar1_memory_total_bytes": lambda dev, labels: dev.bar1_total,
    "nvml_bar1_memory_used_bytes": lambda dev, labels: dev.bar1_used,
    "nvml_bar1_memory_free_bytes": lambda dev, labels: dev.bar1_free,
    "nvml_temperature_celsius": lambda dev, labels: dev.temperature_gpu,
    "nvml_temperature_threshold_celsius": lambda dev, labels: dev.temperature_thresholds[
        _THRESHOLDS[labels["threshold"]]
    ],
    "nvml_fan_speed_ratio": _fan,
    "nvml_power_watts": lambda dev, labels: dev.power_usage / 1000,
    "nvml_power_limit_watts": lambda dev, labels: dev.power_limit_enforced / 1000,
    "nvml_power_default_limit_watts": lambda dev, labels: dev.power_limit_default / 1000,
    "nvml_power_min_limit_watts": lambda dev, labels: dev.power_limit_min / 1000,
    "nvml_power_max_limit_watts": lambda dev, labels: dev.power_limit_max / 1000,
    "nvml_energy_joules_total": lambda dev, labels: dev.energy / 1000,
    "nvml_clock_hertz": lambda dev, labels: dev.clocks[(_CLOCKS[labels["clock"]], 0)] * 1e6,
    "nvml_performance_state": lambda dev, labels: dev.performance_state,
    "nvml_clock_event_active": lambda dev, labels: float(
        bool(dev.clocks_event_reasons & _EVENT_BITS[labels["reason"]])
    ),
    "nvml_pcie_tx_bytes_total": _field(nvml.FI_PCIE_COUNT_TX_BYTES),
    "nvml_pcie_rx_bytes_total": _field(nvml.FI_PCIE_COUNT_RX_BYTES),
    "nvml_pcie_tx_bytes_per_second": lambda dev, labels: dev.pcie_tx_throughput * 1024,
    "nvml_pcie_rx_bytes_per_second": lambda dev, labels: dev.pcie_rx_throughput * 1024,
    "nvml_pcie_link_generation": lambda dev, labels: dev.pcie_link_gen_current,
    "nvml_pcie_link_width": lambda dev, labels: dev.pcie_link_width_current,
    "nvml_pcie_link_max_generation": lambda dev, labels: dev.pcie_link_gen_max,
    "nvml_pcie_link_max_width": lambda dev, labels: dev.pcie_link_width_max,
    "nvml_nvlink_up": lambda dev, labels: float(
        bool(dev.field_value(nvml.FI_NVLINK_GET_STATE, int(labels["link"])))
    ),
    "nvml_nvlink_tx_bytes_total": _link_field(nvml.FI_NVLINK_THROUGHPUT_DATA_TX, 1024),
    "nvml_nvlink_rx_bytes_total": _link_field(nvml.FI_NVLINK_THROUGHPUT_DATA_RX, 1024),
    "nvml_nvlink_errors_total": lambda dev, labels: dev.field_value(
        _NVLINK_ERRORS[labels["error"]], int(labels["link"])
    ),
    "nvml_ecc_enabled": lambda dev, labels: dev.ecc_mode_current,
    "nvml_ecc_pending_enabled": lambda dev, labels: dev.ecc_mode_pending,
    "nvml_persistence_mode_enabled": lambda dev, labels: dev.persistence_mode,
    "nvml_compute_mode": lambda dev, labels: dev.compute_mode,
    "nvml_mig_mode_enabled": lambda dev, labels: float(dev.mig_mode),
    "nvml_mig_mode_pending_enabled": lambda dev, labels: float(dev.mig_mode),
    "nvml_processes": lambda dev, labels: float(
        sum(p.kind == labels["type"] for p in dev.processes)
    ),
}
assert not set(EXPECTED) & set(_from_tables()), "a table row's metric is checked from the table"
EXPECTED |= _from_tables()


def by_gpu(scrape: Scrape, name: str) -> dict[str, float]:
    return {dict(labels)["gpu"]: v for labels, v in scrape.values(name).items()}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[nvml_stub.Fleet]:
    with nvml_stub.Fleet(tmp_path) as stub:
        yield stub


def start(fleet: nvml_stub.Fleet, *args: str) -> ExporterProcess:
    return start_exporter(["--sampling.interval", "200ms", *args], env=fleet.env())


def test_every_gpu_metric_equals_the_stand_in_value_after_conversion(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    fleet.devices[5].fan_speeds = [40, 55]
    # An older board: no PCIe byte counters, so the exporter falls back to throughput.
    fleet.devices[6].unsupported_fields |= {
        nvml.FI_PCIE_COUNT_TX_BYTES,
        nvml.FI_PCIE_COUNT_RX_BYTES,
    }
    # A PCIe card: no NVLink, ECC off, retired pages instead of row remapping, a fan.
    fleet.devices[7] = nvml_stub.make_pcie_device(7)
    # An encoding session, so the encoder's value is asked for (an idle encoder's reads 0).
    encoding = fleet.devices[4]
    encoding.encoder_session_count = 1
    encoding.encoder_utilization = 37
    fleet.apply()
    proc = start(fleet)
    running.append(proc)
    scrape = proc.get()
    assert scrape.values("nvml_up") == {frozenset(): 1.0}
    assert scrape.values("nvml_gpu_devices") == {frozenset(): 8.0}
    # MIG, per-process, pod and event series have their own stand-in tests
    # (test_stub_processes.py, test_kubernetes.py, test_faults.py, test_gpm.py); the rest here.
    elsewhere = {"mig", "processes", "kubernetes", "events", "gpm"}
    per_device = {
        spec.name
        for name, cls in COLLECTORS.items()
        if name not in elsewhere
        for spec in cls.metrics
        if spec.per_device
    } | {"nvml_gpu_up"}
    assert set(EXPECTED) == per_device, "a documented GPU metric lacks a conformance check"
    emitted = {name for name, _ in scrape.samples()}
    assert emitted <= set(documented()), f"undocumented: {emitted - set(documented())}"
    seen: dict[str, set[str]] = {}
    for name, expect in EXPECTED.items():
        series = scrape.values(name)
        assert series, f"{name} missing from the output"
        for labels_set, value in series.items():
            labels = dict(labels_set)
            dev = fleet.devices[int(labels["gpu"])]
            assert labels["uuid"] == dev.uuid
            expected = expect(dev, labels)
            assert expected is not None, f"{name} {labels} exported but unsupported by the stub"
            assert value == pytest.approx(expected, rel=1e-12), (name, labels)
            seen.setdefault(name, set()).add(labels["gpu"])
    everyone = {str(i) for i in range(8)}
    assert seen["nvml_fan_speed_ratio"] == {"5", "7"}
    assert seen["nvml_pcie_tx_bytes_per_second"] == {"6"}
    assert seen["nvml_pcie_tx_bytes_total"] == everyone - {"6"}
    assert seen["nvml_nvlink_tx_bytes_total"] == everyone - {"7"}
    assert seen["nvml_ecc_errors_total"] == everyone - {"7"}
    assert seen["nvml_retired_pages_total"] == {"7"}
    assert seen["nvml_remapped_rows_total"] == everyone - {"7"}
    assert seen["nvml_power_watts"] == everyone
    links = {dict(k)["link"] for k in scrape.values("nvml_nvlink_up") if dict(k)["gpu"] == "0"}
    assert len(links) == 18


def test_gpu_lacking_features_shows_no_series_for_them_and_no_errors(
    tmp_path: Path, running: list[ExporterProcess]
) -> None:
    with nvml_stub.Fleet(
        tmp_path, num_devices=2, device_factory=nvml_stub.make_pcie_device
    ) as fleet:
        fleet.devices[1].fan_speeds = []
        fleet.apply()
        proc = start(fleet)
        running.append(proc)
        proc.wait_for(lambda: len(proc.get().values("nvml_gpu_up")) == 2)
        time.sleep(0.5)
        scrape = proc.get()
        for absent in (
            "nvml_nvlink_up",
            "nvml_nvlink_tx_bytes_total",
            "nvml_ecc_errors_total",
            "nvml_remapped_rows_total",
        ):
            assert scrape.values(absent) == {}, absent
        assert {dict(k)["gpu"] for k in scrape.values("nvml_fan_speed_ratio")} == {"0"}
        assert set(scrape.values("nvml_collector_success").values()) == {1.0}
        assert set(scrape.values("nvml_collector_errors_total").values()) == {0.0}
        assert scrape.values("nvml_ecc_enabled") == {
            frozenset({("gpu", str(i)), ("uuid", d.uuid)}): 0.0 for i, d in enumerate(fleet.devices)
        }
    warnings = [
        line
        for line in proc.log_lines
        if ("level=warn" in line or "level=error" in line) and "process IDs" not in line
    ]
    assert warnings == []  # the stand-in's PIDs are not on this host: that one warning is due


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
    before = proc.get()
    assert set(by_gpu(before, "nvml_gpu_up").values()) == {1.0}
    fleet.set_gpu_lost(3)
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["3"] == 0)
    scrape = proc.get()
    assert by_gpu(scrape, "nvml_gpu_up") == {str(i): (0.0 if i == 3 else 1.0) for i in range(8)}
    for name in set(EXPECTED) - {"nvml_gpu_up", "nvml_gpu_info"}:
        had = {labels for labels in before.values(name) if dict(labels)["gpu"] != "3"}
        assert not any(dict(k)["gpu"] == "3" for k in scrape.values(name)), f"stale {name}"
        assert set(scrape.values(name)) == had, f"{name} changed on the healthy GPUs"
    assert "3" in by_gpu(scrape, "nvml_gpu_info")
    fleet.set_gpu_lost(3, lost=False)
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["3"] == 1)
    assert by_gpu(proc.get(), "nvml_power_watts")["3"] == fleet.devices[3].power_usage / 1000


def test_unsupported_function_is_absent_quiet_and_not_called_again(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    fleet.fail("nvmlDeviceGetPerformanceState", nvml_stub.NVML_ERROR_NOT_SUPPORTED, device=2)
    proc = start(fleet)
    running.append(proc)
    pstate = by_gpu(proc.get(), "nvml_performance_state")
    assert "2" not in pstate and len(pstate) == 7
    assert "2" in by_gpu(proc.get(), "nvml_power_watts")
    time.sleep(1.0)  # several intervals
    assert proc.stop() == 0
    calls = fleet.calls()
    samples = calls["nvmlDeviceGetMemoryInfo_v2"] // 8
    assert samples >= 4
    # Seven devices every sample, device 2 exactly once.
    assert calls["nvmlDeviceGetPerformanceState"] == 7 * samples + 1
    assert "performance_state" not in "\n".join(
        line for line in proc.log_lines if "level=warn" in line or "level=error" in line
    )


def test_power_and_its_limit_come_from_the_field_batch_with_call_fallbacks(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    # 1: no 1 s average, so the instantaneous field; 2: no power fields at all (an older
    # driver), so the two calls; 3: neither the fields nor nvmlDeviceGetPowerUsage.
    fleet.devices[1].unsupported_fields |= {nvml.FI_POWER_AVERAGE}
    fleet.devices[2].unsupported_fields |= {
        nvml.FI_POWER_AVERAGE,
        nvml.FI_POWER_INSTANT,
        nvml.FI_POWER_CURRENT_LIMIT,
    }
    fleet.devices[3].unsupported_fields |= {nvml.FI_POWER_AVERAGE, nvml.FI_POWER_INSTANT}
    for dev in fleet.devices:  # a limit below the default, so it is not the default's value
        dev.power_limit_enforced = 650_000 - 1_000 * dev.index
    fleet.apply()
    fleet.fail("nvmlDeviceGetPowerUsage", nvml_stub.NVML_ERROR_NOT_SUPPORTED, device=3)
    proc = start(fleet)
    running.append(proc)
    time.sleep(1.0)  # several intervals
    scrape = proc.get()
    assert proc.stop() == 0
    power = by_gpu(scrape, "nvml_power_watts")
    expected = {str(d.index): d.power_usage / 1000 for d in fleet.devices if d.index != 3}
    expected["1"] = fleet.devices[1].power_instant / 1000
    assert power == expected
    assert fleet.devices[1].power_instant != fleet.devices[1].power_usage
    limits = by_gpu(scrape, "nvml_power_limit_watts")
    assert limits == {str(d.index): d.power_limit_enforced / 1000 for d in fleet.devices}
    calls = fleet.calls()
    samples = calls["nvmlDeviceGetMemoryInfo_v2"] // 8
    assert samples >= 4
    # Device 2 every sample; devices 1 and 3 once, at the first sample, which asked for the
    # average only; device 3's NOT_SUPPORTED is remembered. The others never.
    assert calls["nvmlDeviceGetPowerUsage"] == samples + 2
    assert calls["nvmlDeviceGetEnforcedPowerLimit"] == samples
    # One batch per GPU and sample (and each GPU's NVLink count, read once at its first).
    assert calls["nvmlDeviceGetFieldValues"] == 8 * samples + 8
    warnings = [line for line in proc.log_lines if "level=warn" in line or "level=error" in line]
    assert [line for line in warnings if "process IDs" not in line] == []


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
    fleet.block("nvmlDeviceGetPerformanceState", 3000, device=1)
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["1"] == 0)
    before = proc.get().values("nvml_last_sample_timestamp_seconds")
    during = scrape_latencies(proc, 30)
    after = proc.get()
    assert after.values("nvml_last_sample_timestamp_seconds") != before  # still sampling
    assert by_gpu(after, "nvml_gpu_up") == {str(i): (0.0 if i == 1 else 1.0) for i in range(8)}
    assert len(by_gpu(after, "nvml_power_watts")) == 7
    assert statistics.median(during) < max(0.05, 3 * statistics.median(baseline))
    assert max(during) < 0.5
    fleet.block("nvmlDeviceGetPerformanceState", 0, device=1)
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


def test_driver_replaced_under_the_exporter_reports_nvml_down_then_recovers(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    proc = start(fleet)
    running.append(proc)
    assert proc.get().values("nvml_up") == {frozenset(): 1.0}
    fleet.fail("*", LIB_RM_VERSION_MISMATCH)
    proc.wait_for(lambda: proc.get().values("nvml_up") == {frozenset(): 0.0})
    assert proc.get().values("nvml_gpu_up") == {}
    fleet.clear_fault("*")
    proc.wait_for(lambda: proc.get().values("nvml_up") == {frozenset(): 1.0}, timeout=10)
    assert set(by_gpu(proc.get(), "nvml_gpu_up").values()) == {1.0}
    assert "lib_rm_version_mismatch" in proc.log()


def test_short_bursts_between_samples_show_their_true_average_through_the_counter(
    fleet: nvml_stub.Fleet, running: list[ExporterProcess]
) -> None:
    dev = fleet.devices[0]
    dev.utilization_gpu = 0  # the instantaneous reading sees only the idle gaps
    fleet.apply()
    proc = start(fleet)
    running.append(proc)
    busy = proc.get().values("nvml_gpu_busy_seconds_total")
    key = next(k for k in busy if dict(k)["gpu"] == "0")
    before = busy[key]
    # Three seconds of driver samples at 1/6 s: a 100 % burst, then five idle periods.
    last = max(s.timestamp for s in dev.gpu_utilization_samples)
    period_us = 166_667
    burst = [
        nvml_stub.Sample(last + period_us * (k + 1), 100 if k % 6 == 0 else 0) for k in range(18)
    ]
    dev.gpu_utilization_samples = [*dev.gpu_utilization_samples, *burst]
    fleet.apply()
    proc.wait_for(lambda: proc.get().values("nvml_gpu_busy_seconds_total")[key] > before)
    scrape = proc.get()
    window_seconds = 18 * period_us / 1e6
    average = (scrape.values("nvml_gpu_busy_seconds_total")[key] - before) / window_seconds
    assert average == pytest.approx(1 / 6, abs=0.02)
    # The gauge is the driver's instantaneous value, which saw only the idle gaps.
    assert scrape.values("nvml_gpu_utilization_ratio")[key] == 0


def test_a_session_between_samples_reaches_the_encoder_counter_once(
    tmp_path: Path, running: list[ExporterProcess]
) -> None:
    with nvml_stub.Fleet(tmp_path, num_devices=1) as fleet:
        dev = fleet.devices[0]
        proc = start(fleet, "--no-collector.gpm")
        running.append(proc)
        key = frozenset({("gpu", "0"), ("uuid", dev.uuid)})
        time.sleep(0.5)
        assert proc.get().values("nvml_encoder_sessions")[key] == 0
        assert proc.get().values("nvml_encoder_utilization_ratio")[key] == 0
        before = proc.get().values("nvml_encoder_busy_seconds_total")[key]
        # A session opened and closed between two samples: one second at 60 %.
        last = max(s.timestamp for s in dev.encoder_utilization_samples)
        period_us = 166_667
        dev.encoder_utilization_samples += [
            nvml_stub.Sample(last + period_us * (k + 1), 60) for k in range(6)
        ]
        fleet.apply()
        proc.wait_for(
            lambda: proc.get().values("nvml_encoder_busy_seconds_total")[key] > before,
            timeout=5,  # the buffer is read within 10 samples of 200 ms
        )
        counted = proc.get().values("nvml_encoder_busy_seconds_total")[key] - before
        assert counted == pytest.approx(0.6 * 6 * period_us / 1e6, rel=1e-9)
        time.sleep(2.5)  # more buffer reads: nothing is counted twice
        scrape = proc.get()
        assert scrape.values("nvml_encoder_busy_seconds_total")[key] - before == counted
        assert scrape.values("nvml_encoder_utilization_ratio")[key] == 0
        assert proc.stop() == 0
    calls = fleet.calls()
    samples = calls["nvmlDeviceGetMemoryInfo_v2"]
    assert samples >= 20
    assert calls["nvmlDeviceGetEncoderStats"] == samples
    # No session at either end of any interval: asked for at the first sample only.
    assert calls["nvmlDeviceGetEncoderUtilization"] == 1
    # Every buffer (GPU, memory, encoder, decoder) at the first sample and every tenth after;
    # each buffer's size is asked once.
    assert calls["nvmlDeviceGetSamples"] == 4 * ((samples + 9) // 10) + 4


def test_encoder_with_a_session_is_asked_for_every_sample(
    tmp_path: Path, running: list[ExporterProcess]
) -> None:
    with nvml_stub.Fleet(tmp_path, num_devices=1) as fleet:
        dev = fleet.devices[0]
        dev.encoder_session_count = 2
        fleet.apply()
        proc = start(fleet, "--no-collector.gpm")
        running.append(proc)
        key = frozenset({("gpu", "0"), ("uuid", dev.uuid)})
        time.sleep(0.5)
        dev.encoder_utilization = 45
        fleet.apply()
        proc.wait_for(lambda: proc.get().values("nvml_encoder_utilization_ratio")[key] == 0.45)
        assert proc.get().values("nvml_encoder_sessions")[key] == 2
        assert proc.stop() == 0
    calls = fleet.calls()
    samples = calls["nvmlDeviceGetMemoryInfo_v2"]
    assert samples >= 3
    assert calls["nvmlDeviceGetEncoderUtilization"] == samples
