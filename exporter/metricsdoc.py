"""Renders docs/metrics.md from the metric specs: `python -m exporter.metricsdoc > docs/metrics.md`.

The specs are the single source; tests check that the committed file matches this output and
that it lists exactly the metrics the exporter emits.
"""

from __future__ import annotations

from collections.abc import Iterator

from exporter.collectors import COLLECTORS, MetricSpec
from exporter.config import DEFAULT_PORT
from exporter.selfmetrics import PROCESS_METRICS, SELF_METRICS, WEB_METRICS

HEADER = f"""# Metrics

Every metric nvml-exporter emits. GPU series carry the identity labels `gpu` (NVML index) and
`uuid`; everything static about a GPU (name, PCI bus id, serial, VBIOS, driver) is on
`nvml_gpu_info`, so join it where you need it:

```promql
nvml_power_watts * on(uuid) group_left(name) nvml_gpu_info
```

Values are read by a background sampler every `sampling.interval` (default 1 s) and served from
the latest sample; `nvml_last_sample_timestamp_seconds` tells how fresh they are. A value NVML
does not support on a GPU is absent, never 0 or NaN. Units are base units: NVML's mW, mJ, MHz and
percent are converted to watts, joules, hertz and 0-1 ratios.

This file is generated from the code (`python -m exporter.metricsdoc > docs/metrics.md`) and a
test checks it against what the exporter really emits. Default port: {DEFAULT_PORT}.
"""

COLUMNS = (
    "Metric",
    "Type",
    "Unit",
    "Labels",
    "Default",
    "NVML source",
    "dcgm-exporter equivalent",
)

# dcgm-exporter's default counters that `naming: dcgm` cannot produce, and why.
DCGM_WITHOUT_EQUIVALENT = (
    (
        "DCGM_FI_DEV_VGPU_LICENSE_STATUS",
        "vGPU licensing is a vGPU-host concern outside NVML's device queries; not collected",
    ),
    (
        "DCGM_FI_PROF_* on GPUs before Hopper",
        "NVML's GPM API, which these come from here, "
        "exists on Hopper and newer only; DCGM derives them from its own profiling there. "
        "Except DCGM_FI_PROF_PCIE_TX_BYTES and _RX_BYTES: from the PCIe byte counters' rate "
        "(from the second sample on), or the 20 ms throughput where a GPU lacks the counters",
    ),
    (
        "DCGM_FI_PROF_PCIE_TX_BYTES, DCGM_FI_PROF_PCIE_RX_BYTES without GPM, byte counters or "
        "the throughput call",
        "nothing in NVML measures PCIe traffic on such a GPU",
    ),
    (
        "labels pod_uid and pod labels (--kubernetes-enable-pod-uid, "
        "--kubernetes-enable-pod-labels)",
        "they come from the Kubernetes API server, which this exporter does not ask; the "
        "kubelet's pod-resources API has neither",
    ),
    (
        "a copy of every series per pod sharing a GPU, with label vgpu (--kubernetes-virtual-gpus)",
        "one series per GPU, labelled with one of its pods as dcgm-exporter does by default, "
        "keeps sums over GPUs right; nvml_gpu_pod_info lists every pod",
    ),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "-"


def dcgm_text(spec: MetricSpec) -> str:
    parts = []
    for field in spec.dcgm:
        text = field.name
        if field.match:
            text += "{" + ",".join(f'{k}="{v}"' for k, v in field.match) + "}"
        notes = [
            field.unit,
            "summed over links" if field.total else "",
            "rate over the sampling interval" if field.rate else "",
            "where no GPM value" if field.fallback else "",
        ]
        if any(notes):
            text += f" ({', '.join(n for n in notes if n)})"
        parts.append(text)
    for field in spec.dcgm_baseline:
        parts.append(f"{field.name}: 0 wherever this metric is, until a value comes")
    if spec.dcgm_note:
        parts.append(spec.dcgm_note)
    return "; ".join(parts)


def _row(spec: MetricSpec, default: str) -> str:
    labels = ", ".join(f"`{name}`" for name in spec.label_names)
    cells = (
        f"`{spec.name}`",
        spec.type,
        spec.unit,
        labels,
        default,
        spec.source,
        dcgm_text(spec),
    )
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(specs: tuple[MetricSpec, ...], default: str) -> Iterator[str]:
    yield "| " + " | ".join(COLUMNS) + " |"
    yield "|" + "---|" * len(COLUMNS)
    for spec in specs:
        yield _row(spec, default)
    yield ""
    for spec in specs:
        yield f"- `{spec.name}`: {spec.help}"


def sections() -> Iterator[tuple[str, str, tuple[MetricSpec, ...]]]:
    for name, cls in COLLECTORS.items():
        state = "on" if cls.default_enabled else "off"
        yield f"Collector `{name}` (default {state})", state, cls.metrics
    yield "Exporter health and self-metrics", "always", SELF_METRICS
    yield "Web server security (with `web.config_file`)", "with a web config", WEB_METRICS
    yield "Process metrics of the exporter itself", "always", PROCESS_METRICS


def documented() -> dict[str, MetricSpec]:
    return {spec.name: spec for _, _, specs in sections() for spec in specs}


def documented_dcgm() -> set[str]:
    return {field.name for _, _, specs in sections() for spec in specs for field in spec.dcgm}


def render() -> str:
    lines = [HEADER]
    for title, default, specs in sections():
        lines.append(f"## {title}\n")
        lines.extend(_table(specs, default))
        lines.append("")
    lines.append("## dcgm-exporter default fields without an equivalent here\n")
    lines.append("| dcgm-exporter field | why |")
    lines.append("|---|---|")
    lines.extend(f"| {name} | {why} |" for name, why in DCGM_WITHOUT_EQUIVALENT)
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
