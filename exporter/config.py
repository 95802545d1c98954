"""YAML configuration: parsed into frozen dataclasses, validated strictly.

Every error names the key path and the reason, so an operator can fix a file at 3 a.m. without
reading code. Validation happens before anything binds a port or touches NVML.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import stat
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from exporter.collectors import COLLECTOR_DEFAULTS

DEFAULT_PORT = 9471
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")
BACKENDS = ("nvml", "simulated")
NAMINGS = ("nvml", "dcgm")
FAULT_KINDS = ("lost", "unsupported", "slow", "init_failure", "xid")

# Configuration files are a few kilobytes; the cap keeps a hostile or mistaken file (a log, a
# device) from stalling start-up or a SIGHUP reload in the pure-Python YAML parser.
MAX_CONFIG_BYTES = 1 << 20
# Errors end up on one log line and on a terminal; neither should receive megabytes.
MAX_MESSAGE_CHARS = 1000
# Values echoed back in an error (`got ...`): enough to recognise, never the whole value.
MAX_VALUE_CHARS = 80
# No configuration nests deeper than a handful of levels; the composer and constructor recurse.
MAX_YAML_DEPTH = 32
# The pure-Python parser is slow per token: a file within MAX_CONFIG_BYTES but dense with tiny
# nodes (`[1,1,1,...]`) would still stall a reload for seconds. Real files have a few hundred.
MAX_YAML_NODES = 10_000


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = MAX_VALUE_CHARS
        self.maxother = MAX_VALUE_CHARS
        self.maxlong = MAX_VALUE_CHARS

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int past sys.get_int_max_str_digits() raises instead of answering.
        if x.bit_length() > 4 * MAX_VALUE_CHARS:
            return f"<{x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


def short_repr(value: object) -> str:
    """repr() for error messages: bounded in length and in the work done, whatever the value."""
    return _cap(_SHORT_REPR.repr(value), MAX_VALUE_CHARS)


class ConfigError(Exception):
    """A configuration problem, already phrased as `source: key.path: reason`."""

    def __init__(self, message: str) -> None:
        super().__init__(_cap(message, MAX_MESSAGE_CHARS))


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
    collectors: Mapping[str, bool] = field(
        default_factory=lambda: MappingProxyType(dict(COLLECTOR_DEFAULTS))
    )
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    processes: ProcessesConfig = field(default_factory=ProcessesConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    dcgm: DcgmConfig = field(default_factory=DcgmConfig)

    def enabled_collectors(self) -> tuple[str, ...]:
        return tuple(name for name, on in self.collectors.items() if on)


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


# --- value parsers: each takes (value, path) and raises ConfigError naming the path -------------

T = TypeVar("T")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PORT = re.compile(r"[0-9]{1,5}")


class _Invalid(Exception):
    """A value that fails validation; also raised by exporter.webconfig."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path


