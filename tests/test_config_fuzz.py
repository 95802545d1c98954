"""Property tests for the configuration loader.

Whatever a file holds (any YAML document, any text, any bytes), loading it ends in a Config or
in a ConfigError whose message is short and starts with the file's name: never another
exception, never a hang. And every configuration the schema allows loads to what it says, and
survives being written back out and loaded again.

Derandomized and bounded, so CI runs the same examples every time in a few seconds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.cli import KNOWN_NAMES
from exporter.collectors import COLLECTORS
from exporter.config import (
    FAULT_KINDS,
    Config,
    DeviceSelection,
    FaultConfig,
    KubernetesConfig,
    LogConfig,
    ProcessesConfig,
    SamplingConfig,
    SimulationConfig,
    WebConfig,
    load_config,
    parse_config,
)
from exporter.nvml import DEVICE_CALLS
from exporter.simulate.models import MODELS
from exporter.validation import MAX_MESSAGE_CHARS, ConfigError


def _fuzz(max_examples: int) -> settings:
    # tmp_path is shared by the examples of one test; each example overwrites the one file.
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def _field_names(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


SECTIONS: dict[str, list[str]] = {
    "web": _field_names(WebConfig),
    "sampling": _field_names(SamplingConfig),
    "log": _field_names(LogConfig),
    "devices": _field_names(DeviceSelection),
    "collectors": list(COLLECTORS),
    "simulation": _field_names(SimulationConfig),
    "processes": _field_names(ProcessesConfig),
    "kubernetes": _field_names(KubernetesConfig),
}
TOP_KEYS = [name for name in _field_names(Config) if name != "source"]
KEY_NAMES = sorted(
    {*TOP_KEYS, *(key for keys in SECTIONS.values() for key in keys), *_field_names(FaultConfig)}
)
# Strings the parsers treat specially, so that random documents reach past the type checks.
MEANINGFUL = [
    *("1s", "500ms", "1m30s", "2h", "0s", "-1s", "1e3s", "9" * 400 + "s", ".nan", "nan", "inf"),
    *("nvml", "simulated", "dcgm", "debug", "json", "all", "GPU-0", "MIG-1", "0000:18:00.0"),
    *(":9471", "127.0.0.1:0", "[::1]:9471", "::1:9471", ":99999", ":\u00b2"),
    *FAULT_KINDS,
    *list(MODELS)[:2],
    *DEVICE_CALLS[:3],
    "",
]


# --- (a) anything at all: a Config or a short ConfigError naming the file ----------------------


def _scalars() -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**40), max_value=2**40),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(MEANINGFUL),
        st.text(max_size=20),
        st.binary(max_size=8),
    )


def _keys() -> st.SearchStrategy[object]:
    return st.one_of(
        st.sampled_from(KEY_NAMES),
        st.sampled_from(KEY_NAMES),
        st.text(max_size=12),
        st.integers(min_value=-5, max_value=2000),
        st.none(),
        st.booleans(),
    )


def _values() -> st.SearchStrategy[object]:
    return st.recursive(
        _scalars(),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(_keys(), children, max_size=4),
        ),
        max_leaves=20,
    )


def _schema_shaped() -> st.SearchStrategy[object]:
    """Real sections with real key names and random values: exercises every value parser."""
    section = st.sampled_from(sorted(SECTIONS)).flatmap(
        lambda name: st.tuples(
            st.just(name),
            st.dictionaries(st.sampled_from(SECTIONS[name]), _values(), max_size=4),
        )
    )
    faults = st.lists(
        st.dictionaries(st.sampled_from(_field_names(FaultConfig)), _scalars(), max_size=5),
        max_size=3,
    )
    return st.one_of(
        st.lists(section, max_size=4).map(dict),
        st.builds(
            lambda top, fault_list: {**top, "simulation": {"faults": fault_list}},
            st.dictionaries(st.sampled_from(TOP_KEYS), _scalars(), max_size=2),
            faults,
        ),
    )


def _documents() -> st.SearchStrategy[object]:
    return st.one_of(
        _schema_shaped(),
        _schema_shaped(),
        st.dictionaries(st.one_of(st.sampled_from(TOP_KEYS), _keys()), _values(), max_size=5),
        _values(),
    )


def assert_loads_or_fails_cleanly(path: Path) -> None:
    try:
        config = load_config(str(path), known=KNOWN_NAMES)
    except ConfigError as err:
        message = str(err)
        assert len(message) <= MAX_MESSAGE_CHARS
        assert message.startswith(f"{path}: "), message
        assert len(message) > len(f"{path}: ")
    else:
        assert isinstance(config, Config)
        assert config.source == str(path)


@_fuzz(max_examples=250)
@given(document=_documents(), unicode=st.booleans())
def test_any_yaml_document_loads_or_fails_cleanly(
    tmp_path: Path, document: object, unicode: bool
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=unicode))
    assert_loads_or_fails_cleanly(path)


# Fragments of YAML syntax, so that random text gets past the scanner now and then.
YAMLISH = st.lists(
    st.sampled_from(
        [
            *"ab:-[]{},&*!<>|'\"?%@`#.\\ \t\n",
            *("\n  ", ": ", "- ", "<<: ", "&a ", "*a", "!!", "!!int ", "!!float ", "!!bool "),
            *("!!timestamp ", "!!binary ", "!!set ", "!!python/", "sampling", "interval"),
            *(".nan", "1s", "2024-13-45", "9" * 30, "\x00", "\ufeff"),
        ]
    ),
    max_size=30,
).map("".join)


@_fuzz(max_examples=250)
@given(text=st.one_of(YAMLISH, YAMLISH, st.text(max_size=80)))
def test_any_text_loads_or_fails_cleanly(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    assert_loads_or_fails_cleanly(path)


@_fuzz(max_examples=100)
@given(data=st.binary(max_size=80))
def test_any_bytes_load_or_fail_cleanly(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    assert_loads_or_fails_cleanly(path)


def _python_values() -> st.SearchStrategy[object]:
    """What no YAML file yields but parse_config may still be handed."""
    return st.recursive(
        st.one_of(
            _scalars(),
            st.integers(min_value=10**5000, max_value=10**5000 + 1),
            st.just(list(range(10_000))),
        ),
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.tuples(children),
            st.dictionaries(st.sampled_from(KEY_NAMES), children, max_size=3),
        ),
        max_leaves=10,
    )


@_fuzz(max_examples=150)
@given(
    raw=st.one_of(
        st.dictionaries(st.sampled_from(TOP_KEYS), _python_values(), max_size=3),
        _python_values(),
    )
)
def test_parse_config_of_any_value_is_a_config_or_a_short_error(raw: object) -> None:
    try:
        parse_config(raw, "f.yaml", known=KNOWN_NAMES)
    except ConfigError as err:
        assert len(str(err)) <= MAX_MESSAGE_CHARS
        assert str(err).startswith("f.yaml: ")


# --- (b) every configuration the schema allows loads, and round-trips --------------------------


@st.composite
def durations(draw: st.DrawFn, low: float, high: float) -> tuple[object, float]:
    """A duration strictly inside (low, high), spelled as YAML may: `250ms`, `2s`, `1m30s`, 0.25."""
    millis = draw(st.integers(math.floor(low * 1000) + 1, math.ceil(high * 1000) - 1))
    spelling = draw(st.sampled_from(["ms", "s", "m", "number"]))
    if spelling == "s" and millis % 1000 == 0:
        return f"{millis // 1000}s", float(millis // 1000)
    if spelling == "m" and millis % 1000 == 0 and millis >= 60_000:
        minutes, seconds = divmod(millis // 1000, 60)
        return f"{minutes}m{seconds}s", float(minutes) * 60.0 + float(seconds)
    if spelling == "number":
        return millis / 1000, millis / 1000
    return f"{millis}ms", float(millis) * 0.001


class _Section:
    """A section drawn key by key: what goes into the file, and what it must load as."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.raw: dict[str, Any] = {}
        self.expected: dict[str, Any] = {}

    def maybe(self, key: str, strategy: st.SearchStrategy[tuple[object, object]]) -> None:
        if self.draw(st.booleans()):
            self.raw[key], self.expected[key] = self.draw(strategy)


