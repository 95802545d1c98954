"""nvml-exporter side by side with nvitop-exporter on the NVML stand-in, on loopback.

    python -m benchmarks [--quick] [--fleets 1x0,8x0,...] [--output docs/performance.md]

For each fleet (GPUSxPROCS[mMIG]) both exporters run, one after the other, each against its own
copy of the same stand-in fleet (tests/nvml_stub) with the same real host processes. Each gets:
an idle window (CPU and NVML calls per sample), a closed-loop scrape load with 1 and 16
keep-alive connections, plain and gzip (latency percentiles, throughput, CPU per scrape), and
resident memory after warm-up and after the scrapes (at least 10,000 on the 8-GPU fleet). Then
both run side by side at 8 GPUs, scraped every 15 s for 60 s, for the cost of being scraped
rarely; and once more with the stand-in charging each call the CPU time it took on a real
H200 (tests/nvml_stub/costs.py). A probe run records what nvitop-exporter asks of the stand-in
and does not get.

Everything is bounded in time (about 10 minutes by default, 3 with --quick). The benchmark
prints figures and judges targets; it exits non-zero only when it cannot run.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nvml_stub
from nvml_stub.costs import H200_DRIVER_580, CostProfile

from benchmarks import load
from benchmarks.fleets import FleetSpec, build_fleet, host_processes, parse_fleets
from benchmarks.measure import ExporterResult, LowRateResult, Settings, low_rate, measure
from benchmarks.report import Case, Report, render, verdicts, write_into
from benchmarks.targets import (
    NVITOP_VERSION,
    Target,
    TargetError,
    nvitop_python,
    nvitop_versions,
    scrape,
    start_nvitop,
    start_ours,
    stop,
)

DEFAULT_FLEETS = "1x0,1x8,1x200,8x0,8x8,8x200,16x0,16x8,16x200,8x0m7"
QUICK_FLEETS = "8x0,8x200,8x0m7"
LOW_RATE_EVERY_S = 15.0
PROBE_SECONDS = 2.5


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark nvml-exporter against nvitop-exporter on the NVML stand-in.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer fleets, shorter windows")
    parser.add_argument(
        "--fleets",
        help=f"comma-separated GPUSxPROCS[mMIG] (default {DEFAULT_FLEETS}; quick {QUICK_FLEETS})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="write the report into this markdown file, replacing its generated block",
    )
    parser.add_argument("--json", type=Path, help="write the raw figures as JSON")
    parser.add_argument(
        "--load",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk if installed (auto), or the built-in Python client",
    )
    parser.add_argument(
        "--nvitop-python",
        help="interpreter with nvitop-exporter installed (default: a venv made on first use)",
    )
    parser.add_argument("--no-nvitop", action="store_true", help="measure nvml-exporter only")
    parser.add_argument("--window", type=float, help="seconds per load window (default 3, quick 2)")
    parser.add_argument(
        "--idle", type=float, help="seconds of the idle window (default 5, quick 3)"
    )
    parser.add_argument(
        "--rss-scrapes",
        type=int,
        help="scrapes before the final memory reading at 8 GPUs (default 10000)",
    )
    parser.add_argument(
        "--low-rate",
        type=float,
        help=f"seconds of the {LOW_RATE_EVERY_S:.0f} s-scrape run, 0 to skip (default 60)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "nvml-exporter-bench",
        help="where the nvitop-exporter environment is kept",
    )
    return parser


def machine_description(load_kind: str, nvitop: str | None) -> list[str]:
    model, cpus = platform.processor() or "unknown CPU", str(os.cpu_count())
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "CPU(s)":
                cpus = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / (1 << 20):.0f} GiB memory"
    except OSError:
        pass
    items = [
        f"Machine: {model}, {cpus} CPUs{memory}, Linux {platform.release()}, no GPU",
        f"Python {platform.python_version()} ({sys.executable}) for nvml-exporter",
        "NVML: the stand-in library from tests/nvml_stub (HGX H200 model), loaded through "
        "pynvml as libnvidia-ml.so.1; its own cost per call (a stat() and a few table "
        "lookups) is in both exporters' CPU figures",
        "Load generator: "
        + (f"{load.wrk_version()} (C, 2 threads)" if load_kind == "wrk" else "Python asyncio"),
    ]
    if nvitop:
        items.append(f"Peer: {nvitop_versions(nvitop)}, default 1 s interval")
    return items


def run_exporter(
    which: str,
    spec: FleetSpec,
    pids: list[int],
    settings: Settings,
    nvitop: str | None,
    rss_scrapes: int,
) -> ExporterResult:
    with tempfile.TemporaryDirectory(prefix=f"bench-{which}-") as tmp:
        workdir = Path(tmp)
        fleet = build_fleet(workdir, spec, pids)
        started = time.perf_counter()
        if which == "ours":
            target = start_ours(
                fleet.env(), workdir, f"{settings.interval:g}s", spec.wants_process_series
            )
        else:
            assert nvitop is not None
            target = start_nvitop(nvitop, fleet.env(), workdir)
        startup = time.perf_counter() - started
        try:
            return measure(
                target, fleet, spec.gpus, settings, startup, which == "ours", rss_scrapes, _log
            )
        finally:
            stop(target)


def run_case(spec: FleetSpec, settings: Settings, nvitop: str | None, rss_scrapes: int) -> Case:
    case = Case(spec)
    with host_processes(spec.processes) as pids:
        for which in ("ours", "nvitop"):
            if which == "nvitop" and nvitop is None:
                continue
            try:
                result = run_exporter(which, spec, pids, settings, nvitop, rss_scrapes)
            except (TargetError, RuntimeError, OSError) as error:
                _log(f"    {which}: failed: {error}")
                case.error += f"{which}: {error}\n"
                continue
            if which == "ours":
                case.ours = result
            else:
                case.theirs = result
    return case


def probe_nvitop(nvitop: str) -> dict[str, dict[str, int]]:
    """Which NVML calls nvitop-exporter makes that fail against the stand-in, and how: one
    short run on 4 GPUs (two of them with 3 MIG instances) with 8 processes."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp,
        host_processes(8) as pids,
    ):
        workdir = Path(tmp)
        fleet = build_fleet(workdir, FleetSpec(4, 8), pids)
        for device in fleet.devices[2:]:
            device.enable_mig(3)
        fleet.apply()
        probe = workdir / "probe.json"
        target = start_nvitop(nvitop, fleet.env(), workdir, probe=probe)
        try:
            time.sleep(PROBE_SECONDS)
            scrape(target)
        finally:
            stop(target)
        found: dict[str, dict[str, int]] = json.loads(probe.read_text())
        return found