def _seconds(value: object) -> float | None:
    """Seconds, possibly infinite or NaN; None when `value` is no duration at all."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.removeprefix("-")
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    return None


def parse_duration(value: object, path: str) -> float:
    """Seconds from a number or a Prometheus-style duration such as `500ms`, `1m30s`."""
    seconds = _seconds(value)
    if seconds is None:
        raise _Invalid(path, f"must be a duration like 1s or 500ms, got {short_repr(value)}")
    # NaN slips through every range check below (all comparisons are false), and YAML spells
    # it `.nan`; infinity would overflow the sleeps and deadlines computed from it.
    if not math.isfinite(seconds):
        raise _Invalid(path, f"must be a finite duration, got {short_repr(value)}")
    return seconds


def _not_negative_duration(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds < 0:
        raise _Invalid(path, f"must be >= 0, got {short_repr(value)}")
    return seconds


def _positive_duration(value: object, path: str, *, minimum: float, maximum: float) -> float:
    seconds = parse_duration(value, path)
    if seconds <= 0:
        raise _Invalid(path, f"must be > 0, got {short_repr(value)}")
    if seconds < minimum or seconds > maximum:
        raise _Invalid(
            path, f"must be between {minimum:g}s and {maximum:g}s, got {short_repr(value)}"
        )
    return seconds


def _int(value: object, path: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(path, f"must be an integer, got {short_repr(value)}")
    if not minimum <= value <= maximum:
        raise _Invalid(path, f"must be between {minimum} and {maximum}, got {short_repr(value)}")
    return value


def _str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(path, f"must be a non-empty string, got {short_repr(value)}")
    return value


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _Invalid(path, f"must be one of {', '.join(choices)}, got {short_repr(value)}")
    return str(value)


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(path, f"must be true or false, got {short_repr(value)}")
    return value


def parse_listen_address(value: object, path: str) -> str:
    """Accepts `host:port`, `:port` (all interfaces) and `[v6]:port`; port 0 picks a free port."""
    text = _str(value, path)
    host, sep, port = text.rpartition(":")
    # str.isdigit() also holds for digits int() refuses (`²`) and for strings too long for it.
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        raise _Invalid(
            path, f"must be host:port with a port from 0 to 65535, got {short_repr(text)}"
        )
    if host.startswith("[") != host.endswith("]"):
        raise _Invalid(path, f"has an unbalanced IPv6 bracket: {short_repr(text)}")
    if ":" in host and not host.startswith("["):
        raise _Invalid(
            path, f"IPv6 hosts must be bracketed, e.g. [::1]:{port}, got {short_repr(text)}"
        )
    return text


def split_listen_address(address: str) -> tuple[str | None, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return (host or None), int(port)


def _mapping(value: object, path: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if key not in known:
            raise _Invalid(_join(path, _key_text(key)), f"unknown key (known: {', '.join(known)})")
    return value


def _key_text(key: object) -> str:
    """An unknown key as it goes into a key path: as written when plain, else a short repr."""
    if isinstance(key, str) and key.isprintable() and len(key) <= MAX_VALUE_CHARS:
        return key
    return short_repr(key)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _section(
    cls: type[T],
    raw: object,
    path: str,
    parsers: Mapping[str, Callable[[object, str], Any]],
) -> T:
    """Builds dataclass `cls` from `raw`, parsing each present key with its parser."""
    data = _mapping(raw, path, tuple(parsers))
    values = {key: parsers[key](data[key], _join(path, key)) for key in data}
    return cls(**values)


def _not_above(
    path: str, key: str, value: float, limit_key: str, limit: float, unit: str = ""
) -> None:
    """One key of a section bounded by another of the same section."""
    if value > limit:
        raise _Invalid(
            _join(path, key),
            f"must not exceed {_join(path, limit_key)} ({limit:g}{unit}), got {value:g}{unit}",
        )


def _optional(parser: Callable[[object, str], T]) -> Callable[[object, str], T | None]:
    def parse(value: object, path: str) -> T | None:
        return None if value is None else parser(value, path)

    return parse


def _parse_interval(value: object, path: str) -> float:
    return _positive_duration(value, path, minimum=0.05, maximum=3600)


def _parse_slow_fields_interval(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if not 0 <= seconds <= 300:
        raise _Invalid(path, f"must be between 0s and 300s, got {value!r}")
    return seconds


def _parse_web(raw: object, path: str) -> WebConfig:
    return _section(
        WebConfig,
        raw,
        path,
        {
            "listen_address": parse_listen_address,
            "max_requests": lambda v, p: _int(v, p, minimum=1, maximum=10_000),
            "read_timeout": lambda v, p: _positive_duration(v, p, minimum=0.1, maximum=600),
            "idle_timeout": lambda v, p: _positive_duration(v, p, minimum=0.1, maximum=3600),
            "max_connections": lambda v, p: _int(v, p, minimum=1, maximum=100_000),
            "config_file": _optional(_str),
            "health_without_auth": _bool,
        },
    )


def _parse_sampling(raw: object, path: str) -> SamplingConfig:
    sampling = _section(
        SamplingConfig,
        raw,
        path,
        {
            "interval": _parse_interval,
            "timeout": _optional(lambda v, p: _positive_duration(v, p, minimum=0.01, maximum=3600)),
            "slow_fields_interval": _parse_slow_fields_interval,
        },
    )
    if sampling.timeout is not None:
        _not_above(path, "timeout", sampling.timeout, "interval", sampling.interval, "s")
    return sampling


def _parse_log(raw: object, path: str) -> LogConfig:
    return _section(
        LogConfig,
        raw,
        path,
        {
            "level": lambda v, p: _choice(v, p, LOG_LEVELS),
            "format": lambda v, p: _choice(v, p, LOG_FORMATS),
        },
    )


def _device_refs(raw: object, path: str) -> tuple[DeviceRef, ...]:
    if raw is None or raw == "all":
        return ()
    if not isinstance(raw, list) or not raw:
        raise _Invalid(
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
            raise _Invalid(
                item_path, f"must be an index, a UUID or a PCI bus id, got {short_repr(item)}"
            )
        else:
            refs.append(_int(item, item_path, minimum=0, maximum=1023))
    if len(set(refs)) != len(refs):
        raise _Invalid(path, "lists a device twice")
    return tuple(refs)


def _parse_devices(raw: object, path: str) -> DeviceSelection:
    """`all`, a list (shorthand for `include`), or a mapping with `include` and `exclude`."""
    if isinstance(raw, dict):
        return _section(
            DeviceSelection, raw, path, {"include": _device_refs, "exclude": _device_refs}
        )
    return DeviceSelection(include=_device_refs(raw, path))


def _parse_collectors(raw: object, path: str) -> Mapping[str, bool]:
    data = _mapping(raw, path, tuple(COLLECTOR_DEFAULTS))
    merged = dict(COLLECTOR_DEFAULTS)
    for name, on in data.items():
        merged[name] = _bool(on, _join(path, name))
    return MappingProxyType(merged)


def _parse_fault(raw: object, path: str) -> FaultConfig:
    if raw is None or (isinstance(raw, dict) and "kind" not in raw):
        raise _Invalid(_join(path, "kind"), f"is required (one of {', '.join(FAULT_KINDS)})")
    fault = _section(
        FaultConfig,
        raw,
        path,
        {
            "kind": lambda v, p: _choice(v, p, FAULT_KINDS),
            "device": _optional(lambda v, p: _int(v, p, minimum=0, maximum=1023)),
            "function": _optional(_device_call),
            "start": _not_negative_duration,
            "duration": _optional(
                lambda v, p: _positive_duration(v, p, minimum=0.001, maximum=10**7)
            ),
            "delay": lambda v, p: _positive_duration(v, p, minimum=0.001, maximum=3600),
            "xid": lambda v, p: _int(v, p, minimum=1, maximum=1000),
        },
    )
    if fault.kind == "xid" and (fault.xid is None or fault.device is None):
        missing = "xid" if fault.xid is None else "device"
        raise _Invalid(_join(path, missing), "is required for an `xid` fault")
    if fault.kind == "slow" and fault.delay <= 0:
        raise _Invalid(_join(path, "delay"), "is required for a `slow` fault")
    return fault


def _device_call(value: object, path: str) -> str:
    from exporter.nvml import DEVICE_CALLS

    return _choice(value, path, DEVICE_CALLS)


def _parse_faults(raw: object, path: str) -> tuple[FaultConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _Invalid(path, f"must be a list, got {type(raw).__name__}")
    return tuple(_parse_fault(item, f"{path}[{i}]") for i, item in enumerate(raw))


def _model(value: object, path: str) -> str:
    from exporter.simulate import MODELS

    return _choice(value, path, tuple(MODELS))


def _parse_simulation(raw: object, path: str) -> SimulationConfig:
    simulation = _section(
        SimulationConfig,
        raw,
        path,
        {
            "devices": lambda v, p: _int(v, p, minimum=1, maximum=64),
            "model": _model,
            "seed": lambda v, p: _int(v, p, minimum=0, maximum=2**31),
            "processes_per_device": lambda v, p: _int(v, p, minimum=0, maximum=1000),
            "mig_devices": lambda v, p: _int(v, p, minimum=0, maximum=64),
            "faults": _parse_faults,
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
            raise _Invalid(f"{path}.mig_devices", f"{simulation.model} does not support MIG")
    _not_above(path, "mig_devices", simulation.mig_devices, "devices", simulation.devices)
    for i, fault in enumerate(simulation.faults):
        if fault.device is not None and fault.device >= simulation.devices:
            raise _Invalid(
                f"{path}.faults[{i}].device",
                f"must be below simulation.devices ({simulation.devices}), got {fault.device}",
            )


def _parse_processes(raw: object, path: str) -> ProcessesConfig:
    return _section(
        ProcessesConfig,
        raw,
        path,
        {
            "max_per_device": lambda v, p: _int(v, p, minimum=1, maximum=10_000),
            "proc_root": _str,
        },
    )


def _parse_dcgm(raw: object, path: str) -> DcgmConfig:
    return _section(
        DcgmConfig,
        raw,
        path,
        {"hostname_label": lambda v, p: _choice(v, p, DCGM_HOSTNAME_LABELS)},
    )


def _parse_kubernetes(raw: object, path: str) -> KubernetesConfig:
    kubernetes = _section(
        KubernetesConfig,
        raw,
        path,
        {
            "enabled": _bool,
            "socket": _str,
            "interval": lambda v, p: _positive_duration(v, p, minimum=1, maximum=3600),
            "timeout": lambda v, p: _positive_duration(v, p, minimum=0.01, maximum=60),
        },
    )
    _not_above(path, "timeout", kubernetes.timeout, "interval", kubernetes.interval, "s")
    return kubernetes


_TOP_LEVEL: Mapping[str, Callable[[object, str], Any]] = {
    "backend": lambda v, p: _choice(v, p, BACKENDS),
    "naming": lambda v, p: _choice(v, p, NAMINGS),
    "web": _parse_web,
    "sampling": _parse_sampling,
    "log": _parse_log,
    "devices": _parse_devices,
    "collectors": _parse_collectors,
    "simulation": _parse_simulation,
    "processes": _parse_processes,
    "kubernetes": _parse_kubernetes,
    "dcgm": _parse_dcgm,
}


def parse_config(raw: object, source: str = "<config>") -> Config:
    """Validates an already-loaded YAML document."""
    try:
        data = _mapping(raw, "", tuple(_TOP_LEVEL))
        values = {key: _TOP_LEVEL[key](data[key], key) for key in data}
    except _Invalid as err:
        raise ConfigError(f"{source}: {err}") from None
    return Config(source=source, **values)


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Unsupported(ComposerError):
    """Well-formed YAML that configuration files may not use."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader for configuration files: refuses aliases, deep nesting and duplicate keys.

    Aliases are what turn a few hundred bytes into gigabytes (`billion laughs`): each one
    multiplies what every later step (validation, error messages) walks. A configuration has no
    use for them, so anchors are accepted and any `*alias`, merge keys included, is refused.
    Duplicate keys are refused because the last one silently winning hides typos.
    """

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        aliased = self.check_event(yaml.AliasEvent)
        event: Any = self.current_event  # what check_event looked at
        if aliased:
            raise _Unsupported(
                None, None, "YAML aliases (*name) are not supported", event.start_mark
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise _Unsupported(
                None,
                None,
                f"nesting deeper than {MAX_YAML_DEPTH} levels is not supported",
                event.start_mark,
            )
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _Unsupported(
                None,
                None,
                f"more than {MAX_YAML_NODES} YAML nodes are not supported",
                event.start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as err:
            # PyYAML's scalar constructors let ValueError, KeyError, IndexError... escape for
            # values such as `2024-13-45`, `!!bool maybe` or an int past Python's digit limit.
            # Only ValueError's text says something to a reader of the file.
            kind = str(node.tag).rpartition(":")[2]
            reason = f": {_cap(str(err), 200)}" if type(err) is ValueError else ""
            raise ConstructorError(
                None,
                None,
                f"cannot read {short_repr(node.value)} as {kind}{reason}",
                node.start_mark,
            ) from None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if isinstance(node, MappingNode):  # `!!set a` gets here with a scalar: refused below
            self._refuse_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicates(self, node: MappingNode) -> None:
        seen: set[Hashable] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                # `<<: {...}` written inline (an alias never gets here); its own keys count.
                merged = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for mapping in merged:
                    if isinstance(mapping, MappingNode):
                        self._refuse_duplicates(mapping)
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: SafeConstructor reports it
            if duplicate:
                raise ConstructorError(
                    None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                )


def read_yaml(path: str) -> object:
    """A YAML file's document, read with StrictLoader and only up to MAX_CONFIG_BYTES, or a
    ConfigError naming the file and, for syntax, the line."""
    try:
        with Path(path).open("rb") as file:
            info = os.fstat(file.fileno())
            size = info.st_size if stat.S_ISREG(info.st_mode) else None
            data = b"" if size and size > MAX_CONFIG_BYTES else file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    if (size or 0) > MAX_CONFIG_BYTES or len(data) > MAX_CONFIG_BYTES:
        # Pipes and devices report no size: only that there was more than the cap.
        shown = size if size else f"more than {MAX_CONFIG_BYTES}"
        raise ConfigError(f"{path}: is {shown} bytes; at most {MAX_CONFIG_BYTES} are read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    try:
        return yaml.load(text, Loader=StrictLoader)
    except _Unsupported as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}{err.problem}") from None
    except yaml.reader.ReaderError as err:
        # Its own message spans two lines and counts characters from the start of the file.
        if not isinstance(err.position, int) or not isinstance(err.character, int):
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        raise ConfigError(
            f"{path}: invalid YAML at line {line}, column {column}: unacceptable character "
            f"#x{err.character:04x}: {err.reason}"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except Exception as err:
        # PyYAML lets untyped errors escape from a few of its constructors (and `loader` may
        # add its own); whatever the file holds, the answer is a ConfigError.
        raise ConfigError(f"{path}: invalid YAML: {type(err).__name__}: {err}") from None


def load_config(path: str | None) -> Config:
    """Reads and validates a YAML file; no path means the built-in defaults."""
    if path is None:
        return Config()
    raw = read_yaml(path)
    return parse_config({} if raw is None else raw, path)


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
                web, config_file=_str(overrides.web_config_file, "--web.config.file")
            )
        if overrides.max_requests is not None:
            web = dataclasses.replace(
                web,
                max_requests=_int(
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
                log, level=_choice(overrides.log_level, "--log.level", LOG_LEVELS)
            )
        if overrides.log_format is not None:
            log = dataclasses.replace(
                log, format=_choice(overrides.log_format, "--log.format", LOG_FORMATS)
            )
    except _Invalid as err:
        raise ConfigError(str(err)) from None
    naming = config.naming
    if overrides.naming is not None:
        try:
            naming = _choice(overrides.naming, "--naming", NAMINGS)
        except _Invalid as err:
            raise ConfigError(str(err)) from None
    backend, simulation = config.backend, config.simulation
    if overrides.simulate is not None:
        backend = "simulated"
        simulation = dataclasses.replace(simulation, devices=overrides.simulate)
        try:
            _check_simulation(simulation, "simulation")
        except _Invalid as err:
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
