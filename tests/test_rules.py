"""deploy/prometheus: the alerting and recording rules.

promtool checks them and runs their unit tests (deploy/prometheus/tests/); every alert must be
unit-tested both firing and not firing, every recording rule evaluated. The metric names, label
names and label values the rules use are checked against what the exporter really emits:
docs/metrics.md (generated from the code) and the golden /metrics output.

The recording rules are roll-ups per node (`instance:`) and per fleet (`job:`) for a global
Prometheus, Thanos, Mimir or VictoriaMetrics; the federation and remote-write examples that ship
them must pass `promtool check config` and carry exactly those series, as many as the README says.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.collectors.events import CRITICAL_XIDS, XID_MEANINGS

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "nvml-exporter.rules.yml"
UNIT_TEST_DIR = PROMETHEUS_DIR / "tests"
METRICS_DOC = REPO / "docs" / "metrics.md"
GOLDEN = REPO / "tests" / "golden" / "simulated.prom"
README = PROMETHEUS_DIR / "README.md"
FEDERATION = PROMETHEUS_DIR / "federation.yml"
REMOTE_WRITE = PROMETHEUS_DIR / "remote-write.yml"

SEVERITIES = ("critical", "warning", "info")
# Labels Prometheus adds to every series of a target; any rule may use them.
TARGET_LABELS = frozenset({"job", "instance"})
# Suffixes of the series a histogram or summary is exposed as.
SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_created")

_DOC_ROW = re.compile(
    r"^\| `(?P<name>[a-z_:][a-z0-9_:]*)` \| (?P<type>\w+) \| [^|]* \| (?P<labels>[^|]*) \|"
)
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? \S+$")
_LABEL_PAIR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# An exporter metric: `nvml_` not inside a longer name (recording rules such as
# instance:nvml_gpus:count are not metrics of the exporter).
_METRIC = re.compile(r"(?<![\w:])nvml_\w+")
_SELECTOR = re.compile(r"(?<![\w:])(nvml_\w+)\{([^}]*)\}")
# A label matcher; in annotation templates the value may be a printf verb (%q) filled in from
# the alert's labels.
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|(%q))')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# A recording rule's output read by another rule.
_RECORDED = re.compile(r"\b[a-z_]+:nvml_[a-z0-9_]+:[a-z0-9_]+\b")
# The labels each roll-up level keeps: one series per node, or per fleet.
ROLLUP_LABELS = {"instance": frozenset({"job", "instance"}), "job": frozenset({"job"})}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is required to check the alert rules: install the Debian/Ubuntu package "
            "`prometheus` (apt-get install prometheus), as .ci/run does"
        )
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@cache
def rules() -> tuple[dict[str, Any], ...]:
    return tuple(rule for group in load_yaml(RULES)["groups"] for rule in group["rules"])


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def records() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "record" in rule]


def unit_test_files() -> list[Path]:
    files = sorted(UNIT_TEST_DIR.glob("*.yml"))
    assert files, f"no promtool unit tests in {UNIT_TEST_DIR}"
    return files


def unit_test_groups() -> Iterator[dict[str, Any]]:
    for path in unit_test_files():
        yield from load_yaml(path)["tests"]


def rule_texts(rule: dict[str, Any]) -> list[str]:
    """The PromQL of a rule: its expression and its annotations' template queries."""
    return [str(rule["expr"]), *(str(v) for v in rule.get("annotations", {}).values())]


def metric_names(text: str) -> set[str]:
    return set(_METRIC.findall(text))


@cache
def documented_metrics() -> dict[str, frozenset[str]]:
    """Every metric in docs/metrics.md's tables, with its documented labels."""
    metrics = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        row = _DOC_ROW.match(line)
        if row:
            labels = frozenset(re.findall(r"`(\w+)`", row["labels"]))
            metrics[row["name"]] = labels
    assert len(metrics) > 50, f"could not parse the metric tables of {METRICS_DOC}"
    return metrics


def documented_name(name: str) -> str | None:
    """The documented metric a series name belongs to, if any."""
    documented = documented_metrics()
    if name in documented:
        return name
    for suffix in SERIES_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in documented:
            return name.removesuffix(suffix)
    return None


