"""Configuration: defaults, parsing, overrides, and one file per failure case."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from exporter.cli import KNOWN_NAMES, main
from exporter.collectors import COLLECTORS, enabled_collectors
from exporter.config import (
    Config,
    DeviceSelection,
    Overrides,
    apply_overrides,
    load_config,
    parse_config,
    split_listen_address,
)
from exporter.validation import (
    MAX_CONFIG_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_VALUE_CHARS,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    ConfigError,
    parse_duration,
    short_repr,
)

REPO = Path(__file__).resolve().parent.parent
BAD_CONFIGS = sorted((REPO / "tests" / "configs" / "bad").glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: ...'"
    return first.removeprefix("# expect: ")


def test_no_file_gives_documented_defaults() -> None:
    config = load_config(None, known=KNOWN_NAMES)
    assert config.backend == "nvml"
    assert config.web.listen_address == ":9471"
    assert config.sampling.interval == 1.0 and config.sampling.deadline == 1.0
    assert config.devices == DeviceSelection()
    assert config.naming == "nvml"
    assert enabled_collectors(config.collectors) == tuple(
        name for name, cls in COLLECTORS.items() if cls.default_enabled
    )


def test_annotated_example_states_the_defaults() -> None:
    example = load_config(str(REPO / "config" / "exporter.yaml"), known=KNOWN_NAMES)
    # every collector listed, as it defaults
    assert example.collectors == {name: cls.default_enabled for name, cls in COLLECTORS.items()}
    defaults = Config(source=example.source, collectors=example.collectors)
    assert example == defaults


def test_simulation_example_is_valid() -> None:
    config = load_config(str(REPO / "config" / "simulate.yaml"), known=KNOWN_NAMES)
    assert config.backend == "simulated" and config.simulation.devices == 8
    assert config.simulation.faults[0].kind == "lost"
    assert config.simulation.faults[0].start == 600


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("500ms", 0.5), ("1m30s", 90.0), ("2h", 7200.0), (3, 3.0), (0.25, 0.25)],
)
def test_durations_in_prometheus_style(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == pytest.approx(seconds)


def test_slow_fields_can_be_read_every_sample() -> None:
    assert load_config(None, known=KNOWN_NAMES).sampling.slow_fields_interval == 10.0
    config = parse_config({"sampling": {"slow_fields_interval": "0s"}}, known=KNOWN_NAMES)
    assert config.sampling.slow_fields_interval == 0.0
    merged = apply_overrides(config, Overrides(interval="250ms"))
    assert merged.sampling.slow_fields_interval == 0.0


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [(":9471", None, 9471), ("127.0.0.1:0", "127.0.0.1", 0), ("[::1]:9471", "::1", 9471)],
)
def test_listen_addresses(address: str, host: str | None, port: int) -> None:
    config = parse_config({"web": {"listen_address": address}}, known=KNOWN_NAMES)
    assert split_listen_address(config.web.listen_address) == (host, port)


def test_devices_by_index_uuid_and_pci_bus_id() -> None:
    config = parse_config({"devices": [0, "GPU-abc", "0000:18:00.0"]}, known=KNOWN_NAMES)
    assert config.devices == DeviceSelection(include=(0, "GPU-abc", "0000:18:00.0"))
    selection = config.devices
    assert selection.selects(0, "GPU-x", "00000000:01:00.0")
    assert selection.selects(5, "GPU-abc", "00000000:02:00.0")
    assert selection.selects(7, "GPU-y", "00000000:18:00.0")
    assert not selection.selects(1, "GPU-y", "00000000:19:00.0")


def test_devices_include_and_exclude() -> None:
    selection = parse_config(
        {"devices": {"exclude": [3, "GPU-bad", "1b:00.0"]}}, known=KNOWN_NAMES
    ).devices
    assert selection.selects(0, "GPU-a", "00000000:18:00.0")
    assert not selection.selects(3, "GPU-b", "00000000:20:00.0")
    assert not selection.selects(4, "GPU-bad", "00000000:21:00.0")
    assert not selection.selects(5, "GPU-c", "00000000:1B:00.0")
    both = parse_config({"devices": {"include": [0, 1], "exclude": [1]}}, known=KNOWN_NAMES).devices
    assert [i for i in range(3) if both.selects(i, f"GPU-{i}", "")] == [0]


def test_flags_override_the_file() -> None:
    config = parse_config(
        {"web": {"listen_address": ":1"}, "collectors": {"thermal": False}},
        "f.yaml",
        known=KNOWN_NAMES,
    )
    merged = apply_overrides(
        config,
        Overrides(
            listen_address="127.0.0.1:2",
            interval="250ms",
            log_level="debug",
            simulate=3,
            naming="dcgm",
            collectors={"thermal": True, "clocks": False},
        ),
    )
    assert merged.web.listen_address == "127.0.0.1:2"
    assert merged.sampling.interval == 0.25
    assert merged.log.level == "debug"
    assert merged.backend == "simulated" and merged.simulation.devices == 3
    assert merged.naming == "dcgm"
    assert merged.collectors["thermal"] is True and merged.collectors["clocks"] is False


def test_a_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--sampling.interval: must be > 0"):
        apply_overrides(Config(), Overrides(interval="-5s"))


def test_config_is_immutable() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.backend = "simulated"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.collectors["power"] = False  # type: ignore[index]


def test_every_failure_case_has_a_file() -> None:
    assert len(BAD_CONFIGS) >= 20


@pytest.mark.parametrize("path", BAD_CONFIGS, ids=lambda p: p.stem)
def test_bad_config_names_key_and_reason(path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(str(path), known=KNOWN_NAMES)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expectation(path) in message


@pytest.mark.parametrize("path", BAD_CONFIGS, ids=lambda p: p.stem)
def test_bad_config_makes_the_command_exit_2_with_the_reason(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config.file", str(path), "--web.listen-address", "127.0.0.1:0"]) == 2
    assert expectation(path) in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [
        p
        for p in BAD_CONFIGS
        if p.stem in ("negative_interval", "unknown_nested_key", "invalid_yaml")
    ],
    ids=lambda p: p.stem,
)
def test_bad_config_exits_2_before_binding_a_port(path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "--config.file",
            str(path),
            "--web.listen-address",
            f"127.0.0.1:{port}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert expectation(path) in result.stderr
    assert "listening" not in result.stderr
    # Nothing was bound: the port is still free.
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read: No such file"):
        load_config(str(tmp_path / "nope.yaml"), known=KNOWN_NAMES)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(str(path), known=KNOWN_NAMES) == Config(source=str(path))


def test_yaml_round_trip_of_faults() -> None:
    raw = yaml.safe_load(
        "simulation:\n  devices: 4\n  faults:\n"
        "    - {kind: slow, device: 2, function: power_usage, delay: 250ms, start: 1m}\n"
    )
    fault = parse_config(raw, known=KNOWN_NAMES).simulation.faults[0]
    assert (fault.kind, fault.device, fault.function, fault.delay, fault.start) == (
        "slow",
        2,
        "power_usage",
        0.25,
        60.0,
    )


# --- hostile and malformed files: refused fast, with a short message naming file and place ------

# Nine levels of nine aliases: a few hundred bytes standing for 9**9 strings.
BILLION_LAUGHS = "backend:\n- &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"- &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]\n" for level in range(1, 9)
)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(str(path), known=KNOWN_NAMES)
    return str(err.value)


def test_billion_laughs_is_refused_at_the_first_alias(tmp_path: Path) -> None:
    path = write(tmp_path, BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 500
    started = time.monotonic()
    message = config_error(path)
    assert time.monotonic() - started < 5
    assert message == f"{path}: line 3, column 8: YAML aliases (*name) are not supported"


def test_billion_laughs_makes_config_check_exit_2_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BILLION_LAUGHS)
    started = time.monotonic()
    assert main(["--config.check", "--config.file", str(path)]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "YAML aliases (*name) are not supported" in err
    assert len(err.encode()) < 1024


@pytest.mark.slow
def test_billion_laughs_costs_the_real_command_little_time_and_memory(tmp_path: Path) -> None:
    path = write(tmp_path, BILLION_LAUGHS)
    stderr_path = tmp_path / "stderr"
    # Should the refusal ever regress, the address-space limit turns gigabytes into a quick
    # MemoryError instead of a machine swapping; exec keeps the pid that wait4 measures.
    limit = 1 << 30
    launcher = (
        "import os, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'exporter', *sys.argv[1:]])\n"
    )
    with stderr_path.open("wb") as stderr:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-c", launcher, "--config.check", "--config.file", str(path)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > 30:
                process.kill()
                os.wait4(process.pid, 0)
                pytest.fail("nvml-exporter --config.check still ran after 30 s")
            time.sleep(0.01)
        elapsed = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    message = stderr_path.read_bytes()
    assert process.returncode == 2, message[:2000]
    assert b"YAML aliases (*name) are not supported" in message
    assert len(message) < 1024
    assert elapsed < 5
    assert usage.ru_maxrss < 200 * 1024  # kilobytes on Linux


def test_an_alias_is_refused_with_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "sampling:\n  interval: &every 2s\n  timeout: *every\n")
    assert config_error(path) == (
        f"{path}: line 3, column 12: YAML aliases (*name) are not supported"
    )


def test_a_merge_key_with_an_alias_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "x: &base {interval: 2s}\nsampling:\n  <<: *base\n  timeout: 1s\n")
    assert config_error(path) == (
        f"{path}: line 3, column 7: YAML aliases (*name) are not supported"
    )


def test_an_anchor_alone_is_harmless(tmp_path: Path) -> None:
    path = write(tmp_path, "sampling: &sampling\n  interval: &every 2s\n")
    assert load_config(str(path), known=KNOWN_NAMES).sampling.interval == 2.0


def test_an_inline_merge_key_still_works(tmp_path: Path) -> None:
    path = write(tmp_path, "sampling:\n  <<: {interval: 2s}\n  timeout: 1s\n")
    sampling = load_config(str(path), known=KNOWN_NAMES).sampling
    assert (sampling.interval, sampling.timeout) == (2.0, 1.0)


def test_a_file_over_the_size_cap_is_refused_before_parsing(tmp_path: Path) -> None:
    # Invalid YAML up front: only a check made before parsing reports the size instead.
    text = "[\n" + "#\n" * (MAX_CONFIG_BYTES // 2)
    path = write(tmp_path, text)
    assert config_error(path) == (
        f"{path}: is {len(text)} bytes; at most {MAX_CONFIG_BYTES} are read"
    )


def test_a_file_of_exactly_the_size_cap_is_read(tmp_path: Path) -> None:
    head = "backend: simulated\n"
    path = write(tmp_path, head + "#" * (MAX_CONFIG_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(str(path), known=KNOWN_NAMES).backend == "simulated"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_the_size_cap_holds_for_a_device_that_reports_no_size() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("/dev/zero", known=KNOWN_NAMES)
    assert str(err.value) == (
        f"/dev/zero: is more than {MAX_CONFIG_BYTES} bytes; at most {MAX_CONFIG_BYTES} are read"
    )


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "backend: " + "[" * 10_000 + "\n")
    message = config_error(path)
    assert message.startswith(f"{path}: line 1, column ")
    assert message.endswith(f"nesting deeper than {MAX_YAML_DEPTH} levels is not supported")


def test_a_file_dense_with_nodes_is_refused_quickly(tmp_path: Path) -> None:
    path = write(tmp_path, "devices: [" + "0, " * (MAX_CONFIG_BYTES // 4) + "]\n")
    started = time.monotonic()
    message = config_error(path)
    assert time.monotonic() - started < 5
    assert message.endswith(f"more than {MAX_YAML_NODES} YAML nodes are not supported")


def test_an_echoed_value_is_truncated(tmp_path: Path) -> None:
    path = write(tmp_path, "backend: " + "x" * 100_000 + "\n")
    message = config_error(path)
    assert message.startswith(f"{path}: backend: must be one of nvml, simulated, got 'xxx")
    assert "..." in message
    assert len(message) < len(str(path)) + 60 + MAX_VALUE_CHARS


def test_a_long_or_odd_unknown_key_is_shown_short(tmp_path: Path) -> None:
    path = write(tmp_path, f'sampling:\n  "{"k" * 10_000}": 1\n')
    assert len(config_error(path)) < len(str(path)) + 200
    path = write(tmp_path, 'sampling:\n  "a\\nb": 1\n')
    assert config_error(path).startswith(f"{path}: sampling.'a\\nb': unknown key")


def test_every_config_error_is_capped() -> None:
    message = str(ConfigError("x" * 10 * MAX_MESSAGE_CHARS))
    assert len(message) == MAX_MESSAGE_CHARS
    assert message.endswith("...")


def test_short_repr_bounds_length_and_work() -> None:
    assert short_repr("1s") == "'1s'"
    assert short_repr(math.nan) == "nan"
    assert len(short_repr("x" * 10**6)) <= MAX_VALUE_CHARS
    nested: list[object] = list(range(10**6))
    for _ in range(50):
        nested = [nested] * 10
    assert len(short_repr(nested)) <= MAX_VALUE_CHARS
    # repr() itself refuses ints past sys.get_int_max_str_digits().
    assert short_repr(10**5000) == "<16610-bit integer>"


def test_huge_values_given_directly_get_short_messages() -> None:
    huge = [list(range(10**5))] * 100
    for raw in (
        {"backend": huge},
        {"devices": huge},
        {"web": {"listen_address": ":" + "9" * 10**5}},
        {"processes": {"max_per_device": 10**5000}},
        {"sampling": {"interval": 10**5000}},
    ):
        with pytest.raises(ConfigError) as err:
            parse_config(raw, "f.yaml", known=KNOWN_NAMES)
        assert len(str(err.value)) < 300


# --- durations must be finite --------------------------------------------------------------

NON_FINITE_KEYS = {
    "sampling.interval": "sampling:\n  interval: {}\n",
    "sampling.timeout": "sampling:\n  timeout: {}\n",
    "sampling.slow_fields_interval": "sampling:\n  slow_fields_interval: {}\n",
    "web.read_timeout": "web:\n  read_timeout: {}\n",
    "web.idle_timeout": "web:\n  idle_timeout: {}\n",
    "kubernetes.interval": "kubernetes:\n  interval: {}\n",
    "kubernetes.timeout": "kubernetes:\n  timeout: {}\n",
    "simulation.faults[0].start": "simulation:\n  faults:\n  - {{kind: lost, start: {}}}\n",
    "simulation.faults[0].duration": "simulation:\n  faults:\n  - {{kind: lost, duration: {}}}\n",
    "simulation.faults[0].delay": "simulation:\n  faults:\n  - {{kind: slow, delay: {}}}\n",
}


@pytest.mark.parametrize("key", NON_FINITE_KEYS)
@pytest.mark.parametrize(
    ("spelled", "shown"), [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")]
)
def test_a_duration_must_be_finite(tmp_path: Path, key: str, spelled: str, shown: str) -> None:
    path = write(tmp_path, NON_FINITE_KEYS[key].format(spelled))
    assert config_error(path) == f"{path}: {key}: must be a finite duration, got {shown}"


@pytest.mark.parametrize("key", ["sampling.interval", "simulation.faults[0].start"])
def test_a_non_finite_duration_makes_the_command_exit_2(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, NON_FINITE_KEYS[key].format(".nan"))
    assert main(["--config.check", "--config.file", str(path)]) == 2
    assert f"{key}: must be a finite duration, got nan" in capsys.readouterr().err


def test_an_integer_too_large_for_a_float_is_no_duration(tmp_path: Path) -> None:
    path = write(tmp_path, "sampling:\n  interval: " + "9" * 400 + "\n")
    assert config_error(path) == (
        f"{path}: sampling.interval: must be a finite duration, got <1329-bit integer>"
    )


def test_a_duration_string_that_overflows_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "sampling:\n  interval: " + "9" * 400 + "s\n")
    assert "sampling.interval: must be a finite duration, got '999" in config_error(path)
    with pytest.raises(ConfigError, match=r"^--sampling.interval: must be a finite duration"):
        apply_overrides(Config(), Overrides(interval="9" * 400 + "h"))


# --- duplicate keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "key"),
    [
        ("backend: nvml\nnaming: nvml\nbackend: simulated\n", "line 3, column 1", "backend"),
        ("web:\n  max_requests: 4\n  max_requests: 5\n", "line 3, column 3", "max_requests"),
        ("collectors: {power: true, power: false}\n", "line 1, column 27", "power"),
        (
            "simulation:\n  faults:\n  - kind: lost\n    device: 1\n    device: 2\n",
            "line 5, column 5",
            "device",
        ),
        ("devices:\n  include: [0]\n  include: [1]\n", "line 3, column 3", "include"),
        ("sampling:\n  <<: {interval: 1s, interval: 2s}\n", "line 2, column 22", "interval"),
    ],
    ids=["top_level", "section", "flow_mapping", "list_item", "devices", "inline_merge"],
)
def test_a_duplicate_key_is_refused_at_any_depth(
    tmp_path: Path, text: str, where: str, key: str
) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: invalid YAML at {where}: duplicate key {key!r}"


def test_keys_equal_once_read_are_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path, "simulation:\n  faults:\n  - {0x1: a, 1: b}\n")
    assert "duplicate key 1" in config_error(path)


# --- read_yaml: any loader gets the protections, and errors stay ConfigErrors ----------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2024-13-45", "cannot read '2024-13-45' as timestamp: month must be in 1..12"),
        ("!!bool maybe", "cannot read 'maybe' as bool"),
        ("!!int ''", "cannot read '' as int"),
        ("!!timestamp soon", "cannot read 'soon' as timestamp"),
        ("9" * 5000, "cannot read '9999"),
    ],
)
def test_values_pyyaml_cannot_construct_are_config_errors(
    tmp_path: Path, value: str, reason: str
) -> None:
    path = write(tmp_path, f"backend: {value}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: invalid YAML at line 1, column 10: {reason}")
    assert len(message) < len(str(path)) + 400


def test_a_control_character_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'web:\n  listen_address: ":1"\n  x: "a\x01"\n')
    assert config_error(path) == (
        f"{path}: invalid YAML at line 3, column 8: unacceptable character #x0001: "
        "special characters are not allowed"
    )


@pytest.mark.parametrize("address", [":\u00b2", ":\u0663", ":" + "0" * 5000])
def test_a_port_is_ascii_digits(address: str) -> None:
    with pytest.raises(ConfigError, match=r"web.listen_address: must be host:port"):
        parse_config({"web": {"listen_address": address}}, known=KNOWN_NAMES)


def test_a_set_tag_on_a_scalar_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "backend: !!set a\n")
    assert config_error(path) == (
        f"{path}: invalid YAML at line 1, column 10: expected a mapping node, but found scalar"
    )


def test_a_null_fault_asks_for_its_kind(tmp_path: Path) -> None:
    path = write(tmp_path, "simulation:\n  faults: [null]\n")
    assert config_error(path) == (
        f"{path}: simulation.faults[0].kind: is required "
        "(one of lost, unsupported, slow, init_failure, xid)"
    )


def test_simulate_flag_rechecks_faults_against_the_new_number_of_devices(tmp_path: Path) -> None:
    path = tmp_path / "simulate.yaml"
    path.write_text("simulation: {devices: 8, faults: [{kind: lost, device: 7}]}\n")
    config = load_config(str(path), known=KNOWN_NAMES)
    assert apply_overrides(config, Overrides(simulate=8)).simulation.devices == 8
    with pytest.raises(ConfigError, match=r"faults\[0\]\.device: must be below.*--simulate 2"):
        apply_overrides(config, Overrides(simulate=2))


def test_a_fault_cannot_start_before_the_exporter(tmp_path: Path) -> None:
    path = tmp_path / "simulate.yaml"
    path.write_text("simulation: {faults: [{kind: lost, start: -5s}]}\n")
    with pytest.raises(ConfigError, match=r"faults\[0\]\.start: must be >= 0"):
        load_config(str(path), known=KNOWN_NAMES)
