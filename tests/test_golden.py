"""The whole /metrics body for a fixed simulated fleet and time, against a reviewed file.

Regenerate after an intended change with `UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`
and review the diff like code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

from fakes import FakeClock

from exporter.config import Config, SimulationConfig
from exporter.sampler import Sampler
from exporter.simulate.driver import SimulatedDriver
from exporter.snapshot import Format

GOLDEN = Path(__file__).parent / "golden" / "simulated.prom"

# Values that depend on the machine running the test, not on the exporter's logic.
_VOLATILE = re.compile(
    r"^(nvml_collector_duration_seconds|nvml_sample_duration_seconds)(\{[^}]*\})? .*$"
)
_BUILD_INFO = re.compile(r"^nvml_exporter_build_info\{.*\} 1$")


def normalise(body: str) -> str:
    lines = []
    for line in body.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("#") else line
        if name.startswith("process_"):
            continue
        if _VOLATILE.match(line):
            lines.append(line.rsplit(" ", 1)[0] + " <duration>")
        elif _BUILD_INFO.match(line):
            lines.append("nvml_exporter_build_info{<versions>} 1")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def render() -> str:
    config = dataclasses.replace(
        Config(backend="simulated"),
        simulation=SimulationConfig(devices=2, seed=7),
    )
    clock = FakeClock()
    sampler = Sampler(
        config,
        SimulatedDriver(config.simulation, clock=clock),
        clock=clock,
        wall_clock=lambda: 1_764_000_000.0,
    )
    sampler.sample_once()
    clock.advance(80)
    sampler.sample_once()
    # The busy counters integrate the driver samples of these 10 s, and the energy counter is
    # read again: both every 10 s.
    clock.advance(10)
    return sampler.sample_once().body(Format.TEXT, compressed=False).decode()


def test_full_output_matches_the_golden_file() -> None:
    body = normalise(render())
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(body)
    assert body == GOLDEN.read_text()


def test_full_output_passes_promtool_without_warnings() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package `prometheus`)"
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=render(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert (result.stdout + result.stderr).strip() == ""
