"""YAML configuration: parsed into frozen dataclasses, validated strictly.

Every error names the key path and the reason, so an operator can fix a file at 3 a.m. without
reading code. Validation happens before anything binds a port or touches NVML.

The dataclasses and their defaults are in `schema`; reading files and flags into them is
`parsing`'s work.
"""

from exporter.config.parsing import (
    apply_overrides,
    load_config,
    parse_config,
    parse_listen_address,
)
from exporter.config.schema import (
    DCGM_HOSTNAME_LABELS,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_PORT,
    FAULT_KINDS,
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
    split_listen_address,
)

__all__ = [
    "DCGM_HOSTNAME_LABELS",
    "DEFAULT_LISTEN_ADDRESS",
    "DEFAULT_PORT",
    "FAULT_KINDS",
    "Config",
    "DcgmConfig",
    "DeviceRef",
    "DeviceSelection",
    "FaultConfig",
    "KnownNames",
    "KubernetesConfig",
    "LogConfig",
    "Overrides",
    "ProcessesConfig",
    "SamplingConfig",
    "SimulationConfig",
    "WebConfig",
    "apply_overrides",
    "load_config",
    "parse_config",
    "parse_listen_address",
    "split_listen_address",
]
