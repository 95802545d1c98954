"""docs/metrics.md lists exactly what the exporter emits, and is current with the code."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
from fakes import FakeClock

from exporter.collectors import COLLECTORS, MetricSpec, Services
from exporter.config import Config, FaultConfig, SimulationConfig
from exporter.metricsdoc import documented, documented_dcgm, render
from exporter.sampler import Sampler
from exporter.selfmetrics import PROCESS_METRICS, SELF_METRICS, WEB_METRICS
from exporter.simulate.attribution import SimulatedAttribution
from exporter.simulate.driver import SimulatedDriver
from exporter.simulate.models import MODELS
from exporter.snapshot import Snapshot
from exporter.workload import Pod

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "metrics.md"


def documented_in_file() -> set[str]:
    return set(re.findall(r"^\| `([a-zA-Z_:][a-zA-Z0-9_:]*)` \|", DOC.read_text(), re.MULTILINE))


class OnePod:
    """Every GPU and MIG device held by the same pod."""

    def __init__(self, uuids: list[str]) -> None:
        self._pods = {uuid: (Pod("ml", "llama-0", "server"),) for uuid in uuids}

    def pods(self) -> Mapping[str, tuple[Pod, ...]]:
        return self._pods

    def status(self) -> tuple[bool, float | None, int]:
        return True, 1_764_000_000.0, 0


# Event-driven series the simulated fleet never produces; the stand-in tests cover them
# (test_faults.py).
ONLY_FROM_THE_STAND_IN = {"nvml_events_total"}


def emitted_by_simulated_fleet(model: str, naming: str = "nvml") -> set[str]:
    """Everything on: every collector, MIG where the model has it, a pod for every GPU, an
    XID on GPU 0, and GPU 2 lost."""
    mig = 1 if MODELS[model].mig_profile else 0
    faults = (
        FaultConfig(kind="xid", device=0, xid=79),
        FaultConfig(kind="lost", device=2, start=1),
    )
    config = dataclasses.replace(
        Config(backend="simulated", naming=naming),
        simulation=SimulationConfig(devices=3, model=model, mig_devices=mig, faults=faults),
        collectors=MappingProxyType(dict.fromkeys(COLLECTORS, True)),
    )
    clock = FakeClock()
    driver = SimulatedDriver(config.simulation, clock=clock)
    uuids = [driver.uuid(i) for i in range(2)]
    if mig:
        uuids += [m.uuid for m in driver.mig_instances(0)]
    services = Services(SimulatedAttribution(driver, 0), OnePod(uuids))
    sampler = Sampler(config, driver, clock=clock, services=services)
    sampler.sample_once()
    # The XID arrives on the event thread, between samples.
    deadline = time.monotonic() + 5
    while not {"nvml_xid_last_code", "DCGM_FI_DEV_XID_ERRORS"} & names(sampler.sample_once()):
        assert time.monotonic() < deadline, "the simulated XID was never delivered"
        time.sleep(0.02)
    clock.advance(2)  # utilization comes from the driver's samples between two reads
    return names(sampler.sample_once())


def names(snapshot: Snapshot) -> set[str]:
    lines = (line for family in snapshot.families for line in family.lines)
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in lines}


def test_metrics_doc_is_generated_from_current_code() -> None:
    assert DOC.read_text() == render(), (
        "docs/metrics.md is stale: run `python -m exporter.metricsdoc > docs/metrics.md`"
    )


def test_doc_table_matches_the_specs() -> None:
    assert documented_in_file() == set(documented())


@pytest.mark.parametrize("spec", list(documented().values()), ids=lambda s: s.name)
def test_every_metric_follows_the_naming_rules(spec: MetricSpec) -> None:
    name, kind, unit = spec.name, spec.type, spec.unit
    assert re.fullmatch(r"[a-z][a-z0-9_]*", name)
    assert name.startswith(("nvml_", "process_"))
    assert name.endswith("_total") == (kind == "counter")
    if kind == "info":
        assert name.endswith("_info")
    if unit:
        assert f"_{unit}" in name, f"{name} should carry its unit {unit}"


def test_simulated_fleet_emits_exactly_the_documented_metrics() -> None:
    # An H200 has no fans; an L40S has one: together they cover every default collector.
    emitted = emitted_by_simulated_fleet("NVIDIA H200") | emitted_by_simulated_fleet("NVIDIA L40S")
    # The web security metrics need a web config file: tests/test_tls.py checks them.
    web = {spec.name for spec in WEB_METRICS}
    assert emitted == documented_in_file() - ONLY_FROM_THE_STAND_IN - web


def test_dcgm_mode_emits_only_documented_dcgm_fields() -> None:
    emitted = emitted_by_simulated_fleet("NVIDIA H200", "dcgm") | emitted_by_simulated_fleet(
        "NVIDIA L40S", "dcgm"
    )
    dcgm_names = {name for name in emitted if name.startswith("DCGM_")}
    assert dcgm_names, "dcgm mode emitted no DCGM fields"
    assert dcgm_names <= documented_dcgm()
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE"} <= dcgm_names
    # Everything else in dcgm mode is the exporter's own health and process metrics.
    others = emitted - dcgm_names
    health = {spec.name for spec in SELF_METRICS} | {spec.name for spec in PROCESS_METRICS}
    per_gpu_without_dcgm = {"nvml_host_processes_visible", "nvml_kubernetes_pod_resources_up"}
    assert (
        others - health
        <= {n for n, spec in documented().items() if not spec.per_device} | per_gpu_without_dcgm
    )
