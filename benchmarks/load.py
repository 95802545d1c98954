"""Scrape load over keep-alive HTTP/1.1 connections on loopback, closed loop.

`wrk` (Debian package `wrk`) when it is on PATH: it is C, so on a 2-core machine the load
generator takes less CPU away from the exporter under test. Otherwise a Python asyncio client
with raw sockets does the same (each of N connections sends the next request as soon as the
previous response is read), measuring latency from writing the request to reading the last
body byte.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"
GZIP_HEADER = "Accept-Encoding: gzip"
# What Prometheus 2.x/3.x sends when it scrapes (text formats only).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    errors: int
    bytes: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def generator(choice: str) -> str:
    """`wrk` or `python`; `auto` picks wrk when installed."""
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("--load wrk: wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    return choice


def wrk_version() -> str:
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split(" [")[0] if first else "wrk"


def run(
    kind: str,
    host: str,
    port: int,
    connections: int,
    seconds: float,
    gzip: bool,
    timeout: float = 10.0,
) -> LoadResult:
    if kind == "wrk":
        return _run_wrk(host, port, connections, seconds, gzip, timeout)
    return asyncio.run(_run_python(host, port, connections, seconds, gzip, timeout))


def _run_wrk(
    host: str, port: int, connections: int, seconds: float, gzip: bool, timeout: float
) -> LoadResult:
    threads = min(2, connections)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout))}s",
        "-s",
        str(WRK_SCRIPT),
    ]
    if gzip:
        command += ["-H", GZIP_HEADER]
    command.append(f"http://{host}:{port}/metrics")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + timeout + 30, check=False
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("{")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    raw = json.loads(line)
    return LoadResult(
        requests=int(raw["requests"]),
        seconds=raw["duration_us"] / 1e6,
        errors=int(raw["errors"]),
        bytes=int(raw["bytes"]),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        p999_ms=raw["p999_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; 0 for an empty one."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _run_python(
    host: str, port: int, connections: int, seconds: float, gzip: bool, timeout: float
) -> LoadResult:
    request = f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if gzip:
        request += GZIP_HEADER + "\r\n"
    payload = (request + "\r\n").encode()
    latencies: list[float] = []
    counters = {"errors": 0, "bytes": 0}
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (TimeoutError, OSError):
            counters["errors"] += 1
            return
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                writer.write(payload)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await asyncio.wait_for(reader.readexactly(length), timeout)
                latencies.append(time.perf_counter() - started)
                counters["bytes"] += len(head) + len(body)
                if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                    counters["errors"] += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            counters["errors"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return LoadResult(
        requests=len(ordered),
        seconds=elapsed,
        errors=counters["errors"],
        bytes=counters["bytes"],
        p50_ms=percentile(ordered, 50) * 1000,
        p99_ms=percentile(ordered, 99) * 1000,
        p999_ms=percentile(ordered, 99.9) * 1000,
        max_ms=(ordered[-1] if ordered else 0.0) * 1000,
    )
