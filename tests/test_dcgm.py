"""`naming: dcgm`: dcgm-exporter's names, units and labels, so its dashboards keep working."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest
from conftest import ExporterProcess, start_exporter
from fakes import FakeClock
from prometheus_client.parser import text_string_to_metric_families
from promserver import PromServer, find_prometheus, labels, prometheus_server, value

from exporter import dcgm
from exporter.config import Config, SimulationConfig
from exporter.sampler import SELF_METRICS, Sampler
from exporter.simulate import SimulatedDriver
from exporter.snapshot import Format

MIB = 1024 * 1024


def rendered(naming: str) -> str:
    config = dataclasses.replace(
        Config(backend="simulated", naming=naming), simulation=SimulationConfig(devices=2)
    )
    clock = FakeClock()
    sampler = Sampler(config, SimulatedDriver(config.simulation, clock=clock), clock=clock)
    sampler.sample_once()
    clock.advance(30)
    return sampler.sample_once().body(Format.OPENMETRICS, compressed=False).decode()


def values(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser appends `_total` to counters; dcgm-exporter's names have none.
            name = family.name if family.name.startswith("DCGM_") else sample.name
            out.setdefault(name, []).append((dict(sample.labels), sample.value))
    return out


def by_uuid(series: list[tuple[dict[str, str], float]], key: str) -> dict[str, float]:
    return {labels_[key]: v for labels_, v in series}


def test_dcgm_mode_converts_units_and_uses_dcgm_labels() -> None:
    ours, theirs = values(rendered("nvml")), values(rendered("dcgm"))
    fb_used = by_uuid(theirs["DCGM_FI_DEV_FB_USED"], "UUID")
    for uuid, used_bytes in by_uuid(ours["nvml_memory_used_bytes"], "uuid").items():
        assert fb_used[uuid] == pytest.approx(used_bytes / MIB)
    sm_ours = {lab["uuid"]: v for lab, v in ours["nvml_clock_hertz"] if lab["clock"] == "sm"}
    for uuid, mhz in by_uuid(theirs["DCGM_FI_DEV_SM_CLOCK"], "UUID").items():
        assert mhz == pytest.approx(sm_ours[uuid] / 1e6)
    energy = by_uuid(theirs["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"], "UUID")
    for uuid, joules in by_uuid(ours["nvml_energy_joules_total"], "uuid").items():
        assert energy[uuid] == pytest.approx(joules * 1000)
    util = by_uuid(theirs["DCGM_FI_DEV_GPU_UTIL"], "UUID")
    for uuid, ratio in by_uuid(ours["nvml_gpu_utilization_ratio"], "uuid").items():
        assert util[uuid] == pytest.approx(ratio * 100)
    for name, series in theirs.items():
        if name.startswith("DCGM_"):
            for labels_, _ in series:
                assert tuple(labels_) == dcgm.IDENTITY_LABELS, name
                assert labels_["modelName"] == "NVIDIA H200"
                assert labels_["device"] in ("nvidia0", "nvidia1")
    # Besides DCGM fields, only the exporter's own health metrics remain.
    health = {spec.name for spec in SELF_METRICS}
    assert {name for name in theirs if name.startswith("nvml_")} <= health


def test_dcgm_mode_sums_nvlink_bandwidth_over_links() -> None:
    ours, theirs = values(rendered("nvml")), values(rendered("dcgm"))
    per_link: dict[str, float] = {}
    for lab, v in ours["nvml_nvlink_tx_bytes_total"]:
        per_link[lab["uuid"]] = per_link.get(lab["uuid"], 0.0) + v / 1024
    total = by_uuid(theirs["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"], "UUID")
    assert total == pytest.approx(per_link)


def test_dcgm_counters_keep_their_names_without_total() -> None:
    text = rendered("dcgm")
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in text
    assert "\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{" in text
    assert "_CONSUMPTION_total" not in text


@pytest.mark.slow
def test_dcgm_mode_serves_text_even_when_openmetrics_is_asked_for(
    exporter: Callable[..., ExporterProcess],
) -> None:
    proc = exporter("--simulate", "2", "--naming", "dcgm")
    scrape = proc.get(headers={"Accept": "application/openmetrics-text;version=1.0.0"})
    assert scrape.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "DCGM_FI_DEV_GPU_TEMP{" in scrape.text
    promtool = shutil.which("promtool")
    assert promtool
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape.text,
        capture_output=True,
        text=True,
        check=False,
    )
    # promtool's style lints fire on dcgm-exporter's own names (counters without `_total`,
    # camelCase labels, "COUNTER" in a name), exactly as on dcgm-exporter; nothing else may.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line]
    style = ('should have "_total" suffix', "'snake_case'", "should not include type")
    assert problems
    for problem in problems:
        assert problem.startswith("DCGM_") and any(s in problem for s in style), problem


# The panels of dcgm-exporter's well-known Grafana dashboard (grafana.com id 12239), in its
# style: templated by Hostname and gpu. Its utilization panels use DCGM profiling fields, which
# come from GPM here; older revisions used DCGM_FI_DEV_GPU_UTIL, checked too.
DASHBOARD_QUERIES = {
    "temperature": 'max(DCGM_FI_DEV_GPU_TEMP{Hostname=~"$Hostname", gpu=~"$gpu"}) '
    "by (Hostname, gpu, UUID)",
    "average temperature": 'avg(DCGM_FI_DEV_GPU_TEMP{Hostname=~"$Hostname", gpu=~"$gpu"})',
    "power": 'max(DCGM_FI_DEV_POWER_USAGE{Hostname=~"$Hostname", gpu=~"$gpu"}) '
    "by (Hostname, gpu, UUID)",
    "total power": 'sum(max(DCGM_FI_DEV_POWER_USAGE{Hostname=~"$Hostname", gpu=~"$gpu"}) by (gpu))',
    "SM clock": 'max(DCGM_FI_DEV_SM_CLOCK{Hostname=~"$Hostname", gpu=~"$gpu"} * 1000000) '
    "by (Hostname, UUID, gpu)",
    "GPU utilization": 'max(DCGM_FI_PROF_GR_ENGINE_ACTIVE{Hostname=~"$Hostname", gpu=~"$gpu"}) '
    "by (Hostname, gpu, GPU_I_ID, GPU_I_PROFILE)",
    "tensor core utilization": 'max(DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{Hostname=~"$Hostname", '
    'gpu=~"$gpu"}) by (Hostname, gpu, GPU_I_ID, GPU_I_PROFILE)',
    "GPU utilization (older)": 'max(DCGM_FI_DEV_GPU_UTIL{Hostname=~"$Hostname", gpu=~"$gpu"}) '
    "by (Hostname, gpu)",
    "framebuffer used": 'max(DCGM_FI_DEV_FB_USED{Hostname=~"$Hostname", gpu=~"$gpu"}) '
    "by (Hostname, gpu)",
    "energy": 'sum(rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{Hostname=~"$Hostname", '
    'gpu=~"$gpu"}[5s])) by (Hostname, gpu) / 1000',
}


@pytest.fixture(scope="module")
def dcgm_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromServer]:
    assert find_prometheus(), (
        "Prometheus is required: apt-get install prometheus (scripts/test installs it)"
    )
    proc = start_exporter(["--simulate", "--naming", "dcgm", "--sampling.interval", "500ms"])
    try:
        with prometheus_server([proc.address], tmp_path_factory.mktemp("prom")) as prom:
            prom.wait_for_query("count(DCGM_FI_DEV_GPU_TEMP) == 8", lambda r: len(r) == 1)
            yield prom
    finally:
        proc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("panel", list(DASHBOARD_QUERIES))
def test_dcgm_dashboard_queries_return_data(dcgm_prometheus: PromServer, panel: str) -> None:
    host = dcgm_prometheus.api("label/Hostname/values", {"match[]": "DCGM_FI_DEV_FB_FREE"})
    assert len(host) == 1  # the dashboard's $Hostname variable
    gpus = dcgm_prometheus.api("label/gpu/values", {"match[]": "DCGM_FI_DEV_FB_FREE"})
    assert sorted(gpus, key=int) == [str(i) for i in range(8)]  # its $gpu variable
    expr = DASHBOARD_QUERIES[panel].replace("$Hostname", host[0]).replace("$gpu", ".*")
    result = dcgm_prometheus.wait_for_query(expr, lambda r: len(r) > 0, timeout=20)
    expected_series = 1 if panel in ("average temperature", "total power") else 8
    assert len(result) == expected_series
    assert all(value(s) >= 0 for s in result)
    if expected_series == 8:
        assert sorted((labels(s)["gpu"] for s in result), key=int) == [str(i) for i in range(8)]
