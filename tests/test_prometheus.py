"""A real Prometheus server scrapes the exporter on the simulated fleet over loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import ExporterProcess, start_exporter
from promserver import PromServer, Sample, find_prometheus, labels, prometheus_server, value

pytestmark = pytest.mark.slow

GPUS = 8
OPENMETRICS = "application/openmetrics-text;version=1.0.0"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ExporterProcess, PromServer]]:
    """The exporter on 8 simulated GPUs, and Prometheus once it has scraped it successfully.

    Shared by the module: Prometheus hands new targets to its scrapers only every 5 s, so the
    first scrape costs ~5 s however short the interval; after that the tests only query.
    """
    assert find_prometheus(), (
        "Prometheus is required: apt-get install prometheus (scripts/test installs it)"
    )
    # Energy every sample: a simulated GPU's counter starts at 0 with the exporter, and the
    # rate checks below should not wait for the default 10 s cadence.
    config = tmp_path_factory.mktemp("exporter") / "exporter.yaml"
    config.write_text("sampling: {slow_fields_interval: 0s}\n")
    proc = start_exporter(["--simulate", "--config.file", str(config)])
    try:
        with prometheus_server([proc.address], tmp_path_factory.mktemp("prom")) as prom:
            prom.wait_for_query('up{job="nvml"} == 1', lambda r: len(r) == 1)
            yield proc, prom
    finally:
        proc.stop()


def by_uuid(result: list[Sample]) -> dict[str, float]:
    return {labels(s)["uuid"]: value(s) for s in result}


def single(result: list[Sample]) -> float:
    assert len(result) == 1, result
    return value(result[0])


def test_prometheus_scrapes_the_simulated_fleet(
    fleet: tuple[ExporterProcess, PromServer],
) -> None:
    proc, prom = fleet
    with prom.log_on_failure():
        [target] = prom.targets()
        assert target["health"] == "up" and target["lastError"] == ""
        assert target["scrapeUrl"] == f"http://{proc.address}/metrics"
        up = prom.query('up{job="nvml"}')
        assert [labels(s)["instance"] for s in up] == [proc.address]
        assert single(up) == 1

        utilization = prom.query("nvml_gpu_utilization_ratio")
        assert len(utilization) == GPUS
        assert {labels(s)["gpu"] for s in utilization} == {str(i) for i in range(GPUS)}
        exporter_uuids = {dict(k)["uuid"] for k in proc.get().values("nvml_gpu_up")}
        assert set(by_uuid(utilization)) == exporter_uuids
        assert all(0 <= value(s) <= 1 for s in utilization)
        assert all(labels(s)["job"] == "nvml" for s in utilization)

        assert single(prom.query("count(nvml_gpu_up == 1)")) == GPUS
        assert single(prom.query("nvml_up")) == 1
        assert single(prom.query("nvml_gpu_devices")) == GPUS


def test_prometheus_negotiates_openmetrics(
    fleet: tuple[ExporterProcess, PromServer],
) -> None:
    proc, prom = fleet
    with prom.log_on_failure():
        samples = single(prom.query('scrape_samples_scraped{job="nvml"}'))
        direct = proc.get(headers={"Accept": OPENMETRICS}).text
        assert samples > 0
        assert samples == sum(1 for line in direct.splitlines() if not line.startswith("#"))

        # Metadata is keyed by the family name in `# TYPE`: OpenMetrics names a counter without
        # `_total` and has an `info` type; the classic text format has neither.
        assert prom.metadata("nvml_energy_joules")["nvml_energy_joules"][0]["type"] == "counter"
        assert prom.metadata("nvml_gpu")["nvml_gpu"][0]["type"] == "info"
        assert prom.metadata("nvml_energy_joules_total") == {}
        assert prom.metadata("nvml_gpu_info") == {}

        # The counter is stored under its sample name and rates work once two scrapes are in.
        energy = prom.query("nvml_energy_joules_total")
        assert len(energy) == GPUS and all(value(s) > 0 for s in energy)
        rates = prom.wait_for_query(
            "rate(nvml_energy_joules_total[5s])",
            lambda r: len(r) == GPUS and all(value(s) > 0 for s in r),
        )
        # Joules per second is watts: positive, and within the 700 W limit give or take the
        # aliasing of a 1 s sampler against a 1 s scrape.
        assert all(0 < value(s) < 2 * 700 for s in rates), rates


def test_power_joined_with_gpu_info_gets_the_name(
    fleet: tuple[ExporterProcess, PromServer],
) -> None:
    _, prom = fleet
    with prom.log_on_failure():
        # Evaluate both queries at the same, settled instant: a few scrapes in, 1.5 s ago.
        prom.wait_for_query(
            'count_over_time(up{job="nvml"}[10s]) >= 3', lambda r: len(r) == 1, timeout=20
        )
        at = time.time() - 1.5
        joined = prom.query("nvml_power_watts * on(uuid) group_left(name) nvml_gpu_info", at)
        power = by_uuid(prom.query("nvml_power_watts", at))

        assert len(joined) == GPUS and len(power) == GPUS
        assert {labels(s)["name"] for s in joined} == {"NVIDIA H200"}
        assert all("__name__" not in labels(s) for s in joined)
        assert by_uuid(joined) == power
        assert all(50 <= watts <= 700 for watts in power.values())
