"""YAML configuration: parsed into frozen dataclasses, validated strictly.

Every error names the key path and the reason, so an operator can fix a file at 3 a.m. without
reading code. Validation happens before anything binds a port or touches NVML.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from exporter.validation import (
    ConfigError,
    InvalidValue,
    check_not_above,
    join_path,
    optional,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_mapping,
    parse_non_empty_string,
    parse_non_negative_duration,
    parse_positive_duration,
    parse_section,
    read_yaml,
    short_repr,
)

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
    # How often the counters a driver answers slowly are read (nvml.SLOW_FIELDS); 0: every
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


# --- the sections' parsers: each takes (value, path) and raises InvalidValue naming the path ---

_PORT = re.compile(r"[0-9]{1,5}")


def parse_listen_address(value: object, path: str) -> str:
    """Accepts `host:port`, `:port` (all interfaces) and `[v6]:port`; port 0 picks a free port."""
    text = parse_non_empty_string(value, path)
    host, sep, port = text.rpartition(":")
    # str.isdigit() also holds for digits int() refuses (`²`) and for strings too long for it.
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        raise InvalidValue(
            path, f"must be host:port with a port from 0 to 65535, got {short_repr(text)}"
        )
    if host.startswith("[") != host.endswith("]"):
        raise InvalidValue(path, f"has an unbalanced IPv6 bracket: {short_repr(text)}")
    if ":" in host and not host.startswith("["):
        raise InvalidValue(
            path, f"IPv6 hosts must be bracketed, e.g. [::1]:{port}, got {short_repr(text)}"
        )
    return text


def split_listen_address(address: str) -> tuple[str | None, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return (host or None), int(port)


def _parse_interval(value: object, path: str) -> float:
    return parse_positive_duration(value, path, minimum=0.05, maximum=3600)


def _parse_slow_fields_interval(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if not 0 <= seconds <= 300:
        raise InvalidValue(path, f"must be between 0s and 300s, got {value!r}")
    return seconds


def _parse_web(raw: object, path: str) -> WebConfig:
    return parse_section(
        WebConfig,
        raw,
        path,
        {
            "listen_address": parse_listen_address,
            "max_requests": lambda v, p: parse_int(v, p, minimum=1, maximum=10_000),
            "read_timeout": lambda v, p: parse_positive_duration(v, p, minimum=0.1, maximum=600),
            "idle_timeout": lambda v, p: parse_positive_duration(v, p, minimum=0.1, maximum=3600),
            "max_connections": lambda v, p: parse_int(v, p, minimum=1, maximum=100_000),
            "config_file": optional(parse_non_empty_string),
            "health_without_auth": parse_bool,
        },
    )


def _parse_sampling(raw: object, path: str) -> SamplingConfig:
    sampling = parse_section(
        SamplingConfig,
        raw,
        path,
        {
            "interval": _parse_interval,
            "timeout": optional(
                lambda v, p: parse_positive_duration(v, p, minimum=0.01, maximum=3600)
            ),
            "slow_fields_interval": _parse_slow_fields_interval,
        },
    )
    if sampling.timeout is not None:
        check_not_above(path, "timeout", sampling.timeout, "interval", sampling.interval, "s")
    return sampling


def _parse_log(raw: object, path: str) -> LogConfig:
    return parse_section(
        LogConfig,
        raw,
        path,
        {
            "level": lambda v, p: parse_choice(v, p, LOG_LEVELS),
            "format": lambda v, p: parse_choice(v, p, LOG_FORMATS),
        },
    )


def _device_refs(raw: object, path: str) -> tuple[DeviceRef, ...]:
    if raw is None or raw == "all":
        return ()
    if not isinstance(raw, list) or not raw:
        raise InvalidValue(
            path,
            "must be `all` or a non-empty list of indexes, UUIDs or PCI bus ids, "
            f"got {short_repr(raw)}",
        )
    refs: list[DeviceRef] = []
    for i, item in enumerate(raw):
        item_path = f"{path}[{i}]"
        if isinstance(item, str) and (item.startswith(("GPU-", "MIG-")) or pci_key(item)):
            refs.append(item)
        elif isinstance(item, str):
            raise InvalidValue(
                item_path, f"must be an index, a UUID or a PCI bus id, got {short_repr(item)}"
            )
        else:
            refs.append(parse_int(item, item_path, minimum=0, maximum=1023))
    if len(set(refs)) != len(refs):
        raise InvalidValue(path, "lists a device twice")
    return tuple(refs)


def _parse_devices(raw: object, path: str) -> DeviceSelection:
    """`all`, a list (shorthand for `include`), or a mapping with `include` and `exclude`."""
    if isinstance(raw, dict):
        return parse_section(
            DeviceSelection, raw, path, {"include": _device_refs, "exclude": _device_refs}
        )
    return DeviceSelection(include=_device_refs(raw, path))


def _parse_collectors(raw: object, path: str, names: tuple[str, ...]) -> Mapping[str, bool]:
    data = parse_mapping(raw, path, names)
    return MappingProxyType(
        {name: parse_bool(on, join_path(path, name)) for name, on in data.items()}
    )


def _parse_fault(raw: object, path: str, device_calls: tuple[str, ...]) -> FaultConfig:
    if raw is None or (isinstance(raw, dict) and "kind" not in raw):
        raise InvalidValue(
            join_path(path, "kind"), f"is required (one of {', '.join(FAULT_KINDS)})"
        )
    fault = parse_section(
        FaultConfig,
        raw,
        path,
        {
            "kind": lambda v, p: parse_choice(v, p, FAULT_KINDS),
            "device": optional(lambda v, p: parse_int(v, p, minimum=0, maximum=1023)),
            "function": optional(lambda v, p: parse_choice(v, p, device_calls)),
            "start": parse_non_negative_duration,
            "duration": optional(
                lambda v, p: parse_positive_duration(v, p, minimum=0.001, maximum=10**7)
            ),
            "delay": lambda v, p: parse_positive_duration(v, p, minimum=0.001, maximum=3600),
            "xid": lambda v, p: parse_int(v, p, minimum=1, maximum=1000),
        },
    )
    if fault.kind == "xid" and (fault.xid is None or fault.device is None):
        missing = "xid" if fault.xid is None else "device"
        raise InvalidValue(join_path(path, missing), "is required for an `xid` fault")
    if fault.kind == "slow" and fault.delay <= 0:
        raise InvalidValue(join_path(path, "delay"), "is required for a `slow` fault")
    return fault


def _parse_faults(raw: object, path: str, device_calls: tuple[str, ...]) -> tuple[FaultConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidValue(path, f"must be a list, got {type(raw).__name__}")
    return tuple(_parse_fault(item, f"{path}[{i}]", device_calls) for i, item in enumerate(raw))


def _model(value: object, path: str) -> str:
    from exporter.simulate import MODELS

    return parse_choice(value, path, tuple(MODELS))


def _parse_simulation(raw: object, path: str, device_calls: tuple[str, ...]) -> SimulationConfig:
    simulation = parse_section(
        SimulationConfig,
        raw,
        path,
        {
            "devices": lambda v, p: parse_int(v, p, minimum=1, maximum=64),
            "model": _model,
            "seed": lambda v, p: parse_int(v, p, minimum=0, maximum=2**31),
            "processes_per_device": lambda v, p: parse_int(v, p, minimum=0, maximum=1000),
            "mig_devices": lambda v, p: parse_int(v, p, minimum=0, maximum=64),
            "faults": lambda v, p: _parse_faults(v, p, device_calls),
        },
    )
    _check_simulation(simulation, path)
    return simulation


def _check_simulation(simulation: SimulationConfig, path: str) -> None:
    """What holds between the simulation's keys; checked again when --simulate N sets the
    number of devices."""
    if simulation.mig_devices:
        from exporter.simulate import MODELS

        if not MODELS[simulation.model].mig_profile:
            raise InvalidValue(f"{path}.mig_devices", f"{simulation.model} does not support MIG")
    check_not_above(path, "mig_devices", simulation.mig_devices, "devices", simulation.devices)
    for i, fault in enumerate(simulation.faults):
        if fault.device is not None and fault.device >= simulation.devices:
            raise InvalidValue(
                f"{path}.faults[{i}].device",
                f"must be below simulation.devices ({simulation.devices}), got {fault.device}",
            )


def _parse_processes(raw: object, path: str) -> ProcessesConfig:
    return parse_section(
        ProcessesConfig,
        raw,
        path,
        {
            "max_per_device": lambda v, p: parse_int(v, p, minimum=1, maximum=10_000),
            "proc_root": parse_non_empty_string,
        },
    )


def _parse_dcgm(raw: object, path: str) -> DcgmConfig:
    return parse_section(
        DcgmConfig,
        raw,
        path,
        {"hostname_label": lambda v, p: parse_choice(v, p, DCGM_HOSTNAME_LABELS)},
    )


def _parse_kubernetes(raw: object, path: str) -> KubernetesConfig:
    kubernetes = parse_section(
        KubernetesConfig,
        raw,
        path,
        {
            "enabled": parse_bool,
            "socket": parse_non_empty_string,
            "interval": lambda v, p: parse_positive_duration(v, p, minimum=1, maximum=3600),
            "timeout": lambda v, p: parse_positive_duration(v, p, minimum=0.01, maximum=60),
        },
    )
    check_not_above(path, "timeout", kubernetes.timeout, "interval", kubernetes.interval, "s")
    return kubernetes


def _sections(known: KnownNames) -> Mapping[str, Callable[[object, str], Any]]:
    """The top-level keys' parsers, in the order an error lists the keys."""
    return {
        "backend": lambda v, p: parse_choice(v, p, BACKENDS),
        "naming": lambda v, p: parse_choice(v, p, NAMINGS),
        "web": _parse_web,
        "sampling": _parse_sampling,
        "log": _parse_log,
        "devices": _parse_devices,
        "collectors": lambda v, p: _parse_collectors(v, p, known.collectors),
        "simulation": lambda v, p: _parse_simulation(v, p, known.device_calls),
        "processes": _parse_processes,
        "kubernetes": _parse_kubernetes,
        "dcgm": _parse_dcgm,
    }