@cache
def golden_label_values() -> dict[str, dict[str, frozenset[str]]]:
    """For each metric in the golden /metrics output, the values each of its labels takes."""
    values: dict[str, dict[str, set[str]]] = {}
    for line in GOLDEN.read_text(encoding="utf-8").splitlines():
        sample = _SAMPLE.match(line)
        if line.startswith("#") or not sample:
            continue
        per_label = values.setdefault(sample["name"], {})
        for label, value in _LABEL_PAIR.findall(sample["labels"] or ""):
            per_label.setdefault(label, set()).add(value)
    return {
        name: {label: frozenset(seen) for label, seen in labels.items()}
        for name, labels in values.items()
    }


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.mark.slow
def test_promtool_check_rules_passes() -> None:
    result = run("check", "rules", str(RULES))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(rules())} rules found" in output, output
    assert "WARNING" not in output.upper(), output


@pytest.mark.slow
def test_promtool_unit_tests_pass() -> None:
    result = run("test", "rules", *(str(path) for path in unit_test_files()))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "FAILED" not in output, output
    assert output.count("SUCCESS") == len(unit_test_files()), output


def test_unit_tests_load_the_rule_file() -> None:
    for path in unit_test_files():
        rule_files = load_yaml(path)["rule_files"]
        resolved = {(path.parent / name).resolve() for name in rule_files}
        assert resolved == {RULES.resolve()}, f"{path.name}: rule_files {rule_files}"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    names = {rule["alert"] for rule in alerts()}
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in unit_test_groups():
        for case in group.get("alert_rule_test", []):
            name = case["alertname"]
            # A test of a misspelt alert would pass vacuously with exp_alerts: [].
            assert name in names, f"unit test {group.get('name')!r} names unknown alert {name}"
            (firing if case.get("exp_alerts") else quiet).add(name)
    assert names - firing == set(), "alerts never shown firing in a unit test"
    assert names - quiet == set(), "alerts never shown not firing in a unit test"


def test_every_alert_fires_with_its_annotations_checked() -> None:
    for group in unit_test_groups():
        for case in group.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                annotations = alert.get("exp_annotations", {})
                assert {"summary", "description"} <= set(annotations), (
                    f"{group.get('name')!r}: {case['alertname']} at {case['eval_time']} "
                    "does not check the rendered summary and description"
                )


def test_every_recording_rule_is_unit_tested() -> None:
    tested = {
        str(case["expr"]).strip()
        for group in unit_test_groups()
        for case in group.get("promql_expr_test", [])
        if case.get("exp_samples")
    }
    untested = {rule["record"] for rule in records()} - tested
    assert untested == set(), "recording rules without a promql_expr_test"


def test_rule_names_are_unique_and_conventional() -> None:
    alert_names = [rule["alert"] for rule in alerts()]
    record_names = [rule["record"] for rule in records()]
    assert len(alert_names) == len(set(alert_names)), alert_names
    assert len(record_names) == len(set(record_names)), record_names
    for name in alert_names:
        assert re.fullmatch(r"Nvml[A-Z][A-Za-z]+", name), name
    for name in record_names:
        # level:metric:operations, https://prometheus.io/docs/practices/rules/
        assert re.fullmatch(r"[a-z_]+:nvml_[a-z0-9_]+:[a-z0-9_]+", name), name


def test_every_alert_has_a_severity_and_annotations_naming_what_is_wrong() -> None:
    documented = documented_metrics()
    for rule in alerts():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        summary, description = annotations.get("summary", ""), annotations.get("description", "")
        assert summary.strip() and description.strip(), name
        expr = str(rule["expr"])
        if expr.startswith("absent("):
            # absent() keeps only the selector's equality labels.
            assert "$labels.job" in description, name
            continue
        assert "$labels.instance" in summary, name
        assert "$labels.instance" in description, name
        per_gpu = any("gpu" in documented.get(metric, ()) for metric in metric_names(expr))
        if per_gpu:
            assert "$labels.gpu" in summary, name
            assert "$labels.gpu" in description and "$labels.uuid" in description, name


