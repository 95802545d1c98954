"""The measurements themselves: one exporter on one fleet, and the 15 s-scrape idle-cost run."""

from __future__ import annotations

import http.client
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import nvml_stub

from benchmarks import load
from benchmarks.targets import (
    Target,
    last_sample_timestamp,
    process_cpu_ns,
    rss_bytes,
    scrape,
    thread_cpu_ns,
)

MiB = 1 << 20
# Threads that do our exporter's sampling: the loop and the device reader(s). The XID event
# waiter (nvml-events) is left out: a driver blocks it in the kernel, the stand-in polls every
# 25 ms, so its CPU here is the stand-in's, not a cost the exporter has on a GPU node.
_OUR_SAMPLER_THREADS = re.compile(r"^(sampler|gpu-reader(-\d+)?)$")
# nvitop-exporter samples on its main thread (PrometheusExporter.collect).
_NVITOP_SAMPLER_THREADS = re.compile(r"^MainThread$")
# Called once per GPU and sample by both exporters (memory used and free).
SAMPLE_ANCHOR = "nvmlDeviceGetMemoryInfo_v2"
LOAD_MATRIX = ((1, False), (1, True), (16, False), (16, True))


@dataclass
class Settings:
    interval: float = 1.0
    warmup_s: float = 1.5
    idle_s: float = 5.0
    window_s: float = 2.0
    load_kind: str = "wrk"
    rss_scrapes: int = 10_000
    rss_cap_s: float = 120.0


@dataclass
class IdleWindow:
    seconds: float
    samples: float
    cpu_ns: dict[str, int]
    calls: dict[str, int]
    samples_seen: int | None = None
    """Our exporter: samples counted from nvml_last_sample_timestamp_seconds, a cross-check."""


@dataclass
class LoadRun:
    connections: int
    gzip: bool
    result: load.LoadResult
    cpu_ns: int


@dataclass
class ExporterResult:
    name: str
    gpus: int
    startup_s: float
    body_plain: int
    body_gzip: int
    series: int
    rss_warm: int
    idle: IdleWindow
    loads: list[LoadRun] = field(default_factory=list)
    rss_after: int = 0
    scrapes: int = 0
    sampler_pattern: str = ""

    # --- per sample -------------------------------------------------------------------------

    def process_ms_per_sample(self) -> float:
        return sum(self.idle.cpu_ns.values()) / 1e6 / self.idle.samples

    def sampler_ms_per_sample(self) -> float:
        pattern = re.compile(self.sampler_pattern)
        ns = sum(v for name, v in self.idle.cpu_ns.items() if pattern.match(name))
        return ns / 1e6 / self.idle.samples

    def idle_rate(self) -> float:
        """CPU seconds per second with nobody scraping."""
        return sum(self.idle.cpu_ns.values()) / 1e9 / self.idle.seconds

    def calls_per_sample(self) -> dict[str, float]:
        return {k: v / self.idle.samples for k, v in sorted(self.idle.calls.items()) if v}

    def total_calls_per_sample(self) -> float:
        return sum(self.calls_per_sample().values())

    # --- per scrape -------------------------------------------------------------------------

    def load(self, connections: int, gzip: bool) -> LoadRun | None:
        return next(
            (r for r in self.loads if r.connections == connections and r.gzip == gzip), None
        )

    def cpu_ms_per_scrape(self, run: LoadRun) -> float:
        """CPU during the load window minus what sampling alone costs, per scrape."""
        if not run.result.requests:
            return float("nan")
        extra = run.cpu_ns / 1e9 - self.idle_rate() * run.result.seconds
        return max(0.0, extra) * 1000 / run.result.requests


def _calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def _cpu_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: max(0, v - before.get(k, 0)) for k, v in after.items()}


def measure(
    target: Target,
    fleet: nvml_stub.Fleet,
    gpus: int,
    settings: Settings,
    startup_s: float,
    ours: bool,
    rss_scrapes: int,
    log: Callable[[str], None],
) -> ExporterResult:
    """Warm-up, an idle window (sampling cost), the load matrix, then scrapes up to
    `rss_scrapes` (bounded by settings.rss_cap_s) for the memory figure."""
    time.sleep(settings.warmup_s)
    plain = gzipped = b""
    for _ in range(3):  # renders and caches every body a load window asks for
        plain = scrape(target)
        gzipped = scrape(target, {"Accept-Encoding": "gzip"})
    series = sum(1 for line in plain.splitlines() if line and not line.startswith(b"#"))
    scrapes = 6
    rss_warm = rss_bytes(target.pid)

    seen_before = last_sample_timestamp(target) if ours else None
    cpu0, calls0, t0 = thread_cpu_ns(target.pid), fleet.calls(), time.perf_counter()
    time.sleep(settings.idle_s)
    cpu1, calls1, t1 = thread_cpu_ns(target.pid), fleet.calls(), time.perf_counter()
    seen_after = last_sample_timestamp(target) if ours else None
    scrapes += 2 if ours else 0
    # Both loops are periodic with the interval, so a window of N intervals holds N samples'
    # CPU and calls whatever its phase.
    idle = IdleWindow(
        seconds=t1 - t0,
        samples=(t1 - t0) / settings.interval,
        cpu_ns=_cpu_delta(cpu0, cpu1),
        calls=_calls_delta(calls0, calls1),
    )
    if seen_before is not None and seen_after is not None:
        idle.samples_seen = round((seen_after - seen_before) / settings.interval)
    result = ExporterResult(
        name=target.name,
        gpus=gpus,
        startup_s=startup_s,
        body_plain=len(plain),
        body_gzip=len(gzipped),
        series=series,
        rss_warm=rss_warm,
        idle=idle,
        sampler_pattern=(_OUR_SAMPLER_THREADS if ours else _NVITOP_SAMPLER_THREADS).pattern,
    )
    log(
        f"    {target.name}: sampling {result.sampler_ms_per_sample():.2f} ms CPU/sample, "
        f"{result.total_calls_per_sample():.0f} NVML calls/sample, "
        f"RSS {rss_warm / MiB:.1f} MiB"
    )

    for connections, gzip in LOAD_MATRIX:
        before = process_cpu_ns(target.pid)
        outcome = load.run(
            settings.load_kind,
            target.host,
            target.port,
            connections,
            settings.window_s,
            gzip,
        )
        run = LoadRun(connections, gzip, outcome, process_cpu_ns(target.pid) - before)
        result.loads.append(run)
        scrapes += outcome.requests
        log(
            f"    {target.name}: {connections:>2} conn {'gzip ' if gzip else 'plain'} "
            f"{outcome.throughput:8.0f}/s  p50 {outcome.p50_ms:7.2f}  p99 {outcome.p99_ms:7.2f}"
            f"  p99.9 {outcome.p999_ms:7.2f} ms  errors {outcome.errors}"
        )

    missing = rss_scrapes - scrapes
    fastest = result.load(16, False)
    if missing > 0 and fastest is not None and fastest.result.throughput > 0:
        seconds = min(settings.rss_cap_s, 1.2 * missing / fastest.result.throughput + 1)
        log(f"    {target.name}: {missing} more scrapes for the memory figure (<= {seconds:.0f} s)")
        more = load.run(settings.load_kind, target.host, target.port, 16, seconds, False)
        scrapes += more.requests
    result.scrapes = scrapes
    result.rss_after = rss_bytes(target.pid)
    return result