def _same(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[object, object]]:
    return strategy.map(lambda value: (value, value))


@st.composite
def valid_configs(draw: st.DrawFn) -> tuple[dict[str, Any], Config]:
    raw: dict[str, Any] = {}
    expected: dict[str, Any] = {}

    web = _Section(draw)
    host = st.sampled_from(["", "127.0.0.1", "localhost", "[::1]", "[::]", "0.0.0.0"])
    web.maybe(
        "listen_address",
        _same(st.builds("{}:{}".format, host, st.integers(0, 65535))),
    )
    web.maybe("max_requests", _same(st.integers(1, 10_000)))
    web.maybe("read_timeout", durations(0.1, 600))
    web.maybe("idle_timeout", durations(0.1, 3600))
    web.maybe("max_connections", _same(st.integers(1, 100_000)))
    web.maybe("config_file", _same(st.none() | st.text(min_size=1, max_size=20)))
    web.maybe("health_without_auth", _same(st.booleans()))
    raw["web"], expected["web"] = web.raw, WebConfig(**web.expected)

    sampling = _Section(draw)
    sampling.maybe("interval", durations(0.05, 3600))
    # Spelled differently, equal durations can differ in the last bit: keep a clear gap.
    sampling.maybe("timeout", durations(0.01, sampling.expected.get("interval", 1.0) - 0.002))
    sampling.maybe("slow_fields_interval", durations(-0.001, 300))
    raw["sampling"] = sampling.raw
    expected["sampling"] = SamplingConfig(**sampling.expected)

    log = _Section(draw)
    log.maybe("level", _same(st.sampled_from(["debug", "info", "warn", "error"])))
    log.maybe("format", _same(st.sampled_from(["logfmt", "json"])))
    raw["log"], expected["log"] = log.raw, LogConfig(**log.expected)

    refs = st.lists(
        st.one_of(
            st.integers(0, 1023),
            st.builds("GPU-{:08x}".format, st.integers(0, 2**32 - 1)),
            st.builds("0000:{:02x}:00.0".format, st.integers(0, 255)),
        ),
        min_size=1,
        max_size=4,
        unique=True,
    )
    devices = draw(
        st.one_of(
            st.just(("all", DeviceSelection())),
            refs.map(lambda r: (r, DeviceSelection(include=tuple(r)))),
            st.tuples(refs, refs).map(
                lambda p: (
                    {"include": p[0], "exclude": p[1]},
                    DeviceSelection(include=tuple(p[0]), exclude=tuple(p[1])),
                )
            ),
        )
    )
    raw["devices"], expected["devices"] = devices

    switches = draw(st.dictionaries(st.sampled_from(list(COLLECTORS)), st.booleans()))
    raw["collectors"] = switches
    expected["collectors"] = switches

    simulation = _Section(draw)
    simulation.maybe("devices", _same(st.integers(1, 64)))
    simulation.maybe("model", _same(st.sampled_from(list(MODELS))))
    simulation.maybe("seed", _same(st.integers(0, 2**31)))
    simulation.maybe("processes_per_device", _same(st.integers(0, 1000)))
    count = simulation.expected.get("devices", 8)
    if MODELS[simulation.expected.get("model", "NVIDIA H200")].mig_profile:
        simulation.maybe("mig_devices", _same(st.integers(0, count)))
    faults = draw(st.lists(valid_faults(count), max_size=3))
    if faults:
        simulation.raw["faults"] = [fault_raw for fault_raw, _ in faults]
        simulation.expected["faults"] = tuple(fault for _, fault in faults)
    raw["simulation"] = simulation.raw
    expected["simulation"] = SimulationConfig(**simulation.expected)

    processes = _Section(draw)
    processes.maybe("max_per_device", _same(st.integers(1, 10_000)))
    processes.maybe("proc_root", _same(st.text(min_size=1, max_size=20)))
    raw["processes"] = processes.raw
    expected["processes"] = ProcessesConfig(**processes.expected)

    kubernetes = _Section(draw)
    kubernetes.maybe("enabled", _same(st.booleans()))
    kubernetes.maybe("socket", _same(st.text(min_size=1, max_size=20)))
    kubernetes.maybe("interval", durations(1, 3600))
    k8s_interval = kubernetes.expected.get("interval", 10.0)
    timeout = durations(0.01, min(60.0, k8s_interval - 0.002))
    if k8s_interval < 2.0:  # below the default timeout: one must be given
        kubernetes.raw["timeout"], kubernetes.expected["timeout"] = draw(timeout)
    else:
        kubernetes.maybe("timeout", timeout)
    raw["kubernetes"] = kubernetes.raw
    expected["kubernetes"] = KubernetesConfig(**kubernetes.expected)

    for key in ("backend", "naming"):
        if draw(st.booleans()):
            choices = ["nvml", "simulated"] if key == "backend" else ["nvml", "dcgm"]
            raw[key] = expected[key] = draw(st.sampled_from(choices))
    # A section left out, empty, or null all mean its defaults.
    for key in [key for key, value in raw.items() if value in ({}, "all")]:
        spelling = draw(st.sampled_from(["as is", "null", "left out"]))
        if spelling == "null":
            raw[key] = None
        elif spelling == "left out":
            del raw[key]
    return raw, Config(**expected)


