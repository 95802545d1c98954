"""Processes, containers and MIG through the real pynvml path against the stand-in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nvml_stub
import pytest
from conftest import ExporterProcess, Scrape, start_exporter

pytestmark = pytest.mark.slow

CONTAINER = "3f4c2b1a" * 8
POD_UID = "0a1b2c3d-1111-2222-3333-444455556666"


def fake_proc(root: Path, fleet: nvml_stub.Fleet) -> None:
    """A host /proc with every stand-in process, each in its own containerd container."""
    for dev in fleet.devices:
        for process in dev.processes:
            pid_dir = root / str(process.pid)
            pid_dir.mkdir(parents=True)
            (pid_dir / "comm").write_text(f"proc{process.pid}\n")
            slice_uid = POD_UID.replace("-", "_")
            (pid_dir / "cgroup").write_text(
                "0::/kubepods.slice/kubepods-burstable.slice/"
                f"kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{CONTAINER}.scope\n"
            )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[nvml_stub.Fleet]:
    (tmp_path / "stub").mkdir()
    with nvml_stub.Fleet(tmp_path / "stub", num_devices=3) as stub:
        yield stub


def start(fleet: nvml_stub.Fleet, tmp_path: Path, extra: str = "") -> ExporterProcess:
    proc_root = tmp_path / "proc"
    fake_proc(proc_root, fleet)
    config = tmp_path / "exporter.yaml"
    config.write_text(
        "sampling: {interval: 200ms}\n"
        "collectors: {processes: true}\n"
        f"processes: {{proc_root: {proc_root}{extra}}}\n"
    )
    return start_exporter(["--config.file", str(config)], env=fleet.env())


def series(scrape: Scrape, name: str) -> list[dict[str, str]]:
    return [dict(labels) for labels in scrape.values(name)]


def test_per_process_series_equal_the_stand_in_and_name_the_container(
    fleet: nvml_stub.Fleet, tmp_path: Path, running: list[ExporterProcess]
) -> None:
    proc = start(fleet, tmp_path)
    running.append(proc)
    time.sleep(0.5)  # a few samples: values must hold while the driver has no newer samples
    scrape = proc.get()
    memory = {
        (labels["gpu"], labels["pid"]): (labels, value)
        for labels, value in (
            (dict(k), v) for k, v in scrape.values("nvml_process_memory_used_bytes").items()
        )
    }
    expected = {(str(dev.index), str(p.pid)): p for dev in fleet.devices for p in dev.processes}
    assert set(memory) == set(expected)
    for key, process in expected.items():
        labels, value = memory[key]
        assert value == process.used_gpu_memory
        assert labels["process_name"] == f"proc{process.pid}"
        assert labels["type"] == process.kind
        assert (labels["container_id"], labels["pod_uid"]) == (CONTAINER, POD_UID)
    sm = {
        (dict(k)["gpu"], dict(k)["pid"]): v
        for k, v in scrape.values("nvml_process_sm_utilization_ratio").items()
    }
    for dev in fleet.devices:
        for process in dev.processes:
            own = [s for s in dev.process_samples if s.pid == process.pid]
            expected_sm = sum(s.sm_util for s in own) / len(own) / 100 if own else 0.0
            assert sm[(str(dev.index), str(process.pid))] == pytest.approx(expected_sm)
    counts = {
        dict(k)["gpu"]: v
        for k, v in scrape.values("nvml_processes").items()
        if dict(k)["type"] == "compute"
    }
    assert counts == {
        str(d.index): float(sum(p.kind == "compute" for p in d.processes)) for d in fleet.devices
    }
    assert scrape.values("nvml_host_processes_visible") == {frozenset(): 1.0}


def test_a_process_that_exits_disappears_at_the_next_sample(
    fleet: nvml_stub.Fleet, tmp_path: Path, running: list[ExporterProcess]
) -> None:
    proc = start(fleet, tmp_path)
    running.append(proc)
    gone = fleet.devices[0].processes[0].pid
    assert str(gone) in {lab["pid"] for lab in series(proc.get(), "nvml_process_memory_used_bytes")}
    fleet.devices[0].processes = fleet.devices[0].processes[1:]
    fleet.apply()
    proc.wait_for(
        lambda: (
            str(gone)
            not in {lab["pid"] for lab in series(proc.get(), "nvml_process_sm_utilization_ratio")}
        )
    )
    pids = {lab["pid"] for lab in series(proc.get(), "nvml_process_memory_used_bytes")}
    assert str(gone) not in pids and len(pids) == sum(len(d.processes) for d in fleet.devices)


def test_the_cap_bounds_series_and_counts_what_it_drops(
    fleet: nvml_stub.Fleet, tmp_path: Path, running: list[ExporterProcess]
) -> None:
    dev = fleet.devices[1]
    dev.processes = [
        nvml_stub.Process(pid=7000 + k, used_gpu_memory=(k + 1) * 1024**3) for k in range(6)
    ]
    dev.memory_used = sum(p.used_gpu_memory for p in dev.processes)
    fleet.apply()
    proc = start(fleet, tmp_path, extra=", max_per_device: 4")
    running.append(proc)
    scrape = proc.get()
    kept = {
        lab["pid"] for lab in series(scrape, "nvml_process_memory_used_bytes") if lab["gpu"] == "1"
    }
    assert kept == {str(7000 + k) for k in (2, 3, 4, 5)}  # the four largest
    dropped = {dict(k)["gpu"]: v for k, v in scrape.values("nvml_process_series_dropped").items()}
    assert dropped["1"] == 2 and dropped["0"] == 0


def test_mig_instances_are_exported_with_their_own_uuid_and_memory(
    fleet: nvml_stub.Fleet, tmp_path: Path, running: list[ExporterProcess]
) -> None:
    fleet.devices[2].enable_mig(3)
    fleet.apply()
    proc = start(fleet, tmp_path)
    running.append(proc)
    scrape = proc.get()
    info = series(scrape, "nvml_mig_info")
    expected = {m.uuid: m for m in fleet.devices[2].mig_devices}
    assert {lab["mig_uuid"] for lab in info} == set(expected)
    assert {lab["gpu"] for lab in info} == {"2"}
    for labels_set, used in scrape.values("nvml_mig_memory_used_bytes").items():
        labels = dict(labels_set)
        mig = expected[labels["mig_uuid"]]
        assert used == mig.memory_used
        assert labels["gpu_instance"] == str(mig.gpu_instance_id)
        assert labels["mig_profile"] == mig.name.rsplit(" MIG ", 1)[1]
    assert scrape.values("nvml_mig_memory_total_bytes")
    # The whole GPU keeps its own series.
    assert {dict(k)["gpu"] for k in scrape.values("nvml_memory_used_bytes")} == {"0", "1", "2"}


def test_mig_repartitioned_at_run_time_is_picked_up_without_restart(
    fleet: nvml_stub.Fleet, tmp_path: Path, running: list[ExporterProcess]
) -> None:
    proc = start(fleet, tmp_path)
    running.append(proc)
    assert series(proc.get(), "nvml_mig_info") == []
    fleet.devices[0].enable_mig(2)
    fleet.apply()
    proc.wait_for(lambda: len(series(proc.get(), "nvml_mig_info")) == 2, timeout=45)