# --- the cost of being scraped rarely ---------------------------------------------------------


@dataclass
class LowRateResult:
    name: str
    seconds: float
    scrapes: int
    cpu_ns: dict[str, int]
    """Per OS thread name, over the window."""
    calls: dict[str, int]
    """NVML calls per C symbol over the window."""
    interval: float
    samples_seen: int | None = None

    def samples(self, gpus: int) -> float:
        """Counted by a call both exporters make once per GPU and sample: a loop that sleeps an
        interval after its work samples a little less often than once per interval."""
        anchor = self.calls.get(SAMPLE_ANCHOR, 0)
        return anchor / gpus if anchor else self.seconds / self.interval

    def calls_per_sample(self, gpus: int) -> float:
        """Over a window that spans whole periods of the settings re-read every 10 or 30 s,
        so they count at their average rate (a 5 s idle window holds them or not)."""
        return sum(self.calls.values()) / self.samples(gpus)

    def sampler_ms_per_sample(self, gpus: int) -> float:
        """CPU of the sampling threads per sample: 60 samples rather than the idle window's 5,
        taken while the other exporter runs too, so both see the same machine."""
        ours = self.name.startswith("nvml-exporter")
        pattern = _OUR_SAMPLER_THREADS if ours else _NVITOP_SAMPLER_THREADS
        ns = sum(v for name, v in self.cpu_ns.items() if pattern.match(name))
        return ns / 1e6 / self.samples(gpus)

    @property
    def percent_of_core(self) -> float:
        return sum(self.cpu_ns.values()) / 1e9 / self.seconds * 100

    @property
    def percent_without_event_polling(self) -> float:
        """Without the nvml-events thread, which only the stand-in makes busy (it polls)."""
        ns = sum(v for name, v in self.cpu_ns.items() if name != "nvml-events")
        return ns / 1e9 / self.seconds * 100


def low_rate(
    targets: list[Target],
    call_counts: Sequence[Callable[[], dict[str, int]]],
    seconds: float,
    every: float,
    interval: float,
    log: Callable[[str], None],
) -> list[LowRateResult]:
    """Scrapes each target every `every` seconds for `seconds`, as Prometheus does (one
    keep-alive connection, its Accept header, gzip), and returns each one's CPU over that time.
    The targets run side by side; each is idle most of the time. `call_counts[i]` gives
    target i's NVML calls so far per C symbol (a stand-in's counters, or _launch.py's)."""
    headers = {"Accept": load.PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    connections = {t.name: http.client.HTTPConnection(t.host, t.port, timeout=30) for t in targets}
    ours = [t for t in targets if t.name == "nvml-exporter"]
    seen_before = last_sample_timestamp(ours[0]) if ours else None
    cpu0 = {t.name: thread_cpu_ns(t.pid) for t in targets}
    calls0 = [count() for count in call_counts]
    started = time.perf_counter()
    scrapes = 0
    try:
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
            if elapsed >= scrapes * every:
                for target in targets:
                    conn = connections[target.name]
                    conn.request("GET", "/metrics", headers=headers)
                    conn.getresponse().read()
                scrapes += 1
                log(f"    scrape {scrapes} at {elapsed:4.1f} s")
            next_due = scrapes * every
            time.sleep(max(0.01, min(seconds, next_due) - (time.perf_counter() - started)))
        ended = time.perf_counter()
        cpu1 = {t.name: thread_cpu_ns(t.pid) for t in targets}
        calls1 = [count() for count in call_counts]
    finally:
        for conn in connections.values():
            conn.close()
    results = [
        LowRateResult(
            t.name,
            ended - started,
            scrapes,
            _cpu_delta(cpu0[t.name], cpu1[t.name]),
            _calls_delta(calls0[i], calls1[i]),
            interval,
        )
        for i, t in enumerate(targets)
    ]
    if ours and seen_before is not None:
        seen_after = last_sample_timestamp(ours[0])
        if seen_after is not None:
            results[targets.index(ours[0])].samples_seen = round(seen_after - seen_before)
    for result in results:
        log(f"    {result.name}: {result.percent_of_core:.2f}% of one core")
    return results
