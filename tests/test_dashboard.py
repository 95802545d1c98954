"""The Grafana dashboard in deploy/grafana/ is importable and every query in it works.

The structural tests read the JSON only. The end-to-end test runs the exporter on the simulated
8 x H200 fleet (per-process series, MIG on GPU 0, pods from a kubelet stand-in), has a real
Prometheus scrape it every second, and evaluates every panel target through Prometheus's HTTP
API with Grafana's variables substituted: each must succeed and return at least one series.

Panels that show nothing on a healthy node (GPUs down, XIDs by code) are not exempted: the
simulated fleet is given two GPUs lost before they could be opened (so they have no UUID, which
also checks that joins on `nvml_gpu_info` stay unambiguous) and an XID 79 after Prometheus has
started scraping, so those panels must show them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, start_exporter
from kubelet_stub import FakeKubelet, container, devices, pod, response
from operator_model import NODE, service_monitor_job
from operator_model import load as load_manifest
from promserver import (
    PrometheusAPIError,
    PromServer,
    Sample,
    find_prometheus,
    labels,
    prometheus_server,
    value,
)

from exporter.config import SimulationConfig
from exporter.simulate.driver import SimulatedDriver

DASHBOARD = REPO / "deploy" / "grafana" / "nvml-exporter.json"
METRICS_DOC = REPO / "docs" / "metrics.md"
DATASOURCE_UID = "${datasource}"

GPUS = 8
LOST = (6, 7)  # lost from the start: nvml_gpu_up 0, nvml_gpu_down_info, uuid ""
XID_GPU, XID = 2, 79
XID_AT = 14  # seconds after the exporter starts: well after Prometheus's first scrape (~5 s)
PODS = range(1, 6)  # GPUs allocated to a pod each by the kubelet stand-in

# Grafana's built-in intervals, and the dashboard's fixed windows, shortened to what a test that
# scrapes every second for ~15 s has data for.
INTERVALS = {"__rate_interval": "5s", "__interval": "2s", "__range": "30s"}
LONG_WINDOW = re.compile(r"\[\d+[hdw]\]")
SHORT_WINDOW = "[30s]"

# Metrics the dashboard must keep showing (issue 9's panel list).
REQUIRED_METRICS = {
    "nvml_up",
    "nvml_gpu_up",
    "nvml_gpu_down_info",
    "nvml_gpu_info",
    "nvml_last_sample_timestamp_seconds",
    "nvml_xid_errors_total",
    "nvml_gpu_busy_seconds_total",
    "nvml_memory_controller_busy_seconds_total",
    "nvml_power_watts",
    "nvml_power_limit_watts",
    "nvml_energy_joules_total",
    "nvml_memory_used_bytes",
    "nvml_memory_total_bytes",
    "nvml_bar1_memory_used_bytes",
    "nvml_temperature_celsius",
    "nvml_temperature_threshold_celsius",
    "nvml_memory_temperature_celsius",
    "nvml_clock_event_active",
    "nvml_clock_event_seconds_total",
    "nvml_clock_hertz",
    "nvml_pcie_tx_bytes_total",
    "nvml_nvlink_tx_bytes_total",
    "nvml_ecc_errors_total",
    "nvml_remapped_rows_total",
    "nvml_process_memory_used_bytes",
    "nvml_processes",
    "nvml_gpu_pod_info",
    "nvml_mig_memory_used_bytes",
    "nvml_gpm_sm_activity_ratio",
    "nvml_gpm_sm_occupancy_ratio",
    "nvml_gpm_tensor_activity_ratio",
    "nvml_gpm_dram_bandwidth_ratio",
}

_DOC_ROW = re.compile(r"^\| `(nvml_\w+)` \| (\w+) \| [^|]* \| ([^|]*) \|", re.MULTILINE)
_SELECTOR = re.compile(r"\b(nvml_\w+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_RANGE_FUNCTION = re.compile(r"\b(rate|irate|increase|delta|deriv)\(\s*(nvml_\w+)")
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$", re.DOTALL)


# --- reading the dashboard and the metrics reference -----------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels nested in collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]


def targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title / refId, target) for every target of every panel."""
    return [
        (f"{panel['title']} / {target['refId']}", target)
        for panel in query_panels(dashboard)
        for target in panel["targets"]
    ]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    text: str = query["query"] if isinstance(query, dict) else query
    return text


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """{name: (type, labels)} from the tables of docs/metrics.md."""
    return {
        name: (kind, set(re.findall(r"`(\w+)`", label_cell)))
        for name, kind, label_cell in _DOC_ROW.findall(METRICS_DOC.read_text())
    }


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric, {label: (operator, value)}) for each nvml_* vector selector in `expr`."""
    return [
        (name, {label: (op, val) for label, op, val in _MATCHER.findall(body or "")})
        for name, body in _SELECTOR.findall(expr)
    ]


# --- the JSON itself ---------------------------------------------------------------------------


def test_dashboard_is_importable() -> None:
    dashboard = load_dashboard()
    assert dashboard["id"] is None, "an exported dashboard has no database id"
    assert dashboard["uid"] == "nvml-exporter"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    [source] = [i for i in dashboard["__inputs"] if i["type"] == "datasource"]
    assert source["pluginId"] == "prometheus"
    required = {(r["type"], r["id"]) for r in dashboard["__requires"]}
    assert {("grafana", "grafana"), ("datasource", "prometheus")} <= required
    panel_types = {p["type"] for p in query_panels(dashboard)}
    assert panel_types <= {r["id"] for r in dashboard["__requires"] if r["type"] == "panel"}
    # Every ${DS_...} placeholder is one the import dialog asks for.
    inputs = {i["name"] for i in dashboard["__inputs"]}
    assert set(re.findall(r"\$\{(DS_\w+)\}", DASHBOARD.read_text())) <= inputs


def test_template_variables() -> None:
    found = variables(load_dashboard())
    assert list(found) == ["datasource", "instance", "gpu"], "order matters: gpu uses instance"

    datasource = found["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"

    instance, gpu = found["instance"], found["gpu"]
    assert variable_query(instance) == "label_values(nvml_up, instance)"
    assert variable_query(gpu) == 'label_values(nvml_gpu_info{instance=~"$instance"}, gpu)'
    for variable in (instance, gpu):
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == DATASOURCE_UID
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable["refresh"] == 2, "refresh on time range change: GPUs come and go"


def test_panel_ids_are_unique_and_panels_fit_the_grid() -> None:
    dashboard = load_dashboard()
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            assert panel["collapsed"] == bool(panel["panels"]), panel["title"]
            assert not any(p["type"] == "row" for p in panel["panels"]), "rows do not nest"
        else:
            assert panel["targets"], f"{panel['title']}: no targets"
    titles = {p["title"] for p in panels if p["type"] == "row"}
    assert any(p.get("repeat") == "gpu" for p in panels), "a per-GPU row repeated by $gpu"
    assert len(titles) >= 8


def test_every_target_uses_the_templated_datasource() -> None:
    dashboard = load_dashboard()
    for panel in query_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    for where, target in targets(dashboard):
        assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, where
        assert target["expr"].strip(), where


def test_queries_use_documented_metrics_and_filter_by_the_variables() -> None:
    dashboard = load_dashboard()
    documented = documented_metrics()
    assert len(documented) > 50, "docs/metrics.md tables not found"
    used: set[str] = set()
    problems: list[str] = []
    expressions = [(where, t["expr"]) for where, t in targets(dashboard)]
    expressions += [(f"variable {n}", variable_query(v)) for n, v in variables(dashboard).items()]
    for where, expr in expressions:
        if where == "variable datasource":
            continue
        for name, matchers in selectors(expr):
            used.add(name)
            if name not in documented:
                problems.append(f"{where}: {name} is not in docs/metrics.md")
                continue
            if where == "variable instance":
                continue  # lists the instances, so it cannot filter by them
            if matchers.get("instance") != ("=~", "$instance"):
                problems.append(f'{where}: {name} without instance=~"$instance"')
            _, metric_labels = documented[name]
            per_gpu = "gpu" in metric_labels and where != "variable gpu"
            if per_gpu and matchers.get("gpu") != ("=~", "$gpu"):
                problems.append(f'{where}: {name} without gpu=~"$gpu"')
        for function, name in _RANGE_FUNCTION.findall(expr):
            kind = documented.get(name, ("?", set()))[0]
            if kind != "counter":
                problems.append(f"{where}: {function}() of {name}, a {kind}, not a counter")
    assert not problems, "\n".join(problems)
    assert not REQUIRED_METRICS - used, f"panels missing for {sorted(REQUIRED_METRICS - used)}"


# --- every query against a real Prometheus -----------------------------------------------------


def promql_string(regex: str) -> str:
    """A regex as the inside of a PromQL double-quoted string (Grafana escapes it likewise)."""
    return regex.replace("\\", "\\\\").replace('"', '\\"')


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation, for the variables this dashboard uses."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in INTERVALS:
            return INTERVALS[name]
        if name not in values:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return LONG_WINDOW.sub(SHORT_WINDOW, _VARIABLE.sub(replace, expr))


def exporter_config(tmp_path: Path, socket_path: str) -> Path:
    faults = [f"    - {{kind: lost, device: {gpu}}}" for gpu in LOST]
    faults.append(f"    - {{kind: xid, device: {XID_GPU}, xid: {XID}, start: {XID_AT}s}}")
    path = tmp_path / "exporter.yaml"
    path.write_text(
        "sampling: {interval: 1s}\n"
        "collectors: {processes: true}\n"
        f"kubernetes: {{enabled: true, socket: {socket_path}, interval: 1s, timeout: 500ms}}\n"
        "simulation:\n"
        "  mig_devices: 1\n"
        "  faults:\n" + "\n".join(faults) + "\n"
    )
    return path


def kubelet_reply() -> bytes:
    driver = SimulatedDriver(SimulationConfig(devices=GPUS, mig_devices=1))
    return response(
        *(
            pod(
                "inference",
                f"llm-{i}",
                container("server", devices("nvidia.com/gpu", driver.uuid(i))),
            )
            for i in PODS
        )
    )


def evaluate(prom: PromServer, expr: str) -> list[Sample] | str:
    """The result of an instant query, or the error Prometheus gave."""
    try:
        return prom.query(expr)
    except PrometheusAPIError as err:
        return str(err).split(": ", 1)[-1]  # without "GET <url>"
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def check_target(
    prom: PromServer, where: str, target: dict[str, Any], values: dict[str, str]
) -> str:
    """'' if the target's query works and returns data labelled as its legend expects."""
    expr = substitute(target["expr"], values)
    result = evaluate(prom, expr)
    if isinstance(result, str):
        return f"{where}: {result}\n    {expr}"
    if not result:
        return f"{where}: no series\n    {expr}"
    legend = target.get("legendFormat", "")
    for label in _LEGEND_LABEL.findall(legend):
        missing = [labels(s) for s in result if label not in labels(s)]
        if missing:
            return f"{where}: legend {legend!r} uses {label}, absent from {missing[0]}\n    {expr}"
    return ""


