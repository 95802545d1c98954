"""The configuration's shape: frozen dataclasses holding the documented defaults, so that a
`Config()` built in Python needs nothing else. Files and flags are read into them by `parsing`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_PORT = 9471
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")
BACKENDS = ("nvml", "simulated")
NAMINGS = ("nvml", "dcgm")
FAULT_KINDS = ("lost", "unsupported", "slow", "init_failure", "xid")


@dataclass(frozen=True)
class WebConfig:
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    # Beyond this many requests in flight the server answers 503 instead of queueing.
    max_requests: int = 40
    # Time a client gets to send a complete request head; guards against slow clients.
    read_timeout: float = 10.0
    # Idle keep-alive connections are closed after this long.
    idle_timeout: float = 60.0
    # Open connections beyond this are closed at once; bounds memory and file descriptors.
    max_connections: int = 512
    # exporter-toolkit web configuration: TLS, client certificates, basic auth, headers.
    config_file: str | None = None
    # Serve /healthz and /readyz without authentication, for kubelet probes.
    health_without_auth: bool = False


@dataclass(frozen=True)
class SamplingConfig:
    interval: float = 1.0
    # Deadline for reading all devices in one sample; None means "the interval".
    timeout: float | None = None
    # How often the counters a driver answers slowly are read (rows marked slow); 0: every
    # sample.
    slow_fields_interval: float = 10.0

    @property
    def deadline(self) -> float:
        return self.timeout if self.timeout is not None else self.interval


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "logfmt"


@dataclass(frozen=True)
class FaultConfig:
    """A fault the simulated backend injects, for demos and fault-handling tests."""

    kind: str
    device: int | None = None  # None: every device (or the library, for init_failure)
    function: str | None = None  # for `unsupported` and `slow`; None means every function
    start: float = 0.0  # seconds after the simulation starts
    duration: float | None = None  # None: until the process ends
    delay: float = 0.0  # for `slow`
    xid: int | None = None  # for `xid`: the XID reported once at `start`


@dataclass(frozen=True)
class SimulationConfig:
    devices: int = 8
    model: str = "NVIDIA H200"
    seed: int = 0
    processes_per_device: int = 2
    # The first this many GPUs run in MIG mode, split into seven 1g instances.
    mig_devices: int = 0
    faults: tuple[FaultConfig, ...] = ()


# dcgm-exporter's released versions spell its host label `Hostname`; its main branch renamed it
# `hostname` (dcgm-exporter #655). Dashboards and alerts written for the releases use the first.
DCGM_HOSTNAME_LABELS = ("Hostname", "hostname")


@dataclass(frozen=True)
class DcgmConfig:
    """How `naming: dcgm` spells what differs between dcgm-exporter versions."""

    hostname_label: str = DCGM_HOSTNAME_LABELS[0]


@dataclass(frozen=True)
class ProcessesConfig:
    # Per-process series on one GPU beyond this are dropped, smallest memory first.
    max_per_device: int = 32
    # Where the host's /proc is visible (e.g. /host/proc when mounted into a container).
    proc_root: str = "/proc"


@dataclass(frozen=True)
class KubernetesConfig:
    enabled: bool = False
    socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    interval: float = 10.0
    timeout: float = 2.0


DeviceRef = int | str  # an NVML index, a UUID, or a PCI bus id


@dataclass(frozen=True)
class DeviceSelection:
    """Which GPUs to export: those matching `include` (all when empty) and not `exclude`."""

    include: tuple[DeviceRef, ...] = ()
    exclude: tuple[DeviceRef, ...] = ()

    def selects(self, index: int, uuid: str, pci_bus_id: str) -> bool:
        def matches(refs: tuple[DeviceRef, ...]) -> bool:
            pci = pci_key(pci_bus_id)
            return any(
                ref in (index, uuid) or (isinstance(ref, str) and pci_key(ref) == pci)
                for ref in refs
            )

        return (not self.include or matches(self.include)) and not matches(self.exclude)


def pci_key(bus_id: str) -> tuple[int, int, int, int] | None:
    """`00000000:18:00.0`, `0000:18:00.0` and `18:00.0` name the same device."""
    text = bus_id.strip().lower()
    parts = text.split(":")
    if len(parts) == 2:
        parts.insert(0, "0")
    if len(parts) != 3 or "." not in parts[2]:
        return None
    device, _, function = parts[2].partition(".")
    try:
        return int(parts[0], 16), int(parts[1], 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    backend: str = "nvml"
    naming: str = "nvml"
    web: WebConfig = field(default_factory=WebConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    log: LogConfig = field(default_factory=LogConfig)
    devices: DeviceSelection = field(default_factory=DeviceSelection)
    # The collectors the file or the flags switch on or off; the others keep their defaults,
    # which only the collector registry knows (exporter.collectors.enabled_collectors).
    collectors: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    processes: ProcessesConfig = field(default_factory=ProcessesConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    dcgm: DcgmConfig = field(default_factory=DcgmConfig)


@dataclass(frozen=True)
class KnownNames:
    """Names a file may use that the layers above the configuration define: whoever parses a
    file hands them in, so that an unknown name is refused with its key path before anything
    starts, and the configuration imports none of those layers."""

    collectors: tuple[str, ...]  # in the order an error lists them
    device_calls: tuple[str, ...]  # the per-device driver calls a simulated fault may target


@dataclass(frozen=True)
class Overrides:
    """Command-line flags; each one that is set wins over the file."""

    listen_address: str | None = None
    web_config_file: str | None = None
    max_requests: int | None = None
    log_level: str | None = None
    log_format: str | None = None
    interval: str | None = None
    naming: str | None = None
    simulate: int | None = None
    collectors: Mapping[str, bool] = field(default_factory=dict)


def split_listen_address(address: str) -> tuple[str | None, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return (host or None), int(port)
