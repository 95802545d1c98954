"""The real exporter process on the simulated fleet, scraped over HTTP."""

from __future__ import annotations

import gzip
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, ExporterProcess

pytestmark = pytest.mark.slow

H200_MEMORY_BYTES = 143771 * 1024 * 1024
OPENMETRICS = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"


def test_simulated_node_shows_eight_gpus_with_plausible_values(
    exporter: Callable[..., ExporterProcess],
) -> None:
    proc = exporter("--simulate")
    scrape = proc.get()
    assert scrape.status == 200
    assert scrape.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert scrape.values("nvml_up") == {frozenset(): 1.0}
    up = scrape.values("nvml_gpu_up")
    assert len(up) == 8 and set(up.values()) == {1.0}
    uuids = {dict(labels)["uuid"] for labels in up}
    assert len(uuids) == 8 and all(u.startswith("GPU-") for u in uuids)
    assert set(scrape.values("nvml_memory_total_bytes").values()) == {H200_MEMORY_BYTES}
    for labels, used in scrape.values("nvml_memory_used_bytes").items():
        free = scrape.values("nvml_memory_free_bytes")[labels]
        reserved = scrape.values("nvml_memory_reserved_bytes")[labels]
        assert used + free + reserved == H200_MEMORY_BYTES
    assert all(0 <= v <= 1 for v in scrape.values("nvml_gpu_utilization_ratio").values())
    limits = scrape.values("nvml_power_limit_watts")
    for labels, watts in scrape.values("nvml_power_watts").items():
        assert 50 <= watts <= limits[labels] == 700
    assert all(20 <= c <= 95 for c in scrape.values("nvml_temperature_celsius").values())
    sm = {
        dict(k)["gpu"]: v
        for k, v in scrape.values("nvml_clock_hertz").items()
        if dict(k)["clock"] == "sm"
    }
    assert len(sm) == 8 and all(300e6 <= hz <= 1980e6 for hz in sm.values())
    # An H200 SXM module has no fans: the series is absent, not zero.
    assert scrape.values("nvml_fan_speed_ratio") == {}
    info = scrape.values("nvml_gpu_info")
    assert {dict(k)["name"] for k in info} == {"NVIDIA H200"}
    assert scrape.values("nvml_collector_success") and all(
        v == 1 for v in scrape.values("nvml_collector_success").values()
    )


def test_energy_counter_grows_with_power(
    exporter: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    config = tmp_path / "exporter.yaml"
    config.write_text("sampling: {slow_fields_interval: 0s}\n")  # not the default 10 s
    proc = exporter("--simulate", "2", "--sampling.interval", "200ms", "--config.file", str(config))
    first = proc.get().values("nvml_energy_joules_total")
    time.sleep(1.0)
    second = proc.get()
    for labels, joules in second.values("nvml_energy_joules_total").items():
        gained = joules - first[labels]
        watts = second.values("nvml_power_watts")[labels]
        # Roughly one second at 75-800 W; the counter never goes backwards.
        assert 0 < gained < 2 * 800 and watts > 0


def test_openmetrics_and_gzip_carry_the_same_samples(
    exporter: Callable[..., ExporterProcess],
) -> None:
    proc = exporter("--simulate", "2", "--sampling.interval", "1h")
    proc.wait_for(lambda: proc.get("/readyz").status == 200)
    text = proc.get()
    om = proc.get(headers={"Accept": OPENMETRICS})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.text.endswith("# EOF\n")
    assert "nvml_energy_joules_total{" in om.text
    zipped = proc.get(headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped.body).decode() == text.text
    zipped_om = proc.get(headers={"Accept": OPENMETRICS, "Accept-Encoding": "gzip, br"})
    assert gzip.decompress(zipped_om.body).decode() == om.text


def test_output_passes_promtool_check_metrics(exporter: Callable[..., ExporterProcess]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package `prometheus`)"
    proc = exporter("--simulate")
    body = proc.get().text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_sighup_with_broken_config_keeps_serving_old_config(
    exporter: Callable[..., ExporterProcess], tmp_config: Callable[[str], Path]
) -> None:
    path = tmp_config("sampling:\n  interval: 200ms\ncollectors:\n  thermal: false\n")
    proc = exporter("--simulate", "2", "--config.file", str(path))
    proc.wait_for(lambda: proc.get("/readyz").status == 200)
    assert proc.get().values("nvml_temperature_celsius") == {}

    path.write_text("sampling:\n  interval: -1\n")
    proc.signal(signal.SIGHUP)
    proc.wait_for(
        lambda: (
            proc.get().values("nvml_exporter_config_last_reload_successful") == {frozenset(): 0.0}
        )
    )
    assert "sampling.interval: must be > 0" in proc.log()
    scrape = proc.get()
    assert scrape.values("nvml_temperature_celsius") == {}  # old config still in force
    assert len(scrape.values("nvml_gpu_up")) == 2

    path.write_text("sampling:\n  interval: 200ms\ncollectors:\n  thermal: true\n")
    proc.signal(signal.SIGHUP)
    proc.wait_for(lambda: len(proc.get().values("nvml_temperature_celsius")) == 2)
    assert proc.get().values("nvml_exporter_config_last_reload_successful") == {frozenset(): 1.0}


def test_sigterm_exits_zero_within_five_seconds(
    exporter: Callable[..., ExporterProcess],
) -> None:
    proc = exporter("--simulate")
    assert proc.get().status == 200
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.proc.wait(5) == 0
    assert time.monotonic() - started < 5


def test_sigterm_exits_promptly_even_while_an_nvml_call_hangs(
    exporter: Callable[..., ExporterProcess], tmp_config: Callable[[str], Path]
) -> None:
    path = tmp_config(
        "simulation:\n  devices: 2\n  faults:\n"
        "    - {kind: slow, device: 1, function: power_usage, delay: 60s, start: 0}\n"
    )
    proc = exporter("--simulate", "2", "--config.file", str(path))
    proc.wait_for(lambda: proc.get().values("nvml_gpu_up") != {})
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.proc.wait(5) == 0
    assert time.monotonic() - started < 5


def test_sigterm_during_start_up_exits_cleanly(tmp_config: Callable[[str], Path]) -> None:
    # The first sample hangs on a slow GPU, so the exporter is still starting up.
    path = tmp_config(
        "sampling:\n  interval: 5s\nsimulation:\n  devices: 1\n  faults:\n"
        "    - {kind: slow, device: 0, function: memory, delay: 20s}\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "--simulate",
            "1",
            "--config.file",
            str(path),
            "--web.listen-address",
            "127.0.0.1:0",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    assert proc.poll() is None
    started = time.monotonic()
    proc.send_signal(signal.SIGHUP)  # must not kill it either
    time.sleep(0.3)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - started < 5
    assert proc.stderr is not None
    assert "listening" not in proc.stderr.read()
