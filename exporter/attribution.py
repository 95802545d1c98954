"""What collectors learn besides NVML: process names and containers from the host's /proc
(needs host PID visibility), pods from the kubelet."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from exporter import cgroups
from exporter.podresources import PodAssignment, PodResourcesWatcher
from exporter.workload import Container, Pod


class ProcAttribution:
    def __init__(self, proc_root: str = "/proc") -> None:
        self.root = Path(proc_root)

    def process_name(self, pid: int) -> str | None:
        return cgroups.process_name(pid, self.root)

    def container(self, pid: int) -> Container | None:
        ref = cgroups.read_container(pid, self.root)
        if ref is None:
            return None
        return Container(container_id=ref.container_id, pod_uid=ref.pod_uid)


class KubeletPods:
    """`PodSource` over the pod-resources watcher: its cached mapping, as collector `Pod`s."""

    def __init__(self, watcher: PodResourcesWatcher) -> None:
        self._watcher = watcher
        self._source: Mapping[str, tuple[PodAssignment, ...]] | None = None
        self._pods: Mapping[str, tuple[Pod, ...]] = {}

    def pods(self) -> Mapping[str, tuple[Pod, ...]]:
        source = self._watcher.assignments()
        # The watcher replaces its mapping whole on each poll; convert once per poll.
        if source is not self._source:
            self._pods = {
                key: tuple(Pod(a.namespace, a.pod, a.container) for a in assignments)
                for key, assignments in source.items()
            }
            self._source = source
        return self._pods

    def status(self) -> tuple[bool, float | None, int]:
        return self._watcher.up, self._watcher.last_success, self._watcher.errors