@st.composite
def valid_faults(draw: st.DrawFn, devices: int) -> tuple[dict[str, Any], FaultConfig]:
    kind = draw(st.sampled_from(FAULT_KINDS))
    fault = _Section(draw)
    fault.raw["kind"] = fault.expected["kind"] = kind
    fault.maybe("device", _same(st.none() | st.integers(0, devices - 1)))
    if kind in ("unsupported", "slow"):
        fault.maybe("function", _same(st.none() | st.sampled_from(DEVICE_CALLS)))
    fault.maybe("start", durations(0, 10**6))
    fault.maybe("duration", durations(0.001, 10**6))
    if kind == "slow" or draw(st.booleans()):
        fault.raw["delay"], fault.expected["delay"] = draw(durations(0.001, 3600))
    if kind == "xid":
        fault.raw["xid"] = fault.expected["xid"] = draw(st.integers(1, 1000))
        if fault.expected.get("device") is None:
            fault.raw["device"] = fault.expected["device"] = draw(st.integers(0, devices - 1))
    return fault.raw, FaultConfig(**fault.expected)


def to_raw(config: Config) -> dict[str, object]:
    """A Config written back as a YAML document, seconds as plain numbers."""
    raw: dict[str, object] = {"backend": config.backend, "naming": config.naming}
    for section in ("web", "sampling", "log", "processes", "kubernetes"):
        raw[section] = dataclasses.asdict(getattr(config, section))
    raw["devices"] = {
        key: list(refs)
        for key, refs in dataclasses.asdict(config.devices).items()
        if refs  # an empty list is refused: leaving it out means "none"
    }
    raw["collectors"] = dict(config.collectors)
    simulation = dataclasses.asdict(config.simulation)
    simulation["faults"] = [
        {
            key: value
            for key, value in fault.items()
            # Defaults that the parsers do not accept spelled out: xid has no `null`, and
            # a delay must be positive when given.
            if not (key == "xid" and value is None) and not (key == "delay" and value == 0)
        }
        for fault in simulation["faults"]
    ]
    raw["simulation"] = simulation
    return raw


@_fuzz(max_examples=150)
@given(case=valid_configs())
def test_every_valid_config_loads_and_round_trips(
    tmp_path: Path, case: tuple[dict[str, Any], Config]
) -> None:
    raw, expected = case
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    loaded = load_config(str(path), known=KNOWN_NAMES)
    assert loaded == dataclasses.replace(expected, source=str(path))

    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(to_raw(loaded), sort_keys=False))
    assert load_config(str(again), known=KNOWN_NAMES) == dataclasses.replace(
        loaded, source=str(again)
    )