# Our collectors whose metrics nvitop-exporter has no counterpart for (profiling, throttling,
# ECC, modes, MIG, XID events): without them ours reads about what it reads.
BEYOND_NVITOP = ("gpm", "clock_events", "ecc", "modes", "mig", "events")
NVITOP_SCOPE = "nvml-exporter (nvitop's metrics)"


def run_low_rate(
    nvitop: str | None, seconds: float, interval: float, costs: CostProfile | None = None
) -> list[LowRateResult]:
    """Both exporters side by side at 8 GPUs, scraped every 15 s for `seconds`; and ours once
    more with only the collectors whose metrics nvitop-exporter also has. With `costs`, the
    stand-in charges each call that profile's CPU time."""
    spec = FleetSpec(8, 0)
    targets: list[Target] = []
    fleets: list[nvml_stub.Fleet] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-low-ours-") as ours_tmp,
        tempfile.TemporaryDirectory(prefix="bench-low-scope-") as scope_tmp,
        tempfile.TemporaryDirectory(prefix="bench-low-nvitop-") as their_tmp,
    ):
        try:
            fleets.append(build_fleet(Path(ours_tmp), spec, [], costs))
            targets.append(start_ours(fleets[-1].env(), Path(ours_tmp), f"{interval:g}s"))
            if nvitop is not None:
                fleets.append(build_fleet(Path(scope_tmp), spec, [], costs))
                targets.append(
                    start_ours(
                        fleets[-1].env(),
                        Path(scope_tmp),
                        f"{interval:g}s",
                        extra_args=[f"--no-collector.{name}" for name in BEYOND_NVITOP],
                        name=NVITOP_SCOPE,
                    )
                )
                fleets.append(build_fleet(Path(their_tmp), spec, [], costs))
                targets.append(start_nvitop(nvitop, fleets[-1].env(), Path(their_tmp)))
            time.sleep(2.0)
            counts = [fleet.calls for fleet in fleets]
            return low_rate(targets, counts, seconds, LOW_RATE_EVERY_S, interval, _log)
        finally:
            for target in targets:
                stop(target)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    begun = time.perf_counter()
    fleets = parse_fleets(args.fleets or (QUICK_FLEETS if args.quick else DEFAULT_FLEETS))
    settings = Settings(
        idle_s=args.idle if args.idle is not None else (3.0 if args.quick else 5.0),
        window_s=args.window if args.window is not None else (2.0 if args.quick else 3.0),
        warmup_s=1.0 if args.quick else 1.5,
        load_kind=load.generator(args.load),
        rss_cap_s=30.0 if args.quick else 120.0,
    )
    rss_scrapes = (
        args.rss_scrapes if args.rss_scrapes is not None else (2_000 if args.quick else 10_000)
    )
    low_rate_s = args.low_rate if args.low_rate is not None else (30.0 if args.quick else 60.0)
    nvitop: str | None = None
    notes: list[str] = []
    if not args.no_nvitop:
        try:
            nvitop = nvitop_python(args.nvitop_python, args.cache)
        except (OSError, subprocess.CalledProcessError) as error:
            notes.append(f"nvitop-exporter {NVITOP_VERSION} could not be installed: {error}")
            _log(f"nvitop-exporter unavailable, measuring nvml-exporter only: {error}")
    command = shlex.join(["python", "-m", "benchmarks", *(argv or sys.argv[1:])])
    report = Report(
        command=command,
        machine=machine_description(settings.load_kind, nvitop),
        cases=[],
        low_rate_every=LOW_RATE_EVERY_S,
        notes=notes,
    )

    if nvitop is not None:
        _log("probe: what nvitop-exporter asks of the stand-in")
        try:
            report.nvitop_needs = probe_nvitop(nvitop)
        except (TargetError, OSError, ValueError) as error:
            notes.append(f"nvitop probe failed: {error}")
    for spec in fleets:
        _log(f"fleet {spec.key} ({spec.label}) at {time.perf_counter() - begun:.0f} s")
        # The memory figure over 10,000 scrapes is taken at the reference fleet only:
        # nvitop-exporter manages about 100 scrapes/s, so elsewhere it would take too long.
        wanted = rss_scrapes if spec == FleetSpec(8, 0) else 0
        case = run_case(spec, settings, nvitop, wanted)
        report.cases.append(case)
        if case.error:
            notes.append(f"{spec.label}: {case.error.strip()}")
    if low_rate_s > 0:
        _log(f"{LOW_RATE_EVERY_S:.0f} s scrapes for {low_rate_s:.0f} s")
        try:
            report.low_rate = run_low_rate(nvitop, low_rate_s, settings.interval)
        except (TargetError, OSError, http.client.HTTPException) as error:
            notes.append(f"low-rate run failed: {error}")
        _log(f"the same with the stand-in charging {H200_DRIVER_580.name}'s costs")
        try:
            report.low_rate_costed = run_low_rate(
                nvitop, low_rate_s, settings.interval, H200_DRIVER_580
            )
        except (TargetError, OSError, http.client.HTTPException) as error:
            notes.append(f"low-rate run with driver costs failed: {error}")

    if not any(case.ours for case in report.cases):
        _log("nvml-exporter could not be measured on any fleet")
        return 1
    text = render(report)
    print(text)
    for name, measured, ok in verdicts(report):
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[ok]
        _log(f"{verdict:>4}  {name}: {measured}")
    _log(f"total {time.perf_counter() - begun:.0f} s")
    if args.output:
        write_into(args.output, text)
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(report), indent=1, default=str))
    return 0
