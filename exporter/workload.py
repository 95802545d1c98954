"""Who a GPU process belongs to: its container, and the pod the kubelet gave its GPU to.

The types the collectors read and the sources that fill them (the host's /proc and the kubelet
in `exporter.attribution`, the simulated fleet) share; nothing here reads anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Container:
    """Where a process runs, as far as its cgroup tells."""

    container_id: str = ""
    pod_uid: str = ""


@dataclass(frozen=True)
class Pod:
    """Who the kubelet allocated a GPU (or MIG device) to."""

    namespace: str
    pod: str
    container: str


class Attribution(Protocol):
    """Names and containers of GPU processes: from the host's /proc, or the simulated fleet."""

    def process_name(self, pid: int) -> str | None: ...
    def container(self, pid: int) -> Container | None: ...  # None: the PID is not visible


class PodSource(Protocol):
    """The kubelet's device allocations, cached; never blocks."""

    def pods(self) -> Mapping[str, tuple[Pod, ...]]: ...  # GPU or MIG UUID -> pods
    def status(self) -> tuple[bool, float | None, int]: ...  # up, last success, errors
