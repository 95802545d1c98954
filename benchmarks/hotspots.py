"""Where one sample's and one render's CPU goes, measured inside one process.

    python -m benchmarks.hotspots [--fleet 8x0 | --real] [--samples 30] [--pause 1] [--cprofile 25]

Runs the exporter's Sampler (NVML backend, default collectors; the `processes` collector too
when the fleet has processes) against the stand-in in a child process, with every device read
done inline on the calling thread, so that thread CPU time (time.thread_time) can be split by
phase: the NVML reads and collectors, the one nvmlDeviceGetFieldValues call, merging samples
into metric families, and each collector. Then it times rendering each body format. This is a
diagnostic for the exporter's hot paths; unlike `python -m benchmarks` it leaves out the
hand-offs between the sampler and its reader thread, which the full benchmark includes. With
`--real` it reads the GPUs of this machine through NVIDIA's library instead of a stand-in fleet.

It patches the exporter's internals (Sampler._readers.run and a few methods) at run time, so when
those change this tool may need to follow.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _inline(
    calls: Mapping[int, Callable[[], Any]], deadline: float, stall: float
) -> dict[int, Future[Any]]:
    """Stands in for the reader thread: runs the reads on the caller's thread."""
    futures: dict[int, Future[Any]] = {}
    for key, call in calls.items():
        future: Future[Any] = Future()
        future.set_result(call())
        futures[key] = future
    return futures


def _timed(owner: object, name: str, label: str, spent: dict[str, float]) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.thread_time() - started

    setattr(owner, name, wrapper)


def child(samples: int, processes: bool, top: int, pause: float) -> None:
    sys.path.insert(0, str(REPO))
    from prometheus_client import ProcessCollector

    from exporter import sampler as sampler_module
    from exporter.attribution import ProcAttribution
    from exporter.cli import KNOWN_NAMES
    from exporter.collectors import Services
    from exporter.config import parse_config
    from exporter.exposition import FamilyBuilder
    from exporter.nvml import Device
    from exporter.nvml.pynvml_driver import PynvmlDriver
    from exporter.snapshot import Format, Snapshot

    spent: dict[str, float] = {}
    _timed(sampler_module.Sampler, "sample_once", "sample, total", spent)
    _timed(sampler_module.Sampler, "_read_device", "  device reads (NVML + collectors)", spent)
    _timed(Device, "fetch_fields", "    nvmlDeviceGetFieldValues and decoding", spent)
    _timed(FamilyBuilder, "add_lines", "  merging into metric families", spent)
    _timed(FamilyBuilder, "families", "  building families", spent)
    _timed(ProcessCollector, "collect", "  process_* self-metrics", spent)
    for name, member in vars(PynvmlDriver).items():
        if callable(member) and not name.startswith("_"):
            # Inside the collectors' figures: what the binding and the library take.
            _timed(PynvmlDriver, name, f"        driver.{name}", spent)
    config = parse_config(
        {"collectors": {"processes": True}} if processes else {}, known=KNOWN_NAMES
    )
    sampler = sampler_module.Sampler(
        config, PynvmlDriver(), services=Services(ProcAttribution("/proc"), None)
    )
    sampler._readers.run = _inline  # type: ignore[method-assign]
    for collector in sampler._collectors:
        _timed(collector, "collect", f"    collector {collector.name}", spent)
    for _ in range(3):
        sampler.sample_once()
    gc.freeze()  # as the exporter does after start-up
    spent.clear()
    for _ in range(samples):
        # A pause as long as the sampling interval lets other processes evict our caches, as
        # in the exporter; back to back, samples run warm and look up to twice as cheap.
        time.sleep(pause)
        sampler.sample_once()
    devices = len(sampler.session.devices)
    print(
        f"CPU per sample, {devices} GPUs, device reads inline, {pause:g} s apart "
        f"(ms, mean of {samples}):"
    )
    for label, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        if seconds / samples >= 0.00001:
            print(f"  {seconds / samples * 1000:8.3f}  {label}")

    print("CPU per render of a fresh snapshot (ms, best of 5):")
    for fmt in (Format.TEXT, Format.OPENMETRICS):
        for compressed in (False, True):
            best, size = float("inf"), 0
            for _ in range(5):
                # A copy, so that bodies the sampler rendered ahead are not in its cache.
                sampled = sampler.sample_once()
                snapshot = Snapshot(sampled.families, sampled.timestamp)
                started = time.thread_time()
                size = len(snapshot.body(fmt, compressed))
                best = min(best, time.thread_time() - started)
            kind = f"{fmt.name.lower()}{' gzip' if compressed else ''}"
            print(f"  {best * 1000:8.3f}  {kind:<16} {size / 1024:7.1f} KiB")

    if top:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(samples):
            sampler.sample_once().body(Format.TEXT, False)
        profile.disable()
        print(f"cProfile of {samples} samples plus a text render each, by own time:")
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(top)
    sampler.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", default="8x0", help="GPUSxPROCS[mMIG], as in benchmarks")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="top N functions")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between samples")
    parser.add_argument("--real", action="store_true", help="this machine's GPUs, no stand-in")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.real:
        child(args.samples, args.processes, args.cprofile, args.pause)
        return

    from benchmarks.fleets import FleetSpec, build_fleet, host_processes

    spec = FleetSpec.parse(args.fleet)
    with (
        tempfile.TemporaryDirectory(prefix="bench-hotspots-") as tmp,
        host_processes(spec.processes) as pids,
    ):
        fleet = build_fleet(Path(tmp), spec, pids)
        command = [
            sys.executable,
            "-m",
            "benchmarks.hotspots",
            "--child",
            f"--samples={args.samples}",
            f"--cprofile={args.cprofile}",
            f"--pause={args.pause}",
        ]
        if spec.wants_process_series:
            command.append("--processes")
        subprocess.run(command, cwd=REPO, env=fleet.env(), check=True)


if __name__ == "__main__":
    main()
