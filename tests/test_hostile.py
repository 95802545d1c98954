"""Hostile input on loopback: the exporter answers it with 4xx, never a traceback, and carries
on serving normal scrapes at its usual speed with no threads left behind."""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ExporterProcess, http_get, start_exporter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    config = tmp_path_factory.mktemp("hostile") / "exporter.yaml"
    config.write_text("web: {read_timeout: 1s, idle_timeout: 2s, max_connections: 300}\n")
    proc = start_exporter(["--simulate", "2", "--config.file", str(config)])
    yield proc
    proc.stop()


def threads(proc: ExporterProcess) -> int:
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def exchange(proc: ExporterProcess, data: bytes, timeout: float = 3.0) -> bytes:
    host, port = proc.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it may already have answered and closed: that is fine
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1.1 "):
        return None
    return int(reply[9:12])


def scrape_latency(proc: ExporterProcess, count: int = 40) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        assert http_get(proc.url + "/metrics").status == 200
        times.append(time.perf_counter() - started)
    return statistics.median(times)


MALFORMED = [
    b"\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /metrics\r\n\r\n",
    b"GET /metrics HTTP/9.9\r\nHost: x\r\n\r\n",
    b"get /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET  /metrics  HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded: header\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 200 + b"\r\n",
]
METHODS = [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT", b"PROPFIND"]
TRAVERSALS = [
    b"/../../etc/passwd",
    b"/metrics/../../../etc/shadow",
    b"/%2e%2e/%2e%2e/etc/passwd",
    b"/..%2f..%2fetc/passwd",
    b"//etc/passwd",
    b"/metrics%00.html",
    b"/\\..\\..\\windows\\win.ini",
]


def test_malformed_requests_get_4xx_and_nothing_reflected(target: ExporterProcess) -> None:
    for data in MALFORMED:
        reply = exchange(target, data)
        status = status_of(reply)
        assert status is None or 400 <= status < 500 or status in {501, 505}, data[:60]
        assert b"Traceback" not in reply and b"aaaaaaaaaa" not in reply and b"bbbbbbbb" not in reply


def test_other_methods_get_405(target: ExporterProcess) -> None:
    for method in METHODS:
        reply = exchange(target, method + b" /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(reply) == 405, method


def test_path_traversal_finds_nothing(target: ExporterProcess) -> None:
    for path in TRAVERSALS:
        reply = exchange(
            target, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status_of(reply) in (400, 404), path
        assert b"root:" not in reply and b"[fonts]" not in reply


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(st.binary(min_size=1, max_size=600))
def test_random_bytes_never_crash_or_leak(target: ExporterProcess, data: bytes) -> None:
    reply = exchange(target, data, timeout=3.0)
    status = status_of(reply)
    assert status is None or status in (400, 404, 405, 408, 413, 414, 431, 501, 505), reply[:80]
    assert b"Traceback" not in reply


def test_after_all_of_it_service_and_threads_are_as_before(target: ExporterProcess) -> None:
    baseline_threads = threads(target)
    baseline = scrape_latency(target)
    idle = []
    host, port = target.address.rsplit(":", 1)
    for _ in range(200):
        idle.append(socket.create_connection((host, int(port)), timeout=5))
    try:
        during = scrape_latency(target, 20)
        assert during < max(2 * baseline, 0.01)
        assert threads(target) == baseline_threads  # no thread per connection
    finally:
        for sock in idle:
            sock.close()
    time.sleep(1.5)  # past read_timeout: the server has dropped every idle connection
    assert target.proc.poll() is None
    assert scrape_latency(target) < max(2 * baseline, 0.01)
    assert threads(target) == baseline_threads
    assert "Traceback" not in target.log()
