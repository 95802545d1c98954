"""Configuration: defaults, parsing, overrides, and one file per failure case."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter.cli import main
from exporter.collectors import COLLECTOR_DEFAULTS
from exporter.config import (
    Config,
    ConfigError,
    DeviceSelection,
    Overrides,
    apply_overrides,
    load_config,
    parse_config,
    parse_duration,
    split_listen_address,
)

REPO = Path(__file__).resolve().parent.parent
BAD_CONFIGS = sorted((REPO / "tests" / "configs" / "bad").glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: ...'"
    return first.removeprefix("# expect: ")


def test_no_file_gives_documented_defaults() -> None:
    config = load_config(None)
    assert config.backend == "nvml"
    assert config.web.listen_address == ":9471"
    assert config.sampling.interval == 1.0 and config.sampling.deadline == 1.0
    assert config.devices == DeviceSelection()
    assert config.naming == "nvml"
    assert dict(config.collectors) == dict(COLLECTOR_DEFAULTS)


def test_annotated_example_states_the_defaults() -> None:
    example = load_config(str(REPO / "config" / "exporter.yaml"))
    defaults = Config(source=example.source)
    assert example == defaults


def test_simulation_example_is_valid() -> None:
    config = load_config(str(REPO / "config" / "simulate.yaml"))
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
    assert load_config(None).sampling.slow_fields_interval == 10.0
    config = parse_config({"sampling": {"slow_fields_interval": "0s"}})
    assert config.sampling.slow_fields_interval == 0.0
    merged = apply_overrides(config, Overrides(interval="250ms"))
    assert merged.sampling.slow_fields_interval == 0.0


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [(":9471", None, 9471), ("127.0.0.1:0", "127.0.0.1", 0), ("[::1]:9471", "::1", 9471)],
)
def test_listen_addresses(address: str, host: str | None, port: int) -> None:
    config = parse_config({"web": {"listen_address": address}})
    assert split_listen_address(config.web.listen_address) == (host, port)


def test_devices_by_index_uuid_and_pci_bus_id() -> None:
    config = parse_config({"devices": [0, "GPU-abc", "0000:18:00.0"]})
    assert config.devices == DeviceSelection(include=(0, "GPU-abc", "0000:18:00.0"))
    selection = config.devices
    assert selection.selects(0, "GPU-x", "00000000:01:00.0")
    assert selection.selects(5, "GPU-abc", "00000000:02:00.0")
    assert selection.selects(7, "GPU-y", "00000000:18:00.0")
    assert not selection.selects(1, "GPU-y", "00000000:19:00.0")


def test_devices_include_and_exclude() -> None:
    selection = parse_config({"devices": {"exclude": [3, "GPU-bad", "1b:00.0"]}}).devices
    assert selection.selects(0, "GPU-a", "00000000:18:00.0")
    assert not selection.selects(3, "GPU-b", "00000000:20:00.0")
    assert not selection.selects(4, "GPU-bad", "00000000:21:00.0")
    assert not selection.selects(5, "GPU-c", "00000000:1B:00.0")
    both = parse_config({"devices": {"include": [0, 1], "exclude": [1]}}).devices
    assert [i for i in range(3) if both.selects(i, f"GPU-{i}", "")] == [0]


def test_flags_override_the_file() -> None:
    config = parse_config(
        {"web": {"listen_address": ":1"}, "collectors": {"thermal": False}}, "f.yaml"
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
        load_config(str(path))
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
        load_config(str(tmp_path / "nope.yaml"))


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(str(path)) == Config(source=str(path))


def test_yaml_round_trip_of_faults() -> None:
    raw = yaml.safe_load(
        "simulation:\n  devices: 4\n  faults:\n"
        "    - {kind: slow, device: 2, function: power_usage, delay: 250ms, start: 1m}\n"
    )
    fault = parse_config(raw).simulation.faults[0]
    assert (fault.kind, fault.device, fault.function, fault.delay, fault.start) == (
        "slow",
        2,
        "power_usage",
        0.25,
        60.0,
    )
