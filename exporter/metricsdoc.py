"""Renders docs/metrics.md from the metric specs: `python -m exporter.metricsdoc > docs/metrics.md`.

The specs are the single source; tests check that the committed file matches this output and
that it lists exactly the metrics the exporter emits.
"""

from __future__ import annotations

from collections.abc import Iterator

from exporter.collectors import COLLECTORS, MetricSpec
from exporter.config import DEFAULT_PORT
from exporter.sampler import PROCESS_METRICS, SELF_METRICS

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

COLUMNS = ("Metric", "Type", "Unit", "Labels", "NVML source", "dcgm-exporter equivalent")


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "-"


def _row(spec: MetricSpec) -> str:
    labels = ", ".join(f"`{name}`" for name in spec.label_names)
    cells = (f"`{spec.name}`", spec.type, spec.unit, labels, spec.source, spec.dcgm)
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(specs: tuple[MetricSpec, ...]) -> Iterator[str]:
    yield "| " + " | ".join(COLUMNS) + " |"
    yield "|" + "---|" * len(COLUMNS)
    for spec in specs:
        yield _row(spec)
    yield ""
    for spec in specs:
        yield f"- `{spec.name}`: {spec.help}"


def sections() -> Iterator[tuple[str, tuple[MetricSpec, ...]]]:
    for name, cls in COLLECTORS.items():
        state = "on" if cls.default_enabled else "off"
        yield f"Collector `{name}` (default {state})", cls.metrics
    yield "Exporter health and self-metrics (always on)", SELF_METRICS
    yield "Process metrics of the exporter itself (always on)", PROCESS_METRICS


def documented() -> dict[str, MetricSpec]:
    return {spec.name: spec for _, specs in sections() for spec in specs}


def render() -> str:
    lines = [HEADER]
    for title, specs in sections():
        lines.append(f"## {title}\n")
        lines.extend(_table(specs))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