def test_every_metric_in_the_rules_is_documented() -> None:
    used = {name for rule in rules() for text in rule_texts(rule) for name in metric_names(text)}
    assert len(used) > 20, used
    undocumented = sorted(name for name in used if documented_name(name) is None)
    assert undocumented == [], f"not in {METRICS_DOC.relative_to(REPO)}"


def test_label_matchers_use_real_labels_and_values() -> None:
    documented = documented_metrics()
    golden = golden_label_values()
    checked = 0
    for rule in rules():
        for text in rule_texts(rule):
            for metric, body in _SELECTOR.findall(text.replace('\\"', '"')):
                base = documented_name(metric)
                assert base is not None, metric
                for label, op, value, verb in _MATCHER.findall(body):
                    where = f"{rule.get('alert') or rule.get('record')}: {metric}{{{label}}}"
                    assert label in documented[base] | TARGET_LABELS, f"{where}: no such label"
                    if verb or label in TARGET_LABELS or op not in ("=", "=~"):
                        continue
                    if metric not in golden:  # only while something is wrong, e.g. down_info
                        continue
                    seen = golden[metric].get(label, frozenset())
                    wanted = value.split("|") if op == "=~" else [value]
                    missing = [v for v in wanted if v not in seen]
                    assert missing == [], f"{where}: values the exporter never emits: {missing}"
                    checked += 1
    assert checked >= 5, "the label values of too few selectors were checked"


def test_grouping_and_matching_labels_exist() -> None:
    documented = documented_metrics()
    for rule in rules():
        expr = str(rule["expr"])
        known = set(TARGET_LABELS)
        for metric in metric_names(expr):
            known |= documented.get(documented_name(metric) or metric, frozenset())
        for labels in _GROUPING.findall(expr):
            for label in (part.strip() for part in labels.split(",") if part.strip()):
                assert label in known, f"{rule.get('alert') or rule.get('record')}: {label}"


def test_xid_alert_covers_the_exporters_critical_xids() -> None:
    (rule,) = [rule for rule in alerts() if "nvml_xid_errors_total" in str(rule["expr"])]
    match = re.search(r'xid=~"([^"]+)"', str(rule["expr"]))
    assert match, rule["expr"]
    assert set(match.group(1).split("|")) == {str(xid) for xid in CRITICAL_XIDS}
    description = rule["annotations"]["description"]
    for xid in CRITICAL_XIDS:
        assert f'eq $labels.xid "{xid}" }}}}{XID_MEANINGS[xid]}{{{{' in description, xid


def test_no_exporter_metric_is_rated_unless_it_is_a_counter() -> None:
    """rate() and increase() on a gauge give nonsense; they must only see counters."""
    types = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        row = _DOC_ROW.match(line)
        if row:
            types[row["name"]] = row["type"]
    for rule in rules():
        for func, metric in re.findall(
            r"\b(rate|increase|irate)\(\s*(nvml_\w+)", str(rule["expr"])
        ):
            assert types.get(metric) == "counter", f"{func}({metric}) on a {types.get(metric)}"


def test_rollups_keep_one_series_per_node_or_per_fleet() -> None:
    """A roll-up groups by job and instance, or by job, and nothing finer, so what a global
    Prometheus receives grows with nodes and fleets, never with GPUs."""
    for rule in records():
        name, expr = rule["record"], str(rule["expr"])
        level = name.split(":", 1)[0]
        assert level in ROLLUP_LABELS, f"{name}: neither a per-node nor a per-fleet roll-up"
        assert not re.search(r"\bwithout\s*\(", expr), name
        groupings = [
            frozenset(label.strip() for label in labels.split(",") if label.strip())
            for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr)
        ]
        assert all(grouping == ROLLUP_LABELS[level] for grouping in groupings), (name, groupings)
        if not groupings:
            # Without an aggregation, the output has the labels of the roll-ups it combines.
            read = {other.split(":", 1)[0] for other in _RECORDED.findall(expr)}
            assert read == {level}, f"{name} combines {read} without aggregating"
            assert not metric_names(expr), f"{name} reads GPU series without aggregating"


