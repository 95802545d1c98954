"""The collector registry: name -> class, and each collector's default on/off."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from exporter.collectors.base import Collector, Dcgm, Emitter, MetricSpec, Services
from exporter.collectors.clock_events import ClockEventsCollector
from exporter.collectors.clocks import ClocksCollector
from exporter.collectors.ecc import EccCollector
from exporter.collectors.events import EventsCollector
from exporter.collectors.gpm import GpmCollector
from exporter.collectors.info import InfoCollector
from exporter.collectors.kubernetes import KubernetesCollector
from exporter.collectors.memory import MemoryCollector
from exporter.collectors.mig import MigCollector
from exporter.collectors.modes import ModesCollector
from exporter.collectors.nvlink import NvlinkCollector
from exporter.collectors.pcie import PcieCollector
from exporter.collectors.power import PowerCollector
from exporter.collectors.processes import ProcessCountCollector, ProcessesCollector
from exporter.collectors.shared import SampleContext
from exporter.collectors.thermal import ThermalCollector
from exporter.collectors.utilization import UtilizationCollector
from exporter.collectors.video import VideoCollector

COLLECTORS: Mapping[str, type[Collector]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            InfoCollector,
            UtilizationCollector,
            MemoryCollector,
            PowerCollector,
            ThermalCollector,
            ClocksCollector,
            GpmCollector,
            ClockEventsCollector,
            PcieCollector,
            NvlinkCollector,
            EccCollector,
            VideoCollector,
            ModesCollector,
            ProcessCountCollector,
            ProcessesCollector,
            MigCollector,
            KubernetesCollector,
            EventsCollector,
        )
    }
)


def _check_order(collectors: Mapping[str, type[Collector]]) -> None:
    """Each collector after those whose per-sample results it reads (the sampler runs a GPU's
    collectors in this order)."""
    seen: set[str] = set()
    for name, cls in collectors.items():
        missing = [first for first in cls.after if first not in seen]
        if missing:
            raise RuntimeError(f"collector {name} must come after {', '.join(missing)}")
        seen.add(name)


_check_order(COLLECTORS)


def enabled_collectors(
    choices: Mapping[str, bool], registry: Mapping[str, type[Collector]] = COLLECTORS
) -> tuple[str, ...]:
    """The collectors of `registry` that run, in its order: each as the configuration's
    `choices` switch it, else as its default."""
    return tuple(name for name, cls in registry.items() if choices.get(name, cls.default_enabled))


__all__ = [
    "COLLECTORS",
    "Collector",
    "Dcgm",
    "Emitter",
    "MetricSpec",
    "SampleContext",
    "Services",
    "enabled_collectors",
]
