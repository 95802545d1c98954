"""Configuration files and command-line flags, validated into exporter.config.schema's
dataclasses."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from exporter.config.schema import (
    BACKENDS,
    DCGM_HOSTNAME_LABELS,
    FAULT_KINDS,
    LOG_FORMATS,
    LOG_LEVELS,
    NAMINGS,
    Config,
    DcgmConfig,
    DeviceRef,
    DeviceSelection,
    FaultConfig,
    KnownNames,
    KubernetesConfig,
    LogConfig,
    Overrides,
    ProcessesConfig,
    SamplingConfig,
    SimulationConfig,
    WebConfig,
    pci_key,
)
from exporter.simulate.models import MODELS
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
    if simulation.mig_devices and not MODELS[simulation.model].mig_profile:
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
