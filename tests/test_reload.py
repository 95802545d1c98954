"""SIGHUP applies what it can and says what it cannot: settings that build services (the pod
watcher, the process attribution) are rebuilt rather than ignored."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import MappingProxyType

from exporter.attribution import ProcAttribution
from exporter.cli import App, build_parser, load, make_services
from exporter.collectors import Services
from exporter.config import Config, SimulationConfig
from exporter.nvml.pynvml_driver import PynvmlDriver
from exporter.sampler import Sampler
from exporter.simulate.driver import SimulatedDriver
from exporter.snapshot import Format
from exporter.workload import Container


def app_for(config_file: Path) -> App:
    args = build_parser().parse_args(["--config.file", str(config_file)])
    config = load(args)
    driver = PynvmlDriver()  # never initialised here: nothing is sampled
    sampler = Sampler(config, driver, services=make_services(config, driver, None))
    return App(args, config, sampler, None, driver, None)


def attribution_root(app: App) -> Path:
    attribution = app.sampler.services.attribution
    assert isinstance(attribution, ProcAttribution)
    return attribution.root


def test_a_new_proc_root_is_applied_on_reload(tmp_path: Path) -> None:
    config = tmp_path / "exporter.yaml"
    config.write_text("collectors: {processes: true}\n")
    app = app_for(config)
    assert attribution_root(app) == Path("/proc")
    config.write_text(f"collectors: {{processes: true}}\nprocesses: {{proc_root: {tmp_path}}}\n")
    app.reload()
    assert attribution_root(app) == tmp_path
    assert app.sampler.reload_successful
    assert app.config.processes.proc_root == str(tmp_path)


def test_an_unchanged_proc_root_keeps_its_attribution(tmp_path: Path) -> None:
    config = tmp_path / "exporter.yaml"
    config.write_text("collectors: {processes: true}\n")
    app = app_for(config)
    before = app.sampler.services.attribution
    config.write_text("collectors: {processes: true}\nsampling: {interval: 2s}\n")
    app.reload()
    assert app.sampler.services.attribution is before
    assert app.config.sampling.interval == 2


class Hidden:
    """A /proc without the host's PIDs: no process is visible."""

    def process_name(self, pid: int) -> str | None:
        return None

    def container(self, pid: int) -> Container | None:
        return None


class Visible:
    def process_name(self, pid: int) -> str | None:
        return f"worker-{pid}"

    def container(self, pid: int) -> Container | None:
        return Container(container_id=f"c{pid}", pod_uid="")


def container_ids(sampler: Sampler) -> set[str]:
    body = sampler.sample_once().body(Format.TEXT, False).decode()
    series = re.findall(r"nvml_process_memory_used_bytes\{([^}]*)\}", body)
    assert series
    return {
        dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("container_id", "") for labels in series
    }


def test_processes_already_running_are_looked_up_again_through_new_services() -> None:
    config = dataclasses.replace(
        Config(),
        backend="simulated",
        simulation=SimulationConfig(devices=2),
        collectors=MappingProxyType({**Config().collectors, "processes": True}),
    )
    sampler = Sampler(config, SimulatedDriver(config.simulation), services=Services(Hidden()))
    assert container_ids(sampler) == {""}
    # As a reload that points processes.proc_root at the host's /proc would.
    sampler.reconfigure(config, Services(Visible()))
    assert all(found.startswith("c") for found in container_ids(sampler))
