"""NVML calls one sample costs, counted by the stand-in library (tests/nvml_stub).

    python -m benchmarks.calls [--devices 8] [--seconds 5]

Runs the real exporter (NVML backend, default collectors) against the stand-in, stops it, and
divides the stand-in's per-symbol call counters by the number of samples taken.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import nvml_stub  # noqa: E402

# Called once per device per sample by the default collectors, so it counts samples.
SAMPLE_MARKER = "nvmlDeviceGetMemoryInfo_v2"


def measure(devices: int, seconds: float, interval: str = "200ms") -> dict[str, float]:
    """Per-sample call counts by symbol, start-up calls excluded."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        nvml_stub.Fleet(Path(tmp), num_devices=devices) as fleet,
    ):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "--web.listen-address",
                "127.0.0.1:0",
                "--sampling.interval",
                interval,
            ],
            cwd=REPO,
            env=fleet.env(dict(os.environ)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # past start-up: init, enumeration, the first samples
            fleet.reset_calls()
            time.sleep(seconds)
            proc.send_signal(signal.SIGSTOP)  # freeze mid-run so no sample is half counted
            calls = fleet.calls()
        finally:
            proc.kill()
            proc.wait()
    samples = calls.get(SAMPLE_MARKER, 0) / devices
    if samples < 1:
        raise RuntimeError("the exporter took no sample; is it failing to start?")
    return {name: count / samples for name, count in sorted(calls.items()) if count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    per_sample = measure(args.devices, args.seconds)
    total = sum(per_sample.values())
    print(f"NVML calls per sample, default collectors, {args.devices} GPUs")
    print(f"{'symbol':<44} {'per sample':>10} {'per GPU':>8}")
    for name, count in sorted(per_sample.items(), key=lambda item: -item[1]):
        print(f"{name:<44} {count:>10.1f} {count / args.devices:>8.2f}")
    print(f"{'total':<44} {total:>10.1f} {total / args.devices:>8.2f}")


if __name__ == "__main__":
    main()
