"""A monitoring daemon's worst day, rehearsed: every fault asserted on scraped output and timing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import nvml_stub
import pytest
from conftest import ExporterProcess, Scrape, http_get, start_exporter

from exporter.collectors import COLLECTORS, Collector, Emitter, MetricSpec
from exporter.collectors.shared import SampleContext
from exporter.config import Config, SimulationConfig, WebConfig
from exporter.nvml import Device
from exporter.sampler import Sampler
from exporter.simulate.driver import SimulatedDriver
from exporter.web import WebServer

pytestmark = pytest.mark.slow


def by_gpu(scrape: Scrape, name: str) -> dict[str, float]:
    return {dict(labels)["gpu"]: v for labels, v in scrape.values(name).items()}


def simulated(
    exporter: Callable[..., ExporterProcess], tmp_path: Path, faults: str, devices: int = 8
) -> ExporterProcess:
    config = tmp_path / "exporter.yaml"
    config.write_text(
        f"sampling: {{interval: 250ms}}\nsimulation:\n  devices: {devices}\n  faults:\n{faults}"
    )
    return exporter("--simulate", str(devices), "--config.file", str(config))


def test_driver_absent_at_start_appears_3s_later(
    exporter: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    proc = simulated(exporter, tmp_path, "    - {kind: init_failure, duration: 3s}\n")
    first = proc.get()
    assert first.values("nvml_up") == {frozenset(): 0.0}
    ready = proc.get("/readyz")
    assert ready.status == 503
    assert ready.body == b"not ready: NVML is not available (driver_not_loaded)\n"
    assert proc.get("/healthz").status == 200  # liveness holds: no restart loop
    proc.wait_for(lambda: proc.get().values("nvml_up") == {frozenset(): 1.0}, timeout=10)
    assert len(proc.get().values("nvml_gpu_up")) == 8
    assert proc.get("/readyz").status == 200
    assert proc.proc.poll() is None


def test_gpu_3_lost_mid_run_then_back_while_the_others_keep_updating(
    exporter: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    proc = simulated(exporter, tmp_path, "    - {kind: lost, device: 3, start: 2s, duration: 3s}\n")
    before = proc.get()
    assert set(by_gpu(before, "nvml_gpu_up").values()) == {1.0}
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["3"] == 0, timeout=10)
    during = proc.get()
    down = {dict(k)["gpu"]: dict(k)["reason"] for k in during.values("nvml_gpu_down_info")}
    assert down == {"3": "gpu_is_lost"}
    assert "3" not in by_gpu(during, "nvml_power_watts")
    stamps_before = by_gpu(before, "nvml_gpu_last_sample_timestamp_seconds")
    stamps_during = by_gpu(during, "nvml_gpu_last_sample_timestamp_seconds")
    for gpu in "0124567":
        assert stamps_during[gpu] > stamps_before[gpu]  # the others kept updating
    frozen = stamps_during["3"]
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up")["3"] == 1, timeout=10)
    after = proc.get()
    assert by_gpu(after, "nvml_gpu_last_sample_timestamp_seconds")["3"] > frozen
    assert after.values("nvml_gpu_down_info") == {}
    assert after.values("nvml_gpu_devices") == {frozenset(): 8.0}


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def latencies(url: str, seconds: float) -> list[float]:
    """Back-to-back scrapes for `seconds`, several sampling intervals."""
    out = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.perf_counter()
        assert http_get(url).status == 200
        out.append(time.perf_counter() - started)
    return out


def test_one_gpu_hanging_10s_slows_no_scrape_and_no_other_gpu(
    exporter: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    proc = simulated(
        exporter,
        tmp_path,
        "    - {kind: slow, device: 1, function: power_usage, delay: 10s, start: 3s, "
        "duration: 1s}\n",
    )
    url = proc.url + "/metrics"
    normal = latencies(url, 1.5)
    proc.wait_for(lambda: by_gpu(proc.get(), "nvml_gpu_up").get("1") == 0, timeout=10)
    hang_started = time.monotonic()
    stamps = by_gpu(proc.get(), "nvml_gpu_last_sample_timestamp_seconds")
    hanging = latencies(url, 2.0)
    assert time.monotonic() - hang_started < 8, "measured after the hang ended"
    assert len(hanging) > 100
    scrape = proc.get()
    down = {dict(k)["gpu"]: dict(k)["reason"] for k in scrape.values("nvml_gpu_down_info")}
    assert down == {"1": "timeout"}
    later = by_gpu(scrape, "nvml_gpu_last_sample_timestamp_seconds")
    assert all(later[g] > stamps[g] for g in "0234567"), (stamps, later)
    assert later["1"] == stamps["1"]
    # A 2 ms floor keeps loopback jitter on a busy 2-core machine from deciding the test.
    assert p99(hanging) <= max(2 * p99(normal), 0.002), (p99(normal), p99(hanging))


@pytest.fixture
def stub_fleet(tmp_path: Path) -> Iterator[nvml_stub.Fleet]:
    with nvml_stub.Fleet(tmp_path) as fleet:
        yield fleet


def test_xid_79_on_gpu_1_counts_exactly_once_and_is_logged_once(
    stub_fleet: nvml_stub.Fleet,
) -> None:
    proc = start_exporter(["--sampling.interval", "200ms"], env=stub_fleet.env())
    try:
        xids = proc.get().values("nvml_xid_errors_total")
        key = next(k for k in xids if dict(k)["gpu"] == "1" and dict(k)["xid"] == "79")
        assert xids[key] == 0  # present before the first one, so increase() sees it
        stub_fleet.queue_xid(1, 79)
        proc.wait_for(lambda: proc.get().values("nvml_xid_errors_total")[key] == 1)
        time.sleep(1.0)  # several samples later, still exactly one
        scrape = proc.get()
        assert scrape.values("nvml_xid_errors_total")[key] == 1
        assert by_gpu(scrape, "nvml_xid_last_code") == {"1": 79.0}
        assert abs(by_gpu(scrape, "nvml_xid_last_timestamp_seconds")["1"] - time.time()) < 30
        others = {dict(k)["gpu"] for k, v in scrape.values("nvml_xid_errors_total").items() if v}
        assert others == {"1"}
        logged = [line for line in proc.log_lines if "XID error" in line]
        assert len(logged) == 1
        assert "xid=79" in logged[0] and "fallen off the bus" in logged[0]
        assert "level=error" in logged[0]
    finally:
        assert proc.stop() == 0


def test_ecc_events_are_counted(stub_fleet: nvml_stub.Fleet) -> None:
    proc = start_exporter(["--sampling.interval", "200ms"], env=stub_fleet.env())
    try:
        stub_fleet.queue_event(2, nvml_stub.EVENT_SINGLE_BIT_ECC)
        stub_fleet.queue_event(2, nvml_stub.EVENT_SINGLE_BIT_ECC)
        proc.wait_for(
            lambda: (
                {
                    (dict(k)["gpu"], dict(k)["event"]): v
                    for k, v in proc.get().values("nvml_events_total").items()
                }
                == {("2", "single_bit_ecc"): 2.0}
            )
        )
    finally:
        proc.stop()


class ExplodingCollector(Collector):
    name = "exploding"
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()

    def collect(self, device: Device, out: Emitter, context: SampleContext) -> None:
        raise RuntimeError("a bug in one collector")


def test_an_exception_in_one_collector_still_serves_everything_else_with_200() -> None:
    registry = MappingProxyType({**COLLECTORS, "exploding": ExplodingCollector})
    config = Config(
        backend="simulated",
        simulation=SimulationConfig(devices=2),
        collectors=MappingProxyType({"exploding": True}),
    )
    sampler = Sampler(config, SimulatedDriver(config.simulation), registry=registry)
    sampler.sample_once()
    time.sleep(0.3)  # utilization comes from the driver's samples between two reads
    sampler.sample_once()
    loop = asyncio.new_event_loop()
    server = WebServer(sampler, WebConfig(listen_address="127.0.0.1:0"), "simulated")
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        host, port = server.addresses[0]
        scrape = http_get(f"http://{host}:{port}/metrics")
        assert scrape.status == 200
        success = {
            dict(k)["collector"]: v for k, v in scrape.values("nvml_collector_success").items()
        }
        assert success.pop("exploding") == 0
        assert set(success.values()) == {1.0}
        for name in (
            "nvml_power_watts",
            "nvml_temperature_celsius",
            "nvml_memory_used_bytes",
            "nvml_gpu_utilization_ratio",
            "nvml_clock_hertz",
        ):
            assert {dict(k)["gpu"] for k in scrape.values(name)} == {"0", "1"}, name
    finally:
        asyncio.run_coroutine_threadsafe(server.close(1), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
