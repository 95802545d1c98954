"""Measurements on a real GPU, where the stand-in cannot tell: what the driver answers, what
each NVML call costs, and both exporters side by side.

    python -m benchmarks.realgpu --out DIR [--window 45] [--no-load] [--no-nvitop]

Writes into DIR:
- smi-idle.txt, smi-idle.xml, smi-load.xml: `nvidia-smi -q` (and `-q -x`) next to our scrapes;
- probe.json: GPU 0's answer to each call the exporters make or might make, with wall and CPU
  microseconds per call, the sample-buffer size queries, and which field ids the driver serves;
- side-by-side.json: for each window (idle; then under a matrix-multiply load when torch is
  there) and each exporter, CPU per OS thread, NVML calls per C symbol (counted by
  `_launch.py`, NVML_BENCH_COUNT), scrapes and resident memory;
- scrape-ours-*.txt, scrape-nvitop-*.txt and both exporters' logs.

For a lent GPU machine: run once, bring DIR back, read it here. Refuses the stand-in and the
simulation: it is the one benchmark that must see NVIDIA's library.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.measure import low_rate
from benchmarks.targets import (
    Target,
    rss_bytes,
    scrape,
    start_nvitop,
    start_ours,
    stop,
)

# Repetitions per timed call; a PCIe throughput read blocks ~20 ms in the driver.
REPS = 200
SLOW_REPS = 3
SCRAPE_EVERY_S = 15.0
LOAD_SCRIPT = """
import sys, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
"""


def _log(message: str) -> None:
    print(f"[realgpu] {message}", file=sys.stderr, flush=True)


def _answer(value: Any) -> Any:
    """A JSON-able form of a pynvml answer."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (list, tuple)):
        return [_answer(v) for v in value][:16]
    fields = getattr(value, "_fields_", None)
    if fields:
        return {name: _answer(getattr(value, name)) for name, *_ in fields}
    return repr(value)


def _timed(call: Callable[[], Any], reps: int) -> dict[str, Any]:
    import pynvml

    entry: dict[str, Any] = {}
    try:
        entry["answer"] = _answer(call())
    except pynvml.NVMLError as err:
        entry["error"] = str(err)
        entry["code"] = err.value
        return entry
    except Exception as err:  # a probe records whatever breaks
        entry["error"] = repr(err)
        return entry
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        call()
    entry["wall_us"] = round((time.perf_counter() - wall0) / reps * 1e6, 2)
    entry["cpu_us"] = round((time.thread_time() - cpu0) / reps * 1e6, 2)
    entry["reps"] = reps
    return entry


def _sample_buffers(handle: Any) -> dict[str, Any]:
    """What nvmlDeviceGetSamples answers to a NULL buffer, and what a full read holds: the
    exporter reads the first as the size of the driver's buffer and asks it once."""
    import pynvml

    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetSamples")
    kinds = {
        name: getattr(pynvml, name)
        for name in dir(pynvml)
        if name.startswith("NVML_") and name.endswith("_SAMPLES")
    }
    found: dict[str, Any] = {}
    for name, kind in sorted(kinds.items(), key=lambda item: item[1]):
        value_type, count = ctypes.c_uint(0), ctypes.c_uint(0)
        entry: dict[str, Any] = {}
        for since in (0, 1 << 62):
            ret = fn(
                handle,
                kind,
                ctypes.c_ulonglong(since),
                ctypes.byref(value_type),
                ctypes.byref(count),
                None,
            )
            entry[f"null_query_since_{'0' if since == 0 else 'future'}"] = {
                "ret": ret,
                "count": count.value,
            }
        array = (pynvml.c_nvmlSample_t * 4096)()
        count.value = 4096
        ret = fn(
            handle,
            kind,
            ctypes.c_ulonglong(0),
            ctypes.byref(value_type),
            ctypes.byref(count),
            array,
        )
        entry["full_read"] = {"ret": ret, "count": count.value, "value_type": value_type.value}
        if ret == 0 and count.value:
            stamps = [array[i].timeStamp for i in range(count.value)]
            entry["full_read"]["span_s"] = (max(stamps) - min(stamps)) / 1e6
            newest = max(stamps)
            count.value = 4096
            ret = fn(
                handle,
                kind,
                ctypes.c_ulonglong(newest),
                ctypes.byref(value_type),
                ctypes.byref(count),
                array,
            )
            entry["read_since_newest"] = {"ret": ret, "count": count.value}
            count.value = 0
            ret = fn(
                handle,
                kind,
                ctypes.c_ulonglong(newest),
                ctypes.byref(value_type),
                ctypes.byref(count),
                None,
            )
            entry["null_query_since_newest"] = {"ret": ret, "count": count.value}
        found[name] = entry
    return found


