"""`naming: dcgm`: dcgm-exporter's names, units and labels, so its dashboards keep working."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from conftest import ExporterProcess, start_exporter
from fakes import FakeClock
from kubelet_stub import FakeKubelet, container, devices, pod, response
from prometheus_client.parser import text_string_to_metric_families
from promserver import PromServer, find_prometheus, labels, prometheus_server, value

from exporter.attribution import KubeletPods
from exporter.cli import KNOWN_NAMES
from exporter.collectors import Services
from exporter.collectors.events import xid_labels
from exporter.config import (
    Config,
    FaultConfig,
    Overrides,
    SimulationConfig,
    apply_overrides,
    load_config,
)
from exporter.exposition import FamilyBuilder, dcgm
from exporter.podresources import PodResourcesWatcher
from exporter.sampler import Sampler
from exporter.selfmetrics import SELF_METRICS
from exporter.simulate.driver import SimulatedDriver
from exporter.snapshot import Format, render_text
from exporter.validation import ConfigError
from exporter.workload import Pod

MIB = 1024 * 1024


def rendered(naming: str) -> str:
    return two_samples(naming)[1]


def two_samples(
    naming: str,
    services: Services | None = None,
    interval: float = 30,
    **simulation: object,
) -> tuple[str, str]:
    """The body after the first sample, and after a second one `interval` seconds later."""
    sim = SimulationConfig(**{"devices": 2, **simulation})  # type: ignore[arg-type]
    config = dataclasses.replace(Config(backend="simulated", naming=naming), simulation=sim)
    clock = FakeClock()
    sampler = Sampler(
        config, SimulatedDriver(config.simulation, clock=clock), clock=clock, services=services
    )
    first = sampler.sample_once().body(Format.TEXT, compressed=False).decode()
    clock.advance(interval)
    return first, sampler.sample_once().body(Format.TEXT, compressed=False).decode()


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
                extra = ("err_code", "err_msg") if name == "DCGM_FI_DEV_XID_ERRORS" else ()
                assert tuple(labels_) == dcgm.IDENTITY_LABELS + extra, name
                assert labels_["modelName"] == "NVIDIA H200"
                assert labels_["device"] in ("nvidia0", "nvidia1")
    # Besides DCGM fields, only the exporter's own health metrics remain.
    health = {spec.name for spec in SELF_METRICS}
    assert {name for name in theirs if name.startswith("nvml_")} <= health


def test_nvlink_bandwidth_total_is_the_rate_of_received_plus_transmitted_as_dcgm_has_it() -> None:
    # DCGM adds NVML's rx and tx KiB counters of all links and publishes their rate / 1000.
    before, after = (values(text) for text in two_samples("nvml", interval=20))
    both: dict[str, float] = {}
    for sign, body in ((-1, before), (1, after)):
        for name in ("nvml_nvlink_rx_bytes_total", "nvml_nvlink_tx_bytes_total"):
            for lab, v in body[name]:
                both[lab["uuid"]] = both.get(lab["uuid"], 0.0) + sign * v
    expected = {uuid: delta / 1024 / 20 / 1000 for uuid, delta in both.items()}
    first, second = (values(text) for text in two_samples("dcgm", interval=20))
    assert "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL" not in first  # no rate from one reading
    total = by_uuid(second["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"], "UUID")
    assert total == pytest.approx(expected)
    assert all(v > 0 for v in total.values())
    # dcgm-exporter declares it a counter, whatever DCGM puts in it.
    assert "# TYPE DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL counter\n" in rendered("dcgm")


def test_dcgm_counters_keep_their_names_without_total() -> None:
    text = rendered("dcgm")
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in text
    assert "\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{" in text
    assert "_CONSUMPTION_total" not in text


# --- Kubernetes mode: dcgm-exporter's pod, namespace, container on a GPU's series ---------


class FixedPods:
    """A kubelet whose allocations never change."""

    def __init__(self, pods: Mapping[str, tuple[Pod, ...]]) -> None:
        self._pods = pods

    def pods(self) -> Mapping[str, tuple[Pod, ...]]:
        return self._pods

    def status(self) -> tuple[bool, float | None, int]:
        return True, 1_764_000_000.0, 0


POD_LABELS = ("container", "namespace", "pod")


def dcgm_series(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (name, labels_, v)
        for name, series in values(text).items()
        if name.startswith("DCGM_")
        for labels_, v in series
    ]


def holder(labels_: dict[str, str]) -> tuple[str, ...] | None:
    """(container, namespace, pod), or None where the series names no pod at all."""
    present = [k for k in POD_LABELS if k in labels_]
    if not present:
        return None
    assert present == list(POD_LABELS), labels_
    return tuple(labels_[k] for k in POD_LABELS)


def test_every_series_of_a_gpu_a_pod_holds_carries_its_pod_namespace_and_container() -> None:
    driver = SimulatedDriver(SimulationConfig(devices=3))
    whole, shared = driver.uuid(0), driver.uuid(1)
    pods = FixedPods(
        {
            whole: (Pod("inference", "llama-0", "server"),),
            # Time-sliced: the kubelet lists both; dcgm-exporter keeps the last it lists.
            shared: (Pod("batch", "embed-0", "worker"), Pod("batch", "embed-1", "worker")),
        }
    )
    _, text = two_samples("dcgm", Services(pods=pods), devices=3)
    seen: dict[str, set[tuple[str, ...] | None]] = {}
    for name, labels_, _ in dcgm_series(text):
        seen.setdefault(labels_["gpu"], set()).add(holder(labels_))
        assert "pod_uid" not in labels_ and "vgpu" not in labels_, name
    assert seen == {
        "0": {("server", "inference", "llama-0")},
        # One series per field even on a shared GPU, so sums over GPUs stay right.
        "1": {("worker", "batch", "embed-1")},
        "2": {None},  # no pod holds it: no pod labels, not empty ones
    }
    assert 'pod=""' not in text and 'namespace=""' not in text and 'container=""' not in text
    fields = {name for name, labels_, _ in dcgm_series(text) if labels_["gpu"] == "0"}
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_XID_ERRORS"} <= fields
    counts: dict[tuple[str, str], int] = {}
    for name, labels_, _ in dcgm_series(text):
        counts[(name, labels_["gpu"])] = counts.get((name, labels_["gpu"]), 0) + 1
    assert set(counts.values()) == {1}
    check_with_promtool(text)


def test_a_mig_instance_a_pod_holds_labels_its_own_series_not_the_whole_gpus() -> None:
    driver = SimulatedDriver(SimulationConfig(devices=2, mig_devices=1))
    instances = driver.mig_instances(0)
    held = instances[1]
    pods = FixedPods({held.uuid: (Pod("ml", "tiny-0", "model"),)})
    _, text = two_samples("dcgm", Services(pods=pods), mig_devices=1)
    labelled = [(n, lab) for n, lab, _ in dcgm_series(text) if holder(lab) is not None]
    assert labelled, "no series carries the MIG device's pod"
    for name, labels_ in labelled:
        assert holder(labels_) == ("model", "ml", "tiny-0"), name
        assert (labels_["gpu"], labels_["GPU_I_ID"]) == ("0", str(held.gpu_instance)), name
        assert labels_["GPU_I_PROFILE"] == held.profile
    instance_series = [lab for _, lab, _ in dcgm_series(text) if "GPU_I_ID" in lab]
    assert {lab["GPU_I_ID"] for lab in instance_series} == {str(m.gpu_instance) for m in instances}
    check_with_promtool(text)


def test_pods_from_the_kubelet_stand_in_label_dcgm_series(kubelet: FakeKubelet) -> None:
    driver = SimulatedDriver(SimulationConfig(devices=2))
    kubelet.reply = response(
        pod("inference", "llama-0", container("server", devices("nvidia.com/gpu", driver.uuid(0)))),
    )
    watcher = PodResourcesWatcher(kubelet.socket_path, interval=60, timeout=2)
    watcher.refresh_once()
    assert watcher.up
    _, text = two_samples("dcgm", Services(pods=KubeletPods(watcher)))
    util = {lab["gpu"]: holder(lab) for lab, _ in values(text)["DCGM_FI_DEV_GPU_UTIL"]}
    assert util == {"0": ("server", "inference", "llama-0"), "1": None}


@pytest.mark.slow
def test_the_exporter_in_dcgm_mode_labels_series_with_the_kubelets_pods(
    exporter: Callable[..., ExporterProcess], tmp_path: Path, kubelet: FakeKubelet
) -> None:
    driver = SimulatedDriver(SimulationConfig(devices=2))
    kubelet.reply = response(
        pod("inference", "llama-0", container("server", devices("nvidia.com/gpu", driver.uuid(0)))),
    )
    config = tmp_path / "exporter.yaml"
    config.write_text(
        "naming: dcgm\n"
        "sampling: {interval: 200ms}\n"
        f"kubernetes: {{enabled: true, socket: {kubelet.socket_path}, "
        "interval: 1s, timeout: 500ms}\n"
    )
    proc = exporter("--simulate", "2", "--config.file", str(config))

    def util() -> dict[str, tuple[str, ...] | None]:
        found = values(proc.get().text).get("DCGM_FI_DEV_GPU_UTIL", [])
        return {lab["gpu"]: holder(lab) for lab, _ in found}

    proc.wait_for(lambda: util() == {"0": ("server", "inference", "llama-0"), "1": None})
    xid = values(proc.get().text)["DCGM_FI_DEV_XID_ERRORS"]
    assert sorted(lab["gpu"] for lab, _ in xid) == ["0", "1"]
    for labels_, v in xid:
        assert v == 0 and (labels_["err_code"], labels_["err_msg"]) == ("0", "No Error")


# --- DCGM_FI_DEV_XID_ERRORS ------------------------------------------------------------------


def xid_series(sampler: Sampler) -> dict[str, tuple[dict[str, str], float]]:
    body = sampler.sample_once().body(Format.TEXT, compressed=False).decode()
    return {lab["gpu"]: (lab, v) for lab, v in values(body).get("DCGM_FI_DEV_XID_ERRORS", [])}


def test_xid_errors_is_0_with_no_error_from_the_first_sample_then_the_last_xid() -> None:
    sim = SimulationConfig(devices=2, faults=(FaultConfig(kind="xid", device=1, xid=79, start=5),))
    config = dataclasses.replace(Config(backend="simulated", naming="dcgm"), simulation=sim)
    clock = FakeClock()
    sampler = Sampler(config, SimulatedDriver(sim, clock=clock), clock=clock)
    first = xid_series(sampler)
    assert set(first) == {"0", "1"}
    for labels_, v in first.values():
        assert v == 0
        assert (labels_["err_code"], labels_["err_msg"]) == ("0", "No Error")
    clock.advance(10)
    deadline = time.monotonic() + 5
    while (after := xid_series(sampler))["1"][1] == 0:
        assert time.monotonic() < deadline, "the simulated XID was never delivered"
        time.sleep(0.02)
    labels_, v = after["1"]
    assert v == 79
    assert (labels_["err_code"], labels_["err_msg"]) == ("79", "GPU has fallen off the bus")
    assert after["0"][1] == 0  # the other GPU is untouched
    # As DCGM's field, it stays at the last XID.
    clock.advance(10)
    assert xid_series(sampler)["1"][1] == 79


def test_xid_labels_name_unknown_xids_as_dcgm_exporter_does() -> None:
    assert dict(xid_labels(13)) == {"err_code": "13", "err_msg": "Graphics Engine Exception"}
    assert dict(xid_labels(999)) == {"err_code": "999", "err_msg": "Unknown Error"}


# --- PCIe throughput -----------------------------------------------------------------------


def test_pcie_bytes_come_from_the_byte_counters_rate_where_a_gpu_has_no_gpm() -> None:
    model = "NVIDIA A100-SXM4-80GB"  # PCIe byte counters, no GPM
    before, after = (values(t) for t in two_samples("nvml", interval=20, model=model))
    first, second = (values(t) for t in two_samples("dcgm", interval=20, model=model))
    for direction in ("tx", "rx"):
        start = by_uuid(before[f"nvml_pcie_{direction}_bytes_total"], "uuid")
        end = by_uuid(after[f"nvml_pcie_{direction}_bytes_total"], "uuid")
        field = f"DCGM_FI_PROF_PCIE_{direction.upper()}_BYTES"
        assert field not in first
        rate = by_uuid(second[field], "UUID")
        assert rate == pytest.approx({u: (end[u] - start[u]) / 20 for u in end})


def test_counter_rates_skip_the_first_reading_a_reset_and_no_elapsed_time() -> None:
    rates = dcgm.CounterRates()
    key = ("GPU-0", "nvml_pcie_tx_bytes_total", ())
    assert rates.rate(key, 100, now=10) is None  # one reading is no rate
    assert rates.rate(key, 300, now=12) == 100
    assert rates.rate(key, 400, now=12) is None  # no time passed: measured from t=12 on
    assert rates.rate(key, 500, now=14) == 100
    assert rates.rate(key, 50, now=15) is None  # the driver reloaded: counting starts again
    assert rates.rate(key, 150, now=16) == 100
    rates.sweep()
    rates.sweep()  # a sample that did not read it: the GPU went away
    assert rates.rate(key, 250, now=17) is None


def test_pcie_bytes_come_from_gpm_alone_where_a_gpu_has_both() -> None:
    ours = values(two_samples("nvml")[1])
    theirs = values(two_samples("dcgm")[1])
    gpm = {
        lab["uuid"]: v
        for lab, v in ours["nvml_gpm_pcie_bytes_per_second"]
        if lab["direction"] == "tx" and lab["gpu_instance"] == ""
    }
    assert by_uuid(theirs["DCGM_FI_PROF_PCIE_TX_BYTES"], "UUID") == pytest.approx(gpm)
    assert len(theirs["DCGM_FI_PROF_PCIE_TX_BYTES"]) == 2  # once per GPU, not per source


def test_pcie_bytes_come_from_the_throughput_call_where_a_gpu_lacks_counters() -> None:
    ours = values(two_samples("nvml", model="NVIDIA L40S")[1])
    theirs = values(two_samples("dcgm", model="NVIDIA L40S")[1])
    expected = by_uuid(ours["nvml_pcie_rx_bytes_per_second"], "uuid")
    assert by_uuid(theirs["DCGM_FI_PROF_PCIE_RX_BYTES"], "UUID") == pytest.approx(expected)


# --- values as dcgm-exporter prints them -----------------------------------------------------


def test_integral_values_print_as_integers_without_conversion_noise() -> None:
    text = rendered("dcgm")
    ours = values(rendered("nvml"))
    lines = [line for line in text.splitlines() if line.startswith("DCGM_")]
    for line in lines:
        number = line.rsplit(" ", 1)[1]
        value_ = float(number)
        if value_.is_integer():
            assert re.fullmatch(r"-?\d+", number), line
    # Percentages computed from a ratio: no 28.999999999999996 where the driver said 29.
    for lab, ratio in ours["nvml_memory_controller_utilization_ratio"]:
        percent = by_uuid(values(text)["DCGM_FI_DEV_MEM_COPY_UTIL"], "UUID")[lab["uuid"]]
        assert percent == round(ratio * 100)
        assert f"{int(percent)}\n" in text
    energy = [line for line in lines if line.startswith("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")]
    assert energy and all(re.search(r"} \d+$", line) for line in energy)


def test_converting_to_dcgm_units_rounds_away_the_division_noise() -> None:
    assert dcgm._converted(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996
    assert dcgm._converted(0.56, 100) == 56  # and 0.56 * 100 is 56.00000000000001
    assert dcgm._converted(0.4633, 100) == 46.33
    assert dcgm._converted(1.5, 1) == 1.5


# --- the host label ------------------------------------------------------------------------


def test_the_host_label_is_spelled_as_the_released_dcgm_exporter_or_as_its_main_branch() -> None:
    assert dcgm.DEFAULT_HOSTNAME_LABEL == "Hostname"
    assert dcgm.identity_labels() == dcgm.IDENTITY_LABELS
    assert dcgm.identity_labels("hostname") == (
        "gpu",
        "UUID",
        "pci_bus_id",
        "device",
        "modelName",
        "hostname",
        "DCGM_FI_DRIVER_VERSION",
    )
    with pytest.raises(ValueError):
        dcgm.identity_labels("HOSTNAME")
    config = dataclasses.replace(Config(backend="simulated", naming="dcgm"))
    config = dataclasses.replace(config, simulation=SimulationConfig(devices=1))
    clock = FakeClock()
    sampler = Sampler(config, SimulatedDriver(config.simulation, clock=clock), clock=clock)
    sampler.sample_once()
    device = sampler.session.devices[0]
    samples = sampler._read_device(device, sampler._collectors).samples
    builder = FamilyBuilder(sampler._header, "dcgm", "node-7", hostname_label="hostname")
    builder.add_device(device, samples)
    text = render_text(builder.families()).decode()
    assert ',hostname="node-7",' in text and "Hostname" not in text


def check_with_promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package `prometheus`)"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    # Only the style lints dcgm-exporter's own names draw (see below).
    style = ('should have "_total" suffix', "'snake_case'", "should not include type")
    for problem in (result.stdout + result.stderr).splitlines():
        assert problem.startswith("DCGM_") and any(s in problem for s in style), problem


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


def test_the_hostname_label_follows_the_config(tmp_path: Path) -> None:
    config = tmp_path / "exporter.yaml"
    config.write_text("naming: dcgm\ndcgm: {hostname_label: hostname}\n")
    loaded = apply_overrides(load_config(str(config), known=KNOWN_NAMES), Overrides(simulate=2))
    assert loaded.dcgm.hostname_label == "hostname"
    driver = SimulatedDriver(loaded.simulation)
    sampler = Sampler(loaded, driver)
    body = sampler.sample_once().body(Format.TEXT, False).decode()
    utilization = [line for line in body.splitlines() if line.startswith("DCGM_FI_DEV_GPU_UTIL{")]
    assert utilization and all('hostname="' in line for line in utilization)
    assert not any('Hostname="' in line for line in utilization)


def test_an_unknown_hostname_label_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "exporter.yaml"
    config.write_text("dcgm: {hostname_label: HOSTNAME}\n")
    with pytest.raises(
        ConfigError, match=r"dcgm.hostname_label: must be one of Hostname, hostname"
    ):
        load_config(str(config), known=KNOWN_NAMES)
