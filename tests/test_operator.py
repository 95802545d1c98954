"""Pods attributed as under the Prometheus Operator: a real Prometheus scrapes the exporter with
the scrape jobs the Operator generates from the shipped ServiceMonitor and PodMonitor (see
tests/operator_model.py), and per-pod sums must name the workloads, never the exporter's own pod.

A third job is the ServiceMonitor without its last relabeling (the drop of the Operator's
`namespace`, `pod` and `container` target labels): it must show the trap the relabeling
exists for, so that this test is known to be able to see it."""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ExporterProcess, start_exporter
from kubelet_stub import FakeKubelet, container, devices, pod, response, serving_kubelet
from operator_model import (
    EXPORTER_POD,
    kubernetes_sd_job,
    load,
    pod_monitor_job,
    service_monitor_job,
)
from promserver import PromServer, labels, prometheus_server, value

from exporter.config import SimulationConfig
from exporter.simulate.driver import SimulatedDriver

pytestmark = pytest.mark.slow

UUIDS = [SimulatedDriver(SimulationConfig(devices=4)).uuid(i) for i in range(4)]
SERVICE_MONITOR, POD_MONITOR, WITHOUT_THE_DROP = "gpu-node-1", "gpu-node-2", "gpu-node-3"
PLAIN_SD = "gpu-node-4"  # deploy/prometheus/kubernetes-scrape.yml, without the Operator
SCRAPE_FILE = (
    Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "kubernetes-scrape.yml"
)
WORKLOADS = {("inference", "llama-0"), ("inference", "llama-1")}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromServer]:
    tmp = tmp_path_factory.mktemp("operator")
    # Unix socket paths must fit in 108 bytes; pytest's temporary paths can be longer.
    sockets = Path(tempfile.mkdtemp(prefix="podres-", dir="/tmp"))
    try:
        with serving_kubelet(str(sockets / "kubelet.sock")) as kubelet:
            yield from _world(tmp, kubelet)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _world(tmp: Path, kubelet: FakeKubelet) -> Iterator[PromServer]:
    kubelet.reply = response(
        pod("inference", "llama-0", container("server", devices("nvidia.com/gpu", UUIDS[0]))),
        pod("inference", "llama-1", container("server", devices("nvidia.com/gpu", UUIDS[1]))),
        # GPU 2 is time-sliced between two pods; GPU 3 is held by nobody.
        pod("batch", "embed-0", container("worker", devices("nvidia.com/gpu", f"{UUIDS[2]}::0"))),
        pod("batch", "embed-1", container("worker", devices("nvidia.com/gpu", f"{UUIDS[2]}::1"))),
    )
    config = tmp / "exporter.yaml"
    config.write_text(
        "sampling: {interval: 500ms}\n"
        "collectors: {processes: true}\n"
        f"kubernetes: {{enabled: true, socket: {kubelet.socket_path}, interval: 1s, "
        "timeout: 500ms}\n"
    )
    exporter: ExporterProcess = start_exporter(["--simulate", "4", "--config.file", str(config)])
    try:
        monitor, pod_monitor = load("servicemonitor.yaml"), load("alternatives/podmonitor.yaml")
        service, daemonset = load("service.yaml"), load("daemonset.yaml")
        trap = copy.deepcopy(monitor)
        rules = trap["spec"]["endpoints"][0]["relabelings"]
        assert rules[-1] == {"action": "labeldrop", "regex": "namespace|pod|container"}
        del rules[-1]
        trap["metadata"]["name"] = "without-the-drop"
        jobs = [
            service_monitor_job(monitor, service, daemonset, exporter.address, SERVICE_MONITOR),
            pod_monitor_job(pod_monitor, daemonset, exporter.address, POD_MONITOR),
            service_monitor_job(trap, service, daemonset, exporter.address, WITHOUT_THE_DROP),
            kubernetes_sd_job(SCRAPE_FILE, daemonset, exporter.address, PLAIN_SD),
        ]
        for job in jobs:
            # Faster than the shipped 15 s, so that the test waits seconds, not minutes.
            job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
        with prometheus_server([], tmp / "prom", jobs=jobs) as prom:
            prom.wait_for_query(
                "count by (instance) (nvml_gpu_pod_info)", lambda r: len(r) == 4, timeout=60
            )
            prom.wait_for_query(
                "count by (instance) (nvml_process_memory_used_bytes)",
                lambda r: len(r) == 4,
                timeout=60,
            )
            yield prom
    finally:
        exporter.stop()


def rows(result: list[dict[str, Any]], *names: str) -> set[tuple[str, ...]]:
    return {tuple(labels(sample).get(name, "") for name in names) for sample in result}


@pytest.mark.parametrize("node", [SERVICE_MONITOR, POD_MONITOR, PLAIN_SD])
def test_per_pod_memory_names_the_workloads(world: PromServer, node: str) -> None:
    result = world.query(
        f'sum by (namespace, pod) (nvml_process_memory_used_bytes{{instance="{node}"}})'
    )
    # The processes of the shared and the unheld GPU are not guessed into a pod: one row
    # without pod labels, never the exporter's pod.
    assert rows(result, "namespace", "pod") == WORKLOADS | {("", "")}
    assert all(value(sample) > 0 for sample in result)


@pytest.mark.parametrize("node", [SERVICE_MONITOR, POD_MONITOR, PLAIN_SD])
def test_per_pod_utilization_through_the_pod_join_names_the_workloads(
    world: PromServer, node: str
) -> None:
    result = world.query(
        f'sum by (namespace, pod) (nvml_gpu_pod_info{{instance="{node}"}}'
        f' * on (instance, uuid) group_left nvml_gpu_utilization_ratio{{instance="{node}"}})'
    )
    assert rows(result, "namespace", "pod") == WORKLOADS | {
        ("batch", "embed-0"),
        ("batch", "embed-1"),
    }


@pytest.mark.parametrize("node", [SERVICE_MONITOR, POD_MONITOR, PLAIN_SD])
def test_no_series_carries_the_exporters_own_pod_or_a_renamed_label(
    world: PromServer, node: str
) -> None:
    for selector in (
        f'pod="{EXPORTER_POD}"',
        'namespace="nvml-exporter"',
        'container="nvml-exporter"',
        'exported_pod!=""',
        'exported_namespace!=""',
        'exported_container!=""',
    ):
        assert world.query(f'count({{instance="{node}", {selector}}})') == [], selector


@pytest.mark.parametrize("node", [SERVICE_MONITOR, POD_MONITOR, PLAIN_SD])
def test_the_exporter_is_named_by_job_instance_and_node(world: PromServer, node: str) -> None:
    [up] = world.query(f'up{{instance="{node}"}}')
    target = labels(up)
    assert value(up) == 1
    assert target["job"] == "nvml-exporter"
    assert target["node"] == node
    assert target.get("endpoint", "metrics") == "metrics"  # the Operator's jobs set it
    assert not {"pod", "namespace", "container"} & set(target)


def test_without_the_drop_the_operators_labels_take_over(world: PromServer) -> None:
    node = WITHOUT_THE_DROP
    result = world.query(
        f'sum by (namespace, pod) (nvml_process_memory_used_bytes{{instance="{node}"}})'
    )
    assert ("nvml-exporter", EXPORTER_POD) in rows(result, "namespace", "pod")
    renamed = world.query(f'count({{instance="{node}", exported_pod!=""}})')
    assert renamed and value(renamed[0]) > 0