def test_rollups_read_only_rules_evaluated_before_them_in_their_group() -> None:
    """A group evaluates its rules in order, each seeing the results of those before it; a
    roll-up read from another group, or from further down, would lag one evaluation behind."""
    for group in load_yaml(RULES)["groups"]:
        earlier: set[str] = set()
        for rule in group["rules"]:
            if "record" in rule:
                for other in _RECORDED.findall(str(rule["expr"])):
                    assert other in earlier, f"{rule['record']} reads {other}"
                earlier.add(rule["record"])


def exporter_series_names() -> set[str]:
    """Names of series the exporter emits, as a selector on __name__ would see them."""
    names = set(documented_metrics()) | set(golden_label_values())
    return names | {name + suffix for name in names for suffix in SERIES_SUFFIXES}


def assert_selects_exactly_the_rollups(patterns: list[str], where: str) -> None:
    """Prometheus anchors these regexes at both ends, as fullmatch does."""
    compiled = [re.compile(pattern) for pattern in patterns]
    missed = sorted(
        rule["record"]
        for rule in records()
        if not any(regex.fullmatch(rule["record"]) for regex in compiled)
    )
    assert missed == [], f"{where} leaves out roll-ups"
    leaked = sorted(
        name for name in exporter_series_names() if any(r.fullmatch(name) for r in compiled)
    )
    assert leaked == [], f"{where} lets the exporter's own series through"


@pytest.mark.slow
@pytest.mark.parametrize("path", [FEDERATION, REMOTE_WRITE], ids=lambda path: path.name)
def test_promtool_check_config_passes_on_the_at_scale_examples(path: Path) -> None:
    result = run("check", "config", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {path} is valid prometheus config file syntax" in output, output
    assert "WARNING" not in output.upper(), output


def test_federation_pulls_only_the_rollups_with_their_own_labels() -> None:
    (job,) = [
        job
        for job in load_yaml(FEDERATION)["scrape_configs"]
        if job.get("metrics_path") == "/federate"
    ]
    # Without it `job` and `instance` would name the cluster's Prometheus, not fleet and node.
    assert job.get("honor_labels") is True, job["job_name"]
    patterns = []
    for selector in job["params"]["match[]"]:
        match = re.fullmatch(r'\{__name__=~"([^"]+)"\}', selector)
        assert match, f"match[] {selector!r} does not select by name alone"
        patterns.append(match.group(1))
    assert_selects_exactly_the_rollups(patterns, f"{FEDERATION.name}'s match[]")


def test_remote_write_sends_only_the_rollups_of_the_rules_it_loads() -> None:
    config = load_yaml(REMOTE_WRITE)
    rule_files = {(REMOTE_WRITE.parent / name).resolve() for name in config["rule_files"]}
    assert rule_files == {RULES.resolve()}, config["rule_files"]
    # The up-based alerts select this job name.
    assert [job["job_name"] for job in config["scrape_configs"]] == ["nvml-exporter"]
    assert config["remote_write"], "no remote_write"
    for target in config["remote_write"]:
        (keep,) = [
            step for step in target.get("write_relabel_configs", []) if step.get("action") == "keep"
        ]
        assert keep["source_labels"] == ["__name__"], keep
        assert_selects_exactly_the_rollups([keep["regex"]], f"{REMOTE_WRITE.name}'s keep")


def test_readme_counts_the_series_the_rollups_send() -> None:
    text = " ".join(README.read_text(encoding="utf-8").split())
    per_node = sum(1 for rule in records() if rule["record"].startswith("instance:"))
    per_fleet = sum(1 for rule in records() if rule["record"].startswith("job:"))
    assert f"**{per_node} series per node**" in text, per_node
    assert f"**{per_fleet} series per fleet**" in text, per_fleet
    assert f"1,000 nodes in one fleet send {1000 * per_node + per_fleet:,} series" in text
    assert f"only the fleet totals and a cluster sends {per_fleet}." in text


def test_readme_shows_the_selectors_of_the_example_files() -> None:
    text = README.read_text(encoding="utf-8")
    (job,) = load_yaml(FEDERATION)["scrape_configs"]
    wanted = [*job["params"]["match[]"]]
    for target in load_yaml(REMOTE_WRITE)["remote_write"]:
        wanted += [step["regex"] for step in target["write_relabel_configs"]]
    missing = [selector for selector in wanted if f"'{selector}'" not in text]
    assert missing == [], f"{README.name}'s snippets differ from the example files"
