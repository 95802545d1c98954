"""Attribute a host PID to its container and Kubernetes pod from /proc/<pid>/cgroup.

The container runtime leaves the container id in the cgroup path, and the kubelet the pod UID,
in shapes that depend on the cgroup driver (systemd or cgroupfs):

    /docker/<id>                                              Docker, cgroupfs
    /system.slice/docker-<id>.scope                           Docker, systemd
    /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<u_i_d>.slice/
        cri-containerd-<id>.scope                             containerd, systemd
    /kubepods.slice/kubepods-pod<u_i_d>.slice/crio-<id>.scope CRI-O, Guaranteed QoS
    /kubepods/besteffort/pod<u-i-d>/<id>                      any runtime, cgroupfs
    /machine.slice/libpod-<id>.scope/container                Podman

Components are read outermost first and the innermost container and pod win, so nesting (kind
runs Kubernetes nodes as Docker containers) resolves to the workload. A reader in a private
cgroup namespace sees paths relative to its own cgroup ("/../../kubepods-...-pod<u_i_d>.slice/
cri-containerd-<id>.scope"), which still name the container and, unless the process shares the
reader's pod, the pod.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_RUNTIMES = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "libpod": "podman",
}
# A systemd scope named after the runtime, or the same name without ".scope" under cgroupfs.
# The conmon monitors ("crio-conmon-<id>.scope", "libpod-conmon-<id>.scope") sit beside the
# container they watch; "conmon-" is not hex, so they never match and are not taken for it.
_RUNTIME_SCOPE = re.compile(r"(docker|cri-containerd|crio|libpod)-([0-9a-f]{12,})(?:\.scope)?")
# cgroupfs drivers name the container's cgroup by its bare id, which says nothing of the runtime.
_BARE_ID = re.compile(r"[0-9a-f]{64}")
# "pod<uid>" under cgroupfs; "kubepods[-<qos>]-pod<uid>.slice" under systemd, where dashes
# separate the slice hierarchy so the UID's own dashes become underscores.
_POD = re.compile(
    r"(?:.*-)?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
    r"(?:\.slice)?"
)


@dataclass(frozen=True)
class ContainerRef:
    container_id: str  # the container runtime's id (usually 64 hex chars); "" if not in a container
    pod_uid: str  # Kubernetes pod UID in canonical dashed form; "" when not under Kubernetes
    runtime: str  # "docker", "containerd", "cri-o", "podman", or "" when unknown / none


NO_CONTAINER = ContainerRef("", "", "")


def _parse_path(path: str) -> ContainerRef:
    container_id = pod_uid = runtime = ""
    parent = ""
    for component in path.split("/"):
        scope = _RUNTIME_SCOPE.fullmatch(component)
        pod = _POD.fullmatch(component)
        if scope:
            container_id, runtime = scope[2], _RUNTIMES[scope[1]]
        elif _BARE_ID.fullmatch(component):
            container_id, runtime = component, "docker" if parent == "docker" else ""
        elif pod:
            # A container seen further out is the node the pod runs on, not the pod's own.
            container_id, runtime = "", ""
            pod_uid = pod[1].replace("_", "-")
        parent = component
    return ContainerRef(container_id, pod_uid, runtime)


def _weight(ref: ContainerRef) -> tuple[bool, bool]:
    return ref.container_id != "", ref.pod_uid != ""


def parse_cgroup(text: str) -> ContainerRef:
    """From the contents of /proc/<pid>/cgroup."""
    refs = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        _, sep, path = rest.partition(":")
        if sep and hierarchy.isdigit() and path.startswith("/"):
            refs.append(_parse_path(path))
    # cgroup v2 has a single "0::<path>" line; v1 has one "<id>:<controllers>:<path>" line per
    # hierarchy, and not every hierarchy need carry the container (some stay at "/"), so the
    # line that says the most wins, the first one on a tie.
    return max(refs, key=_weight, default=NO_CONTAINER)


def _read(path: Path) -> str | None:
    try:
        # The kernel does not promise UTF-8 here (comm is whatever the process set).
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        # FileNotFoundError / ProcessLookupError: the process exited after NVML listed it;
        # PermissionError: hidepid or a /proc the exporter may not read. All mean "cannot tell".
        return None


def read_container(pid: int, proc_root: Path = Path("/proc")) -> ContainerRef | None:
    """None when /proc/<pid> is not visible (e.g. the exporter lacks host PID visibility) or
    unreadable."""
    text = _read(proc_root / str(pid) / "cgroup")
    return None if text is None else parse_cgroup(text)


def process_name(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """/proc/<pid>/comm stripped, None if not visible."""
    text = _read(proc_root / str(pid) / "comm")
    return None if text is None else text.strip()
