"""Per-process, per-container and per-MIG-instance series on the simulated fleet."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import MappingProxyType

import pytest
from fakes import FakeClock
from prometheus_client.parser import text_string_to_metric_families

from exporter.attribution import ProcAttribution
from exporter.collectors import COLLECTORS, Services
from exporter.config import Config, ProcessesConfig, SimulationConfig
from exporter.sampler import Sampler
from exporter.simulate.attribution import SimulatedAttribution
from exporter.simulate.driver import SimulatedDriver
from exporter.snapshot import Format
from exporter.workload import Attribution

Series = list[tuple[dict[str, str], float]]


def sampler(
    processes: int = 2,
    mig_devices: int = 0,
    limit: int = 32,
    attribution: Attribution | None = None,
) -> tuple[Sampler, SimulatedDriver, FakeClock]:
    config = dataclasses.replace(
        Config(backend="simulated"),
        simulation=SimulationConfig(
            devices=2, processes_per_device=processes, mig_devices=mig_devices
        ),
        processes=ProcessesConfig(max_per_device=limit),
        collectors=MappingProxyType(dict.fromkeys(COLLECTORS, True)),
    )
    clock = FakeClock()
    driver = SimulatedDriver(config.simulation, clock=clock)
    services = Services(attribution=attribution or SimulatedAttribution(driver, 0))
    return Sampler(config, driver, clock=clock, services=services), driver, clock


def scrape(s: Sampler, clock: FakeClock) -> dict[str, Series]:
    s.sample_once()
    clock.advance(2)
    text = s.sample_once().body(Format.TEXT, False).decode()
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def test_process_count_per_gpu_and_type() -> None:
    s, _, clock = sampler(processes=3)
    counts = {(lab["gpu"], lab["type"]): v for lab, v in scrape(s, clock)["nvml_processes"]}
    assert counts == {
        ("0", "compute"): 3,
        ("1", "compute"): 3,
        ("0", "graphics"): 0,
        ("1", "graphics"): 0,
    }


def test_per_process_series_carry_name_container_and_memory() -> None:
    s, driver, clock = sampler(processes=2)
    found = scrape(s, clock)
    memory = found["nvml_process_memory_used_bytes"]
    assert len(memory) == 4
    reported = {p.pid: p.used_memory for p in driver.compute_processes(0)}
    reported |= {p.pid: p.used_memory for p in driver.compute_processes(1)}
    attribution = SimulatedAttribution(driver, 0)
    for labels, used in memory:
        pid = int(labels["pid"])
        assert used == reported[pid]
        assert labels["process_name"] == driver.process_name(pid)
        container = attribution.container(pid)
        assert container is not None
        assert labels["container_id"] == container.container_id
        assert labels["pod_uid"] == container.pod_uid
        assert labels["type"] == "compute"
        assert labels["gpu_instance"] == labels["compute_instance"] == ""
    for name in ("nvml_process_sm_utilization_ratio", "nvml_process_memory_utilization_ratio"):
        assert len(found[name]) == 4 and all(0 <= v <= 1 for _, v in found[name])
    assert found["nvml_host_processes_visible"] == [({}, 1.0)]


def test_cardinality_cap_keeps_the_largest_and_counts_the_rest() -> None:
    s, driver, clock = sampler(processes=5, limit=2)
    found = scrape(s, clock)
    for gpu in (0, 1):
        kept = {
            int(lab["pid"])
            for lab, _ in found["nvml_process_memory_used_bytes"]
            if lab["gpu"] == str(gpu)
        }
        by_size = sorted(driver.compute_processes(gpu), key=lambda p: -(p.used_memory or 0))
        assert kept == {p.pid for p in by_size[:2]}
    dropped = {lab["gpu"]: v for lab, v in found["nvml_process_series_dropped"]}
    assert dropped == {"0": 3, "1": 3}


def test_mig_instances_have_their_own_series_and_the_gpu_keeps_its_own() -> None:
    s, _, clock = sampler(mig_devices=1)
    found = scrape(s, clock)
    info = [lab for lab, _ in found["nvml_mig_info"]]
    assert len(info) == 7 and {lab["gpu"] for lab in info} == {"0"}
    assert {lab["mig_profile"] for lab in info} == {"1g.18gb"}
    assert all(lab["mig_uuid"].startswith("MIG-") for lab in info)
    totals = {lab["mig_uuid"]: v for lab, v in found["nvml_mig_memory_total_bytes"]}
    used = {lab["mig_uuid"]: v for lab, v in found["nvml_mig_memory_used_bytes"]}
    assert all(0 < used[u] <= totals[u] for u in totals)
    assert {v for _, v in found["nvml_mig_processes"]} == {1.0}
    gpu0_processes = [
        lab for lab, _ in found["nvml_process_memory_used_bytes"] if lab["gpu"] == "0"
    ]
    assert sorted(int(lab["gpu_instance"]) for lab in gpu0_processes) == [7, 8, 9, 11, 12, 13, 14]
    # Whole-GPU series are still there for both GPUs.
    assert len(found["nvml_memory_used_bytes"]) == 2


def test_without_host_pid_visibility_processes_are_unnamed_and_it_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s, _, clock = sampler(attribution=ProcAttribution(str(tmp_path)))
    with caplog.at_level(logging.WARNING):
        found = scrape(s, clock)
        s.sample_once()
    assert found["nvml_host_processes_visible"] == [({}, 0.0)]
    assert all(lab["container_id"] == "" for lab, _ in found["nvml_process_memory_used_bytes"])
    # NVML still names them, and the GPU-level data is all there.
    assert all(lab["process_name"] for lab, _ in found["nvml_process_memory_used_bytes"])
    assert len(found["nvml_power_watts"]) == 2
    assert len([r for r in caplog.records if "host's process IDs" in r.message]) == 1