def parse_config(raw: object, source: str = "<config>", *, known: KnownNames) -> Config:
    """Validates an already-loaded YAML document."""
    sections = _sections(known)
    try:
        data = parse_mapping(raw, "", tuple(sections))
        values = {key: sections[key](data[key], key) for key in data}
    except InvalidValue as err:
        raise ConfigError(f"{source}: {err}") from None
    return Config(source=source, **values)


def load_config(path: str | None, *, known: KnownNames) -> Config:
    """Reads and validates a YAML file; no path means the built-in defaults."""
    if path is None:
        return Config()
    raw = read_yaml(path)
    return parse_config({} if raw is None else raw, path, known=known)


def apply_overrides(config: Config, overrides: Overrides) -> Config:
    """Applies command-line flags on top of the file, validating them the same way."""
    try:
        web, sampling, log = config.web, config.sampling, config.log
        if overrides.listen_address is not None:
            web = dataclasses.replace(
                web,
                listen_address=parse_listen_address(
                    overrides.listen_address, "--web.listen-address"
                ),
            )
        if overrides.web_config_file is not None:
            web = dataclasses.replace(
                web,
                config_file=parse_non_empty_string(overrides.web_config_file, "--web.config.file"),
            )
        if overrides.max_requests is not None:
            web = dataclasses.replace(
                web,
                max_requests=parse_int(
                    overrides.max_requests, "--web.max-requests", minimum=1, maximum=10_000
                ),
            )
        if overrides.interval is not None:
            interval = _parse_interval(overrides.interval, "--sampling.interval")
            timeout = sampling.timeout
            if timeout is not None and timeout > interval:
                timeout = None
            sampling = dataclasses.replace(sampling, interval=interval, timeout=timeout)
        if overrides.log_level is not None:
            log = dataclasses.replace(
                log, level=parse_choice(overrides.log_level, "--log.level", LOG_LEVELS)
            )
        if overrides.log_format is not None:
            log = dataclasses.replace(
                log, format=parse_choice(overrides.log_format, "--log.format", LOG_FORMATS)
            )
    except InvalidValue as err:
        raise ConfigError(str(err)) from None
    naming = config.naming
    if overrides.naming is not None:
        try:
            naming = parse_choice(overrides.naming, "--naming", NAMINGS)
        except InvalidValue as err:
            raise ConfigError(str(err)) from None
    backend, simulation = config.backend, config.simulation
    if overrides.simulate is not None:
        backend = "simulated"
        simulation = dataclasses.replace(simulation, devices=overrides.simulate)
        try:
            _check_simulation(simulation, "simulation")
        except InvalidValue as err:
            raise ConfigError(
                f"{config.source}: {err} (with --simulate {overrides.simulate})"
            ) from None
    collectors = MappingProxyType({**config.collectors, **overrides.collectors})
    return dataclasses.replace(
        config,
        web=web,
        sampling=sampling,
        log=log,
        naming=naming,
        backend=backend,
        simulation=simulation,
        collectors=collectors,
    )
