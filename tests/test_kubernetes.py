"""Pod attribution end to end: the exporter against a real gRPC kubelet stand-in."""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ExporterProcess
from kubelet_stub import FakeKubelet, container, devices, pod, response

from exporter.config import SimulationConfig
from exporter.simulate.driver import SimulatedDriver

pytestmark = pytest.mark.slow

UUIDS = [SimulatedDriver(SimulationConfig(devices=2)).uuid(i) for i in range(2)]


def start(
    exporter: Callable[..., ExporterProcess], tmp_path: Path, socket_path: str
) -> ExporterProcess:
    config = tmp_path / "exporter.yaml"
    config.write_text(
        "sampling: {interval: 200ms}\n"
        "collectors: {processes: true}\n"
        f"kubernetes: {{enabled: true, socket: {socket_path}, interval: 1s, timeout: 300ms}}\n"
    )
    return exporter("--simulate", "2", "--config.file", str(config))


def test_pods_holding_gpus_are_exported_as_join_series_and_on_processes(
    exporter: Callable[..., ExporterProcess], tmp_path: Path, kubelet: FakeKubelet
) -> None:
    kubelet.reply = response(
        pod("inference", "llama-0", container("server", devices("nvidia.com/gpu", UUIDS[0]))),
        pod("batch", "embed-0", container("worker", devices("nvidia.com/gpu", f"{UUIDS[1]}::0"))),
        pod("batch", "embed-1", container("worker", devices("nvidia.com/gpu", f"{UUIDS[1]}::1"))),
        pod("other", "nic", container("c", devices("example.com/nic", "eth1"))),
    )
    proc = start(exporter, tmp_path, kubelet.socket_path)
    proc.wait_for(
        lambda: proc.get().values("nvml_kubernetes_pod_resources_up") == {frozenset(): 1.0}
    )
    proc.wait_for(lambda: len(proc.get().values("nvml_gpu_pod_info")) == 3)
    scrape = proc.get()
    rows = {
        (d["uuid"], d["namespace"], d["pod"], d["container"], d["mig_uuid"])
        for d in (dict(k) for k in scrape.values("nvml_gpu_pod_info"))
    }
    assert rows == {
        (UUIDS[0], "inference", "llama-0", "server", ""),
        (UUIDS[1], "batch", "embed-0", "worker", ""),
        (UUIDS[1], "batch", "embed-1", "worker", ""),
    }
    processes = [dict(k) for k in scrape.values("nvml_process_memory_used_bytes")]
    on_gpu0 = [p for p in processes if p["gpu"] == "0"]
    assert on_gpu0 and all(
        (p["namespace"], p["pod"], p["container"]) == ("inference", "llama-0", "server")
        for p in on_gpu0
    )
    # A shared (time-sliced) GPU's processes are not guessed into one of its pods.
    assert all(p["pod"] == "" for p in processes if p["gpu"] == "1")
    success = scrape.values("nvml_kubernetes_pod_resources_last_success_timestamp_seconds")
    assert abs(next(iter(success.values())) - time.time()) < 30


def scrape_latencies(proc: ExporterProcess, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        assert proc.get().status == 200
        out.append(time.perf_counter() - started)
    return out


def test_a_slow_kubelet_never_slows_a_scrape(
    exporter: Callable[..., ExporterProcess], tmp_path: Path, kubelet: FakeKubelet
) -> None:
    kubelet.reply = response(
        pod("inference", "llama-0", container("server", devices("nvidia.com/gpu", UUIDS[0])))
    )
    kubelet.slow = True
    proc = start(exporter, tmp_path, kubelet.socket_path)
    latencies = scrape_latencies(proc, 40)
    proc.wait_for(
        lambda: proc.get().values("nvml_kubernetes_pod_resources_up") == {frozenset(): 0.0}
    )
    scrape = proc.get()
    assert scrape.values("nvml_gpu_pod_info") == {}
    assert len(scrape.values("nvml_gpu_up")) == 2 and len(scrape.values("nvml_power_watts")) == 2
    assert statistics.median(latencies) < 0.05 and max(latencies) < 0.3
    kubelet.release.set()


def test_a_missing_socket_degrades_to_no_pod_labels(
    exporter: Callable[..., ExporterProcess], tmp_path: Path, sockdir: Path
) -> None:
    proc = start(exporter, tmp_path, str(sockdir / "absent.sock"))
    proc.wait_for(
        lambda: (
            proc.get().values("nvml_kubernetes_pod_resources_errors_total")
            not in ({}, {frozenset(): 0.0})
        )
    )
    scrape = proc.get()
    assert scrape.status == 200
    assert scrape.values("nvml_gpu_pod_info") == {}
    errors = scrape.values("nvml_kubernetes_pod_resources_errors_total")
    assert next(iter(errors.values())) >= 1
    assert len(scrape.values("nvml_gpu_up")) == 2
    assert "socket missing" in proc.log()


def test_sighup_applies_kubernetes_settings_instead_of_ignoring_them(
    exporter: Callable[..., ExporterProcess], tmp_path: Path, kubelet: FakeKubelet
) -> None:
    kubelet.reply = response(
        pod("inference", "llama-0", container("server", devices("nvidia.com/gpu", UUIDS[0])))
    )
    config = tmp_path / "exporter.yaml"
    config.write_text("sampling: {interval: 200ms}\n")
    proc = exporter("--simulate", "2", "--config.file", str(config))
    proc.wait_for(lambda: proc.get("/readyz").status == 200)
    assert proc.get().values("nvml_gpu_pod_info") == {}

    # Turned on by a reload: the watcher starts and pods appear.
    config.write_text(
        "sampling: {interval: 200ms}\n"
        f"kubernetes: {{enabled: true, socket: {kubelet.socket_path}, interval: 1s, "
        "timeout: 300ms}\n"
    )
    proc.signal(signal.SIGHUP)
    proc.wait_for(lambda: len(proc.get().values("nvml_gpu_pod_info")) == 1)
    assert proc.get().values("nvml_exporter_config_last_reload_successful") == {frozenset(): 1.0}
    assert "rebuilt=kubernetes" in proc.log()

    # A new socket path is followed: one that does not answer turns the source down.
    config.write_text(
        "sampling: {interval: 200ms}\n"
        f"kubernetes: {{enabled: true, socket: {tmp_path / 'absent.sock'}, interval: 1s, "
        "timeout: 300ms}\n"
    )
    proc.signal(signal.SIGHUP)
    proc.wait_for(
        lambda: proc.get().values("nvml_kubernetes_pod_resources_up") == {frozenset(): 0.0}
    )

    # Turned off again: the watcher's series go.
    config.write_text("sampling: {interval: 200ms}\n")
    proc.signal(signal.SIGHUP)
    proc.wait_for(lambda: proc.get().values("nvml_kubernetes_pod_resources_up") == {})
    assert proc.get().values("nvml_gpu_pod_info") == {}