def _fields(handle: Any) -> dict[str, Any]:
    """Every field id pynvml names, scope 0, in batches: which ones this GPU serves."""
    import pynvml

    ids = sorted((getattr(pynvml, n), n) for n in dir(pynvml) if n.startswith("NVML_FI_DEV_"))
    found: dict[str, Any] = {}
    for start in range(0, len(ids), 64):
        batch = ids[start : start + 64]
        values = pynvml.nvmlDeviceGetFieldValues(handle, [i for i, _ in batch])
        for (field_id, name), value in zip(batch, values, strict=True):
            entry: dict[str, Any] = {"ret": value.nvmlReturn}
            if value.nvmlReturn == 0:
                entry["value"] = _answer(value.value)
            found[f"{field_id} {name[len('NVML_FI_DEV_') :]}"] = entry
    return found


def probe(out: Path) -> None:
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    p = pynvml
    # nvmlDeviceGet<name>(handle), each timed over REPS calls.
    plain = (
        "PerformanceState",
        "CurrentClocksEventReasons",
        "BAR1MemoryInfo",
        "CurrPcieLinkGeneration",
        "CurrPcieLinkWidth",
        "MigMode",
        "PersistenceMode",
        "ComputeMode",
        "EccMode",
        "EncoderStats",
        "EncoderUtilization",
        "DecoderUtilization",
        "JpgUtilization",
        "OfaUtilization",
        "UtilizationRates",
        "PowerUsage",
        "PowerManagementLimit",
        "EnforcedPowerLimit",
        "TotalEnergyConsumption",
        "NumFans",
        "FanSpeed",
        "ComputeRunningProcesses",
        "GraphicsRunningProcesses",
        "SupportedEventTypes",
    )
    calls: dict[str, tuple[Callable[[], Any], int]] = {
        name: (functools.partial(getattr(p, f"nvmlDeviceGet{name}"), h), REPS) for name in plain
    }
    calls.update(
        {
            "ClockInfo(graphics)": (
                lambda: p.nvmlDeviceGetClockInfo(h, p.NVML_CLOCK_GRAPHICS),
                REPS,
            ),
            "ClockInfo(sm)": (lambda: p.nvmlDeviceGetClockInfo(h, p.NVML_CLOCK_SM), REPS),
            "ClockInfo(mem)": (lambda: p.nvmlDeviceGetClockInfo(h, p.NVML_CLOCK_MEM), REPS),
            "ClockInfo(video)": (lambda: p.nvmlDeviceGetClockInfo(h, p.NVML_CLOCK_VIDEO), REPS),
            "TemperatureV(gpu)": (lambda: p.nvmlDeviceGetTemperatureV(h, 0), REPS),
            "Temperature(gpu)": (lambda: p.nvmlDeviceGetTemperature(h, 0), REPS),
            "MemoryInfo_v2": (lambda: p.nvmlDeviceGetMemoryInfo(h, version=p.nvmlMemory_v2), REPS),
            "EncoderCapacity(H264)": (lambda: p.nvmlDeviceGetEncoderCapacity(h, 0), REPS),
            "PcieThroughput(tx)": (lambda: p.nvmlDeviceGetPcieThroughput(h, 0), SLOW_REPS),
            "ProcessUtilization": (lambda: p.nvmlDeviceGetProcessUtilization(h, 0), REPS),
            "GpmQueryDeviceSupport": (lambda: p.nvmlGpmQueryDeviceSupport(h), REPS),
            "Architecture": (lambda: p.nvmlDeviceGetArchitecture(h), 1),
            "Name": (lambda: p.nvmlDeviceGetName(h), 1),
            "DriverVersion": (p.nvmlSystemGetDriverVersion, 1),
        }
    )
    result: dict[str, Any] = {"calls": {}}
    for label, (call, reps) in calls.items():
        result["calls"][label] = _timed(call, reps)
        _log(f"probe {label}: {result['calls'][label]}")
    result["sample_buffers"] = _sample_buffers(h)
    result["fields"] = _fields(h)
    try:
        sample = p.nvmlGpmSampleAlloc()
        result["calls"]["GpmSampleGet"] = _timed(lambda: p.nvmlGpmSampleGet(h, sample), REPS)
    except p.NVMLError as err:
        result["calls"]["GpmSampleGet"] = {"error": str(err)}
    (out / "probe.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    p.nvmlShutdown()


def _cost(call: Callable[[], Any], reps: int = 20) -> float | str:
    """CPU microseconds per call, or the error the first call raised."""
    entry = _timed(call, reps)
    cost: float | str = entry["cpu_us"] if "cpu_us" in entry else entry["error"]
    return cost


def costs(out: Path) -> None:
    """What each of the exporter's reads costs through its own driver: every field the GPU
    serves asked alone, every GPM metric alone and all together, and the sample buffers asked
    for all entries, the last second's, or nothing new."""
    import pynvml

    from exporter.collectors.gpm import _METRICS
    from exporter.nvml import Driver
    from exporter.nvml.pynvml_driver import PynvmlDriver

    driver = PynvmlDriver()
    driver.init()
    h = driver.device_handle(0)
    result: dict[str, Any] = {}
    probed = json.loads((out / "probe.json").read_text())["fields"]
    served = [int(key.split()[0]) for key, entry in probed.items() if entry["ret"] == 0]
    result["fields_alone_us"] = {
        key: _cost(functools.partial(driver.field_values, h, [(int(key.split()[0]), 0)]))
        for key, entry in probed.items()
        if entry["ret"] == 0
    }
    result["fields_all_served_us"] = _cost(lambda: driver.field_values(h, [(f, 0) for f in served]))
    first, second = driver.gpm_sample_alloc(), driver.gpm_sample_alloc()
    driver.gpm_sample_get(h, first)
    time.sleep(0.2)
    driver.gpm_sample_get(h, second)
    ids = [entry[0] for entry in _METRICS]
    result["gpm_alone_us"] = {
        str(i): _cost(functools.partial(driver.gpm_metrics, first, second, [i])) for i in ids
    }
    result["gpm_all_us"] = _cost(lambda: driver.gpm_metrics(first, second, ids))
    result["gpm_sample_get_us"] = _cost(lambda: driver.gpm_sample_get(h, first))
    now_us = int(time.time() * 1e6)
    for name in (
        "NVML_GPU_UTILIZATION_SAMPLES",
        "NVML_MEMORY_UTILIZATION_SAMPLES",
        "NVML_DEC_UTILIZATION_SAMPLES",
    ):
        kind: int = getattr(pynvml, name)
        result[name] = {
            f"since_{label}_us": _cost(functools.partial(driver.samples, h, kind, since))
            for label, since in (
                ("0", 0),
                ("1s_ago", now_us - 1_000_000),
                ("now", now_us + 10_000_000),
            )
        }
    result["utilization_rates_us"] = _cost(lambda: driver.utilization(h))
    for name, member in vars(Driver).items():
        if callable(member) and list(inspect.signature(member).parameters) == ["self", "handle"]:
            result[f"driver.{name}_us"] = _cost(functools.partial(getattr(driver, name), h))
    (out / "costs.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    _log(f"costs: {json.dumps(result)}")
    driver.shutdown()


def _counts(path: Path) -> dict[str, int]:
    for _ in range(20):
        try:
            counts: dict[str, int] = json.loads(path.read_text())
            return counts
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def _window(
    targets: Mapping[str, tuple[Target, Path]], seconds: float, out: Path, tag: str
) -> dict[str, Any]:
    """Each exporter scraped every 15 s as Prometheus does, side by side, for `seconds`."""
    runs = low_rate(
        [target for target, _ in targets.values()],
        [functools.partial(_counts, counts) for _, counts in targets.values()],
        seconds,
        SCRAPE_EVERY_S,
        1.0,
        _log,
    )
    result: dict[str, Any] = {"seconds": runs[0].seconds, "scrapes": runs[0].scrapes}
    for (name, (target, _)), run in zip(targets.items(), runs, strict=True):
        result[name] = {
            "cpu_ns": run.cpu_ns,
            "calls": {k: v for k, v in run.calls.items() if v},
            "rss_bytes": rss_bytes(target.pid),
        }
    # Ours, nvidia-smi, then nvitop's, close together, for comparing values.
    for name, (target, _) in targets.items():
        (out / f"scrape-{name}-{tag}.txt").write_bytes(scrape(target))
        if name == "ours":
            _smi(out, f"smi-{tag}", text=False)
    return result


def _smi(out: Path, stem: str, text: bool = True) -> None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return
    xml = subprocess.run([smi, "-q", "-x"], capture_output=True, check=False)
    (out / f"{stem}.xml").write_bytes(xml.stdout + xml.stderr)
    if text:
        plain = subprocess.run([smi, "-q"], capture_output=True, check=False)
        (out / f"{stem}.txt").write_bytes(plain.stdout + plain.stderr)


def side_by_side(out: Path, window: float, with_load: bool, with_nvitop: bool) -> None:
    env = dict(os.environ)
    targets: dict[str, tuple[Target, Path]] = {}
    try:
        count = out / "counts-ours.json"
        ours = start_ours({**env, "NVML_BENCH_COUNT": str(count)}, out)
        targets["ours"] = (ours, count)
        if with_nvitop:
            count = out / "counts-nvitop.json"
            theirs = start_nvitop(sys.executable, {**env, "NVML_BENCH_COUNT": str(count)}, out)
            targets["nvitop"] = (theirs, count)
        time.sleep(5.0)  # past start-up reads and the first scrape's one-off work
        result: dict[str, Any] = {"idle": _window(targets, window, out, "idle")}
        _log(f"idle window: {json.dumps(result['idle'])[:2000]}")
        if with_load:
            loader = subprocess.Popen(
                [sys.executable, "-c", LOAD_SCRIPT, str(window + 15)],
                stdout=(out / "load.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            try:
                time.sleep(10.0)  # CUDA context, allocation, clocks up
                if loader.poll() is None:
                    result["load"] = _window(targets, window, out, "load")
                    _log(f"load window: {json.dumps(result['load'])[:2000]}")
            finally:
                loader.kill()
                loader.wait()
        (out / "side-by-side.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    finally:
        for target, _ in targets.values():
            stop(target)


# What nvidia-smi -q -x says against what we exported, side by side: (quantity, XML path under
# <gpu>, our metric, its labels beyond gpu and uuid, tolerance as a fraction: 0 for settings,
# more for values that move in the seconds between the scrape and nvidia-smi).
_COMPARED: tuple[tuple[str, str, str, dict[str, str], float], ...] = (
    ("memory total", "fb_memory_usage/total", "nvml_memory_total_bytes", {}, 0.0),
    ("memory reserved", "fb_memory_usage/reserved", "nvml_memory_reserved_bytes", {}, 0.002),
    ("memory used", "fb_memory_usage/used", "nvml_memory_used_bytes", {}, 0.05),
    ("BAR1 total", "bar1_memory_usage/total", "nvml_bar1_memory_total_bytes", {}, 0.0),
    ("GPU temperature", "temperature/gpu_temp", "nvml_temperature_celsius", {}, 0.1),
    ("memory temperature", "temperature/memory_temp", "nvml_memory_temperature_celsius", {}, 0.1),
    (
        "power draw (1 s average)",
        "gpu_power_readings/average_power_draw",
        "nvml_power_watts",
        {},
        0.1,
    ),
    ("power limit", "gpu_power_readings/current_power_limit", "nvml_power_limit_watts", {}, 0.0),
    (
        "default power limit",
        "gpu_power_readings/default_power_limit",
        "nvml_power_default_limit_watts",
        {},
        0.0,
    ),
    (
        "minimum power limit",
        "gpu_power_readings/min_power_limit",
        "nvml_power_min_limit_watts",
        {},
        0.0,
    ),
    (
        "maximum power limit",
        "gpu_power_readings/max_power_limit",
        "nvml_power_max_limit_watts",
        {},
        0.0,
    ),
    ("SM clock", "clocks/sm_clock", "nvml_clock_hertz", {"clock": "sm"}, 0.1),
    ("memory clock", "clocks/mem_clock", "nvml_clock_hertz", {"clock": "memory"}, 0.0),
    ("video clock", "clocks/video_clock", "nvml_clock_hertz", {"clock": "video"}, 0.1),
    ("GPU utilization", "utilization/gpu_util", "nvml_gpu_utilization_ratio", {}, 0.05),
    (
        "memory utilization",
        "utilization/memory_util",
        "nvml_memory_controller_utilization_ratio",
        {},
        0.2,
    ),
    (
        "PCIe link generation",
        "pci/pci_gpu_link_info/pcie_gen/current_link_gen",
        "nvml_pcie_link_generation",
        {},
        0.0,
    ),
    (
        "PCIe link width",
        "pci/pci_gpu_link_info/link_widths/current_link_width",
        "nvml_pcie_link_width",
        {},
        0.0,
    ),
    ("PCIe replays", "pci/replay_counter", "nvml_pcie_replays_total", {}, 0.0),
    ("encoder sessions", "encoder_stats/session_count", "nvml_encoder_sessions", {}, 0.0),
)
_UNITS = {"MiB": float(1 << 20), "W": 1.0, "C": 1.0, "MHz": 1e6, "%": 0.01, "x": 1.0}


def _smi_value(text: str | None) -> float | None:
    if text is None:
        return None
    number, _, unit = text.strip().partition(" ")
    number, unit = (number[:-1], "x") if number.endswith("x") else (number, unit)
    try:
        return float(number) * _UNITS.get(unit, 1.0)
    except ValueError:
        return None


def _scraped(text: str, name: str, labels: Mapping[str, str]) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def compare(out: Path) -> str:
    """A markdown table of nvidia-smi's values against our scrape, for each window run."""
    import xml.etree.ElementTree as ET

    rows = ["| window | quantity | nvidia-smi | nvml-exporter | agree |", "|---|---|---:|---:|---|"]
    for tag in ("idle", "load"):
        xml, scraped = out / f"smi-{tag}.xml", out / f"scrape-ours-{tag}.txt"
        if not xml.exists() or not scraped.exists():
            continue
        gpu = ET.parse(xml).getroot().find("gpu")
        text = scraped.read_text()
        for label, path, name, labels, tolerance in _COMPARED:
            node = gpu.find(path) if gpu is not None else None
            theirs = _smi_value(node.text if node is not None else None)
            ours = _scraped(text, name, {"gpu": "0", **labels})
            if theirs is None or ours is None:
                agree = "-"
            else:
                slack = max(abs(theirs) * tolerance, 1.0 if name.endswith("celsius") else 0.0)
                # nvidia-smi rounds memory to MiB and utilization to whole percent.
                slack = max(slack, (1 << 20) if name.endswith("bytes") else 0.0)
                slack = max(slack, 0.01 if name.endswith("ratio") else 0.0)
                agree = "yes" if abs(theirs - ours) <= slack else "**no**"
            rows.append(
                f"| {tag} | {label} | {theirs:g} | {ours:g} | {agree} |"
                if theirs is not None and ours is not None
                else f"| {tag} | {label} | {theirs} | {ours} | {agree} |"
            )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", type=float, default=45.0, help="seconds per window")
    parser.add_argument("--no-load", action="store_true", help="skip the loaded window")
    parser.add_argument("--no-nvitop", action="store_true", help="ours alone")
    parser.add_argument("--probe-only", action="store_true", help="answers and costs only")
    parser.add_argument(
        "--compare", action="store_true", help="only compare an earlier run's scrapes in --out"
    )
    # A dry run of this tool against the stand-in, before a GPU machine's minutes are spent.
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.out), end="")
        return 0
    if not args.dry_run and any(k.startswith("NVML_STUB") for k in os.environ):
        print("realgpu: the stand-in is configured; this needs NVIDIA's library", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    _smi(args.out, "smi-start")
    probe(args.out)
    costs(args.out)
    if args.probe_only:
        return 0
    side_by_side(args.out, args.window, not args.no_load, not args.no_nvitop)
    (args.out / "compare.md").write_text(compare(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