def panel_by_title(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    [panel] = [p for p in query_panels(dashboard) if p["title"] == title]
    return panel


@pytest.mark.slow
def test_every_panel_query_returns_data(tmp_path: Path, kubelet: FakeKubelet) -> None:
    assert find_prometheus(), (
        "Prometheus is required for the dashboard test: apt-get install prometheus "
        "(scripts/test installs it), or set PROMETHEUS_BIN"
    )
    dashboard = load_dashboard()
    kubelet.reply = kubelet_reply()
    proc = start_exporter(
        ["--simulate", "--config.file", str(exporter_config(tmp_path, kubelet.socket_path))]
    )
    try:
        # Scraped as the Prometheus Operator scrapes with the shipped ServiceMonitor, so that
        # the panels are checked against the labels a cluster really has.
        job = service_monitor_job(
            load_manifest("servicemonitor.yaml"),
            load_manifest("service.yaml"),
            load_manifest("daemonset.yaml"),
            proc.address,
        )
        job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
        with prometheus_server([], tmp_path, scrape_interval="1s", jobs=[job]) as prom:
            # The XID comes XID_AT s after start, so Prometheus has scraped for several seconds
            # (enough for 5s rate windows) and has seen its counter at 0 before it.
            prom.wait_for_query(
                f'nvml_xid_errors_total{{gpu="{XID_GPU}", xid="{XID}"}} > 0',
                lambda r: len(r) == 1,
                timeout=XID_AT + 15,
            )
            before = prom.query(f'min_over_time(nvml_xid_errors_total{{xid="{XID}"}}[1m]) == 0')
            assert str(XID_GPU) in {labels(s)["gpu"] for s in before}, (
                f"Prometheus first scraped after the simulated XID at {XID_AT}s (a slow machine?)"
            )
            prom.wait_for_query('nvml_process_memory_used_bytes{pod!=""}', bool, timeout=10)
            prom.wait_for_query(f"count_over_time(nvml_up[{INTERVALS['__rate_interval']}]) >= 3")

            instance = promql_string(re.escape(NODE))
            values = {"instance": instance, "gpu": ".*"}

            # The variables' own queries (label_values is Grafana's, so as the equivalent PromQL).
            found = variables(dashboard)
            instances = prom.query(
                _LABEL_VALUES.sub(r"group by (\2) (\1)", variable_query(found["instance"]))
            )
            assert [labels(s)["instance"] for s in instances] == [NODE]
            gpu_query = substitute(variable_query(found["gpu"]), values)
            gpus = prom.query(_LABEL_VALUES.sub(r"group by (\2) (\1)", gpu_query))
            assert sorted(int(labels(s)["gpu"]) for s in gpus) == list(range(GPUS))

            problems = [check_target(prom, where, t, values) for where, t in targets(dashboard)]
            # The repeated per-GPU row gets one GPU at a time.
            for row in all_panels(dashboard["panels"]):
                if row.get("repeat") == "gpu":
                    for panel in row["panels"]:
                        for target in panel["targets"]:
                            where = f"{panel['title']} / {target['refId']} (gpu 1)"
                            problems.append(
                                check_target(prom, where, target, {**values, "gpu": "1"})
                            )
            problems = [p for p in problems if p]
            assert not problems, f"{len(problems)} failing targets:\n" + "\n".join(problems)

            # A few panels whose numbers the simulated faults fix.
            def results(title: str) -> list[list[Sample]]:
                panel = panel_by_title(dashboard, title)
                out = []
                for target in panel["targets"]:
                    result = evaluate(prom, substitute(target["expr"], values))
                    assert not isinstance(result, str), result
                    out.append(result)
                return out

            up, total = results("GPUs up")
            assert (value(up[0]), value(total[0])) == (GPUS - len(LOST), GPUS)
            [down] = results("GPUs down: reason")
            assert sorted((labels(s)["gpu"], labels(s)["reason"]) for s in down) == [
                (str(gpu), "gpu_is_lost") for gpu in LOST
            ]
            [xids] = results("XIDs by GPU and code (last 1h)")
            assert [(labels(s)["gpu"], labels(s)["xid"], value(s)) for s in xids] == [
                (str(XID_GPU), str(XID), 1.0)
            ]
            [pods] = results("Pods holding GPUs")
            assert sorted(labels(s)["pod"] for s in pods) == [f"llm-{i}" for i in PODS]
            assert all(labels(s)["name"] == "NVIDIA H200" for s in pods)
            [utilization] = results("GPU utilization")
            assert len(utilization) == GPUS - len(LOST)
            assert all(0 <= value(s) <= 1 and labels(s)["name"] for s in utilization)
            [mig] = results("MIG instance memory used")
            assert {labels(s)["gpu"] for s in mig} == {"0"} and len(mig) == 7
    finally:
        proc.stop()
