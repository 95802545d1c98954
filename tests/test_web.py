"""The HTTP layer: the real WebServer, in-process on 127.0.0.1, against a fake MetricsSource.

The server's event loop runs in a background thread; the tests talk to it over loopback with
http.client for well-formed requests and raw sockets for everything else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import http.client
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pytest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

import exporter.snapshot as snapshot_module
from exporter import __version__
from exporter.config import WebConfig
from exporter.snapshot import Family, Format, Snapshot
from exporter.web import Security, WebServer

T = TypeVar("T")

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# What Prometheus (2.x, default scrape_protocols) sends.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
# Larger than what the kernel buffers on both ends of a loopback connection whose reader keeps
# a small receive buffer, so the server's write stays in flight until the client reads.
STALL_PAYLOAD_BYTES = 16 * 1024 * 1024
SMALL_RCVBUF = 64 * 1024
HAVE_PROC_FDS = Path("/proc/self/fd").is_dir()


# --- a fake MetricsSource ------------------------------------------------------------------------


def make_snapshot(temperature: float = 42.0) -> Snapshot:
    gauge = GaugeMetricFamily(
        "webtest_temperature_celsius", "GPU temperature.", labels=["gpu", "uuid"]
    )
    gauge.add_metric(["0", "GPU-0000"], temperature)
    gauge.add_metric(["1", "GPU-0001"], 37.0)
    counter = CounterMetricFamily("webtest_energy_joules", "Energy used.", labels=["gpu"])
    counter.add_metric(["0"], 1234.5)
    families = [Family.from_metric(gauge), Family.from_metric(counter)]
    return Snapshot(families, timestamp=1_700_000_000.0)


class FakeSource:
    """Implements exporter.web.MetricsSource; every field can be changed between requests."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.snapshot: Snapshot = snapshot or make_snapshot()
        self.ready = True
        self.is_alive = True

    def health_problem(self) -> str | None:
        return None if self.is_alive else "the sampler thread is not running"

    def readiness_problem(self) -> str | None:
        return None if self.ready else "NVML is not available (driver_not_loaded)"


class StallingSnapshot(Snapshot):
    """A snapshot whose body is too large for the socket buffers: the response stays in flight
    (in the server's write drain) until the client reads it. `served` is set once the server
    asked for the body, i.e. once the request is in flight."""

    def __init__(self) -> None:
        super().__init__([], timestamp=0.0)
        self.payload = b"#" * (STALL_PAYLOAD_BYTES - 1) + b"\n"
        self.served = threading.Event()

    def body(self, fmt: Format, compressed: bool) -> bytes:
        self.served.set()
        return self.payload


class FailingSnapshot(Snapshot):
    def __init__(self) -> None:
        super().__init__([], timestamp=0.0)

    def body(self, fmt: Format, compressed: bool) -> bytes:
        raise RuntimeError("render failed: secret internal detail")


# --- the server under test, on its own event loop thread ----------------------------------------


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


@dataclass
class Running:
    server: WebServer
    source: FakeSource
    loop: asyncio.AbstractEventLoop
    port: int

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return self.submit(coro).result(timeout)

    def request(
        self,
        method: str = "GET",
        path: str = "/metrics",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()


class ServerFactory:
    def __init__(self) -> None:
        self._started: list[tuple[Running, threading.Thread]] = []

    def __call__(
        self,
        source: FakeSource | None = None,
        *,
        backend: str = "simulated",
        max_requests: int = 40,
        read_timeout: float = 5.0,
        idle_timeout: float = 5.0,
        max_connections: int = 512,
        security: Security | None = None,
    ) -> Running:
        config = WebConfig(
            listen_address="127.0.0.1:0",
            max_requests=max_requests,
            read_timeout=read_timeout,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        )
        source = source or FakeSource()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="web-test-loop", daemon=True)
        thread.start()
        server = WebServer(source, config, backend, security)
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
        assert server.addresses, "the server reported no bound address"
        host, port = server.addresses[0]
        assert host == "127.0.0.1"
        assert port > 0
        running = Running(server, source, loop, port)
        self._started.append((running, thread))
        return running

    def stop_all(self) -> None:
        for running, thread in self._started:
            with contextlib.suppress(Exception):
                running.run(running.server.close(0.5), timeout=5)
            running.loop.call_soon_threadsafe(running.loop.stop)
            thread.join(5)
            loop = running.loop
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()


@pytest.fixture
def start() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    yield factory
    factory.stop_all()


# --- raw socket helpers --------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    raw: bytes = b""


def connect(port: int, *, rcvbuf: int | None = None, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def send(sock: socket.socket, data: bytes) -> None:
    """Sends, tolerating a server that already answered and hung up mid-request."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; fails (socket timeout) if it never does."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = sock.recv(1024 * 1024)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers


def parse_response(data: bytes) -> RawResponse:
    """The first response in `data`; `body` is every byte after its head."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    status, headers = parse_head(head)
    return RawResponse(status, headers, rest, data)


def read_response(stream: BinaryIO, *, head_only: bool = False) -> RawResponse:
    """One response from a keep-alive connection, its body delimited by Content-Length."""
    lines: list[bytes] = []
    while True:
        line = stream.readline()
        assert line, "connection closed before a complete response head"
        if line == b"\r\n":
            break
        lines.append(line)
    head = b"".join(lines).rstrip(b"\r\n")
    status, headers = parse_head(head)
    length = 0 if head_only else int(headers["content-length"])
    body = stream.read(length)
    assert len(body) == length
    return RawResponse(status, headers, body, head + b"\r\n\r\n" + body)


def exchange(port: int, data: bytes) -> RawResponse:
    """Sends raw bytes on a fresh connection and reads until the server closes it."""
    with connect(port) as sock:
        send(sock, data)
        return parse_response(read_to_eof(sock))


def server_end_open(client: socket.socket) -> bool:
    """Whether this process (the server runs in it) still holds a socket for the far end of
    `client`'s connection."""
    client_address = client.getsockname()
    for entry in Path("/proc/self/fd").iterdir():
        try:
            with socket.fromfd(int(entry.name), socket.AF_INET, socket.SOCK_STREAM) as dup:
                if dup.getpeername() == client_address:
                    return True
        except OSError:
            continue
    return False


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stall_request(port: int, path: str = "/metrics", connection: str = "close") -> socket.socket:
    """A client that asks for a large body and does not read it: the request stays in flight."""
    sock = connect(port, rcvbuf=SMALL_RCVBUF)
    send(sock, f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: {connection}\r\n\r\n".encode())
    return sock


# --- /metrics ------------------------------------------------------------------------------------


def test_metrics_defaults_to_text_format_with_snapshot_body(start: ServerFactory) -> None:
    running = start()
    reply = running.request()
    assert reply.status == 200
    assert reply.headers["Content-Type"] == TEXT_CONTENT_TYPE
    assert reply.headers["Content-Encoding"] is None
    assert reply.body == running.source.snapshot.body(Format.TEXT, False)
    assert b'webtest_temperature_celsius{gpu="0",uuid="GPU-0000"} 42\n' in reply.body
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"


def test_metrics_serves_openmetrics_to_prometheus_accept_header(start: ServerFactory) -> None:
    running = start()
    reply = running.request(headers={"Accept": PROMETHEUS_ACCEPT})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE
    assert reply.body == running.source.snapshot.body(Format.OPENMETRICS, False)
    assert reply.body.endswith(b"# EOF\n")
    assert b"webtest_energy_joules_total" in reply.body


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text;version=1.0.0;q=0.2,text/plain;version=0.0.4;q=0.9",
        "text/plain;version=0.0.4,application/openmetrics-text;version=1.0.0;q=0.5",
        "application/openmetrics-text;q=0.5,*/*;q=0.8",
        "application/openmetrics-text;q=0",
        "application/json",
    ],
)
def test_metrics_serves_text_when_text_has_the_higher_quality(
    start: ServerFactory, accept: str
) -> None:
    running = start()
    reply = running.request(headers={"Accept": accept})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == TEXT_CONTENT_TYPE
    assert reply.body == running.source.snapshot.body(Format.TEXT, False)
    assert not reply.body.endswith(b"# EOF\n")


@pytest.mark.parametrize("accept_encoding", ["gzip", "gzip, deflate, br", "br;q=1.0, gzip;q=0.8"])
def test_metrics_is_gzipped_when_accept_encoding_allows_it(
    start: ServerFactory, accept_encoding: str
) -> None:
    running = start()
    reply = running.request(headers={"Accept-Encoding": accept_encoding})
    assert reply.status == 200
    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.headers["Content-Type"] == TEXT_CONTENT_TYPE
    assert reply.body == running.source.snapshot.body(Format.TEXT, True)
    assert gzip.decompress(reply.body) == running.source.snapshot.body(Format.TEXT, False)


def test_metrics_gzipped_openmetrics_decompresses_to_openmetrics_body(
    start: ServerFactory,
) -> None:
    running = start()
    reply = running.request(headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    assert reply.headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE
    assert reply.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(reply.body) == running.source.snapshot.body(Format.OPENMETRICS, False)


@pytest.mark.parametrize("accept_encoding", ["gzip;q=0", "identity", "deflate, br", ""])
def test_metrics_is_not_gzipped_when_gzip_is_refused_or_absent(
    start: ServerFactory, accept_encoding: str
) -> None:
    running = start()
    reply = running.request(headers={"Accept-Encoding": accept_encoding})
    assert reply.status == 200
    assert reply.headers["Content-Encoding"] is None
    assert reply.body == running.source.snapshot.body(Format.TEXT, False)


def test_metrics_is_not_gzipped_when_gzip_is_refused_even_if_wildcard_is_accepted(
    start: ServerFactory,
) -> None:
    running = start()
    reply = running.request(headers={"Accept-Encoding": "gzip;q=0, *"})
    assert reply.headers["Content-Encoding"] is None
    assert reply.body == running.source.snapshot.body(Format.TEXT, False)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Accept": PROMETHEUS_ACCEPT}, {"Accept-Encoding": "gzip"}],
    ids=["plain", "openmetrics", "gzip"],
)
def test_metrics_response_varies_on_accept_and_accept_encoding(
    start: ServerFactory, headers: dict[str, str]
) -> None:
    reply = start().request(headers=headers)
    assert reply.status == 200
    assert reply.headers["Vary"] == "Accept, Accept-Encoding"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}],
    ids=["plain", "openmetrics-gzip"],
)
def test_metrics_head_has_get_headers_and_content_length_but_no_body(
    start: ServerFactory, headers: dict[str, str]
) -> None:
    running = start()
    request_headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with connect(running.port) as sock, sock.makefile("rb") as stream:
        # HEAD then GET on one connection: had HEAD sent a body, the GET would not parse.
        send(sock, f"HEAD /metrics HTTP/1.1\r\nHost: t\r\n{request_headers}\r\n".encode())
        head = read_response(stream, head_only=True)
        send(sock, f"GET /metrics HTTP/1.1\r\nHost: t\r\n{request_headers}\r\n".encode())
        get = read_response(stream)
    assert head.status == get.status == 200
    assert head.body == b""
    assert int(head.headers["content-length"]) == len(get.body) > 0
    head.headers.pop("date")
    get.headers.pop("date")
    assert head.headers == get.headers


def test_metrics_renders_each_body_once_per_snapshot(
    start: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders: list[str] = []

    def counting(name: str, render: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        def wrapper(registry: Any) -> bytes:
            renders.append(name)
            return render(registry)

        return wrapper

    monkeypatch.setattr(
        snapshot_module, "render_text", counting("text", snapshot_module.render_text)
    )
    monkeypatch.setattr(
        snapshot_module,
        "render_openmetrics",
        counting("openmetrics", snapshot_module.render_openmetrics),
    )
    running = start()
    text_bodies = {running.request().body for _ in range(3)}
    gzip_bodies = {running.request(headers={"Accept-Encoding": "gzip"}).body for _ in range(2)}
    om_bodies = {running.request(headers={"Accept": PROMETHEUS_ACCEPT}).body for _ in range(2)}
    assert len(text_bodies) == len(gzip_bodies) == len(om_bodies) == 1
    # The gzip body reuses the cached plain text: one render per format, not per request.
    assert sorted(renders) == ["openmetrics", "text"]


def test_metrics_serves_a_new_snapshot_on_the_next_request(start: ServerFactory) -> None:
    running = start()
    first = running.request()
    assert b'webtest_temperature_celsius{gpu="0",uuid="GPU-0000"} 42\n' in first.body
    newer = make_snapshot(temperature=71.5)
    running.source.snapshot = newer
    second = running.request()
    assert second.body == newer.body(Format.TEXT, False)
    assert b'webtest_temperature_celsius{gpu="0",uuid="GPU-0000"} 71.5\n' in second.body
    assert b" 42\n" not in second.body


def test_metrics_ignores_query_string(start: ServerFactory) -> None:
    running = start()
    reply = running.request(path="/metrics?collect[]=power&x=1")
    assert reply.status == 200
    assert reply.body == running.source.snapshot.body(Format.TEXT, False)


def test_metrics_accepts_absolute_form_request_target(start: ServerFactory) -> None:
    running = start()
    response = exchange(
        running.port,
        b"GET http://127.0.0.1/metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 200
    assert response.body == running.source.snapshot.body(Format.TEXT, False)


def test_metrics_answers_500_without_details_when_rendering_fails(start: ServerFactory) -> None:
    running = start(FakeSource(FailingSnapshot()))
    response = exchange(running.port, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.status == 500
    assert b"secret" not in response.raw
    assert b"Traceback" not in response.raw


# --- keep-alive ----------------------------------------------------------------------------------


def test_http11_serves_two_requests_on_one_connection(start: ServerFactory) -> None:
    running = start()
    with connect(running.port) as sock, sock.makefile("rb") as stream:
        send(sock, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        first = read_response(stream)
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        second = read_response(stream)
    assert first.status == second.status == 200
    assert "connection" not in first.headers
    assert first.body == running.source.snapshot.body(Format.TEXT, False)
    assert second.body == b"ok\n"


def test_http11_answers_pipelined_requests_in_order(start: ServerFactory) -> None:
    running = start()
    with connect(running.port) as sock, sock.makefile("rb") as stream:
        send(
            sock,
            b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        bodies = [read_response(stream).body for _ in range(3)]
        assert stream.read() == b""
    assert bodies == [b"ok\n", b"ready\n", running.source.snapshot.body(Format.TEXT, False)]


def test_http11_connection_close_is_honoured(start: ServerFactory) -> None:
    running = start()
    with connect(running.port) as sock:
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        response = parse_response(read_to_eof(sock))
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert response.body == b"ok\n"


def test_http10_closes_after_response_by_default(start: ServerFactory) -> None:
    running = start()
    with connect(running.port) as sock:
        send(sock, b"GET /healthz HTTP/1.0\r\n\r\n")
        response = parse_response(read_to_eof(sock))
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert response.body == b"ok\n"


def test_http10_keeps_connection_open_when_client_asks_keep_alive(start: ServerFactory) -> None:
    running = start()
    with connect(running.port) as sock, sock.makefile("rb") as stream:
        send(sock, b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = read_response(stream)
        send(sock, b"GET /readyz HTTP/1.0\r\n\r\n")
        second = read_response(stream)
        assert stream.read() == b""
    assert first.status == second.status == 200
    assert "connection" not in first.headers
    assert second.headers["connection"] == "close"
    assert (first.body, second.body) == (b"ok\n", b"ready\n")


def test_request_body_with_content_length_is_discarded_and_connection_reused(
    start: ServerFactory,
) -> None:
    running = start()
    with connect(running.port) as sock, sock.makefile("rb") as stream:
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        first = read_response(stream)
        send(sock, b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        second = read_response(stream)
    assert (first.status, first.body) == (200, b"ok\n")
    assert (second.status, second.body) == (200, b"ready\n")


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(start: ServerFactory) -> None:
    running = start(idle_timeout=0.3)
    with connect(running.port) as sock, sock.makefile("rb") as stream:
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(stream).status == 200
        began = time.monotonic()
        # Closed without a 408: the client was between requests, not in the middle of one.
        assert stream.read() == b""
        assert time.monotonic() - began < 3


# --- /healthz, /readyz, / ------------------------------------------------------------------------


def test_healthz_follows_source_alive(start: ServerFactory) -> None:
    running = start()
    healthy = running.request(path="/healthz")
    running.source.is_alive = False
    unhealthy = running.request(path="/healthz")
    assert (healthy.status, healthy.body) == (200, b"ok\n")
    assert unhealthy.status == 503
    assert unhealthy.body == b"unhealthy: the sampler thread is not running\n"
    assert unhealthy.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_readyz_follows_source_ready(start: ServerFactory) -> None:
    source = FakeSource()
    source.ready = False
    running = start(source)
    not_ready = running.request(path="/readyz")
    source.ready = True
    ready = running.request(path="/readyz")
    assert not_ready.status == 503
    assert b"not ready" in not_ready.body
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert ready.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_landing_page_is_html_with_links_and_security_headers(start: ServerFactory) -> None:
    reply = start(backend="simulated").request(path="/")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    page = reply.body.decode()
    assert page.startswith("<!DOCTYPE html>")
    for link in ("/metrics", "/healthz", "/readyz"):
        assert f'<a href="{link}">' in page
    assert f"Version {__version__}, backend simulated." in page
    assert reply.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert reply.headers["X-Frame-Options"] == "DENY"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Referrer-Policy"] == "no-referrer"


def test_landing_page_escapes_backend_name(start: ServerFactory) -> None:
    reply = start(backend='<script>alert("x")</script>').request(path="/")
    assert b"<script>" not in reply.body
    assert b"&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in reply.body


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/metricsx", "/healthz/extra", "//"])
def test_unknown_path_is_404(start: ServerFactory, path: str) -> None:
    reply = start().request(path=path)
    assert reply.status == 404
    assert reply.body == b"Not Found\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/metrics", "/", "/nope"])
def test_methods_other_than_get_and_head_are_405_with_allow(
    start: ServerFactory, method: str, path: str
) -> None:
    reply = start().request(method, path, body=b"x=1")
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"
    assert reply.body == b"Method Not Allowed\n"


@pytest.mark.parametrize("method", ["get", "G3T", "M-SEARCH", "PROPFIND"])
def test_any_other_method_token_is_405_not_400(start: ServerFactory, method: str) -> None:
    # Methods are case-sensitive tokens (RFC 9110 9.1): "get" is a method, just not ours.
    request = f"{method} /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    response = exchange(start().port, request.encode())
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /metrics",
        b"GET  /metrics HTTP/1.1",
        b"GET /metrics HTTP/1.1 extra",
        b"G(T /metrics HTTP/1.1",
        b"GET metrics HTTP/1.1",
        b"GET /metrics FOO/1.1",
        b"GET /m\xe9trics HTTP/1.1",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ],
)
def test_malformed_request_line_is_400(start: ServerFactory, request_line: bytes) -> None:
    response = exchange(start().port, request_line + b"\r\nHost: t\r\n\r\n")
    assert response.status == 400
    assert response.body == b"Bad Request\n"
    assert response.headers["connection"] == "close"


@pytest.mark.parametrize(
    "header",
    [b"Bad Header Without Colon", b"Bad Name: x", b": empty", b" folded: continuation"],
)
def test_malformed_header_is_400(start: ServerFactory, header: bytes) -> None:
    response = exchange(
        start().port, b"GET /metrics HTTP/1.1\r\nHost: t\r\n" + header + b"\r\n\r\n"
    )
    assert response.status == 400
    assert response.body == b"Bad Request\n"


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "HTTP/3"])
def test_unsupported_http_version_is_505(start: ServerFactory, version: str) -> None:
    response = exchange(start().port, f"GET /metrics {version}\r\nHost: t\r\n\r\n".encode())
    assert response.status == 505
    assert response.body == b"HTTP Version Not Supported\n"


@pytest.mark.parametrize("target_bytes", [9 * 1024, 20 * 1024])
def test_request_line_over_8kib_is_414(start: ServerFactory, target_bytes: int) -> None:
    target = "/metrics?" + "a" * target_bytes
    response = exchange(start().port, f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert response.status == 414
    assert response.body == b"URI Too Long\n"


def test_request_line_just_under_8kib_is_served(start: ServerFactory) -> None:
    running = start()
    line = "GET /metrics?{} HTTP/1.1\r\n"
    target = "a" * (8 * 1024 - len(line.format("")))
    reply = running.request(path=f"/metrics?{target}")
    assert len(line.format(target)) == 8 * 1024
    assert reply.status == 200
    assert reply.body == running.source.snapshot.body(Format.TEXT, False)


def test_headers_over_16kib_in_total_are_431(start: ServerFactory) -> None:
    headers = "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(20))
    response = exchange(start().port, f"GET /metrics HTTP/1.1\r\n{headers}\r\n".encode())
    assert response.status == 431
    assert response.body == b"Request Header Fields Too Large\n"


def test_single_header_line_over_16kib_is_431(start: ServerFactory) -> None:
    response = exchange(
        start().port, f"GET /metrics HTTP/1.1\r\nX-Big: {'v' * 20_000}\r\n\r\n".encode()
    )
    assert response.status == 431


def test_more_than_100_headers_is_431(start: ServerFactory) -> None:
    headers = "".join(f"X-H{i}: v\r\n" for i in range(101))
    response = exchange(start().port, f"GET /metrics HTTP/1.1\r\n{headers}\r\n".encode())
    assert response.status == 431


def test_exactly_100_headers_are_accepted(start: ServerFactory) -> None:
    headers = "".join(f"X-H{i}: v\r\n" for i in range(98))
    response = exchange(
        start().port,
        f"GET /healthz HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n".encode(),
    )
    assert response.status == 200
    assert response.body == b"ok\n"


def test_more_than_100_header_lines_with_one_name_is_431(start: ServerFactory) -> None:
    headers = "X-Same: v\r\n" * 101
    response = exchange(
        start().port, f"GET /healthz HTTP/1.1\r\n{headers}Connection: close\r\n\r\n".encode()
    )
    assert response.status == 431


@pytest.mark.parametrize("coding", ["chunked", "gzip, chunked", "identity"])
def test_transfer_encoding_is_501(start: ServerFactory, coding: str) -> None:
    response = exchange(
        start().port,
        f"POST /metrics HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: {coding}\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n".encode(),
    )
    assert response.status == 501
    assert response.body == b"Not Implemented\n"
    assert response.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("length", "status"), [("abc", 400), ("-1", 400), ("5, 5", 400), (str(64 * 1024 + 1), 413)]
)
def test_bad_or_oversized_content_length_is_rejected(
    start: ServerFactory, length: str, status: int
) -> None:
    response = exchange(
        start().port,
        f"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode(),
    )
    assert response.status == status


def test_client_that_sends_nothing_gets_408_after_read_timeout(start: ServerFactory) -> None:
    running = start(read_timeout=0.3)
    with connect(running.port) as sock:
        began = time.monotonic()
        data = read_to_eof(sock)
        elapsed = time.monotonic() - began
    response = parse_response(data)
    assert response.status == 408
    assert response.body == b"Request Timeout\n"
    assert response.headers["connection"] == "close"
    assert 0.2 < elapsed < 3


def test_client_that_stalls_mid_head_gets_408(start: ServerFactory) -> None:
    running = start(read_timeout=0.3)
    with connect(running.port) as sock:
        send(sock, b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Partial: ")
        began = time.monotonic()
        response = parse_response(read_to_eof(sock))
        elapsed = time.monotonic() - began
    assert response.status == 408
    assert elapsed < 3


@pytest.mark.parametrize(
    "target",
    [
        "/../../etc/passwd",
        "/metrics/../..",
        "/metrics/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2fetc%2fpasswd",
        "//etc/passwd",
        "/./metrics/../etc/passwd",
        "/..\\..\\etc\\passwd",
        "http://127.0.0.1/../../etc/passwd",
    ],
)
def test_path_traversal_is_404_and_never_serves_files(start: ServerFactory, target: str) -> None:
    response = exchange(
        start().port, f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.status == 404
    assert response.body == b"Not Found\n"
    assert b"root:" not in response.raw


@pytest.mark.parametrize(
    "template",
    [
        "GET /{m} HTTP/1.1\r\nHost: t\r\nX-Marker: {m}\r\nConnection: close\r\n\r\n",
        "GET /metrics?{m} HTTP/1.1\r\nHost: t\r\nX-Marker: {m}\r\nConnection: close\r\n\r\n",
        "GET /?{m} HTTP/1.1\r\nHost: {m}\r\nConnection: close\r\n\r\n",
        "HEAD /{m} HTTP/1.1\r\nHost: t\r\nX-Marker: {m}\r\nConnection: close\r\n\r\n",
        "POST /{m} HTTP/1.1\r\nHost: t\r\nX-Marker: {m}\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n",
        "{m} /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "GET /{m} HTTP/9.9\r\nHost: t\r\n\r\n",
        "GET /{m} {m}\r\nHost: t\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: {m}\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: {m}\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nHost: t\r\nBad Name {m}: x\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: {m}\r\nConnection: close\r\n\r\n",
    ],
)
def test_responses_never_reflect_request_path_or_headers(
    start: ServerFactory, template: str
) -> None:
    marker = "MARKER" + uuid.uuid4().hex.upper()
    running = start()
    data = template.format(m=marker).encode()
    with connect(running.port) as sock:
        send(sock, data)
        raw = read_to_eof(sock)
    assert raw.startswith(b"HTTP/1.1 ")
    assert marker.encode() not in raw
    assert marker.lower().encode() not in raw.lower()


def test_head_for_unknown_path_is_404_without_body(start: ServerFactory) -> None:
    response = exchange(
        start().port, b"HEAD /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 404
    assert response.headers["content-length"] == str(len(b"Not Found\n"))
    assert response.body == b""


@pytest.mark.parametrize("request_line", ["GET /nope HTTP/1.1", "DELETE /metrics HTTP/1.1"])
def test_404_and_405_keep_the_connection_usable(start: ServerFactory, request_line: str) -> None:
    running = start(idle_timeout=5.0)
    with connect(running.port, timeout=2) as sock, sock.makefile("rb") as stream:
        send(sock, f"{request_line}\r\nHost: t\r\n\r\n".encode())
        first = read_response(stream)
        assert first.status in (404, 405)
        assert "connection" not in first.headers
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        second = read_response(stream)
        assert (second.status, second.body) == (200, b"ok\n")


def test_http11_request_without_host_is_400(start: ServerFactory) -> None:
    response = exchange(start().port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert response.status == 400


def test_http10_request_without_host_is_served(start: ServerFactory) -> None:
    response = exchange(start().port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (response.status, response.body) == (200, b"ok\n")


def test_whitespace_before_the_colon_is_400(start: ServerFactory) -> None:
    response = exchange(
        start().port, b"GET /metrics HTTP/1.1\r\nHost : t\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 400


# --- max_requests --------------------------------------------------------------------------------


def test_request_over_max_requests_gets_503_then_service_resumes(start: ServerFactory) -> None:
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling), max_requests=1)
    with stall_request(running.port) as slow:
        assert stalling.served.wait(5), "the first request never reached the snapshot"
        # The first response now waits in the server's write drain: one request in flight.
        busy = running.request(path="/healthz")
        assert busy.status == 503
        assert busy.headers["Retry-After"] == "1"
        assert busy.headers["Connection"] == "close"
        assert busy.body == b"Service Unavailable\n"
        # The held request still completes in full once its client reads.
        first = parse_response(read_to_eof(slow))
    assert first.status == 200
    assert first.body == stalling.payload
    after = running.request(path="/healthz")
    assert (after.status, after.body) == (200, b"ok\n")


def test_head_over_max_requests_gets_503_without_body(start: ServerFactory) -> None:
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling), max_requests=1)
    with stall_request(running.port) as slow:
        assert stalling.served.wait(5)
        busy = exchange(
            running.port, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        read_to_eof(slow)
    assert busy.status == 503
    assert busy.headers["retry-after"] == "1"
    assert busy.body == b""


def test_requests_below_max_requests_are_served_while_one_is_in_flight(
    start: ServerFactory,
) -> None:
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling), max_requests=2)
    with stall_request(running.port) as slow:
        assert stalling.served.wait(5)
        reply = running.request(path="/healthz")
        assert (reply.status, reply.body) == (200, b"ok\n")
        assert parse_response(read_to_eof(slow)).body == stalling.payload


@pytest.mark.skipif(not HAVE_PROC_FDS, reason="needs /proc/self/fd")
def test_client_that_stops_reading_is_disconnected_after_read_timeout(
    start: ServerFactory,
) -> None:
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling), read_timeout=0.2)
    with stall_request(running.port) as slow:
        assert stalling.served.wait(5)
        assert server_end_open(slow)
        assert wait_until(lambda: not server_end_open(slow), timeout=1.8)


def test_client_that_stops_reading_is_not_logged_as_unexpected_error(
    start: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling), read_timeout=0.2)
    caplog.set_level(logging.DEBUG, logger="exporter.web")
    with stall_request(running.port) as slow:
        assert stalling.served.wait(5)
        assert server_end_open(slow) or not HAVE_PROC_FDS
        time.sleep(0.5)  # past the 0.2 s write deadline
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


# --- graceful close ------------------------------------------------------------------------------


def test_close_finishes_in_flight_request_and_drops_idle_connections(
    start: ServerFactory,
) -> None:
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling))
    with (
        connect(running.port) as idle,
        idle.makefile("rb") as idle_stream,
        stall_request(running.port, connection="keep-alive") as slow,
        slow.makefile("rb") as slow_stream,
    ):
        send(idle, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(idle_stream).status == 200
        assert stalling.served.wait(5)

        began = time.monotonic()
        closing = running.submit(running.server.close(10.0))
        # The idle keep-alive connection is closed at once, not after idle_timeout (5 s).
        assert idle_stream.read() == b""
        assert time.monotonic() - began < 1.0
        assert not closing.done(), "close() returned while a request was still in flight"

        # The in-flight response arrives whole, then the server hangs up.
        response = read_response(slow_stream)
        assert response.status == 200
        assert response.body == stalling.payload
        assert slow_stream.read() == b""
        closing.result(5)
        assert time.monotonic() - began < 5.0
    with pytest.raises(ConnectionRefusedError):
        connect(running.port).close()


def test_close_with_no_connections_returns_promptly_and_stops_listening(
    start: ServerFactory,
) -> None:
    running = start()
    assert running.request(path="/healthz").status == 200
    began = time.monotonic()
    running.run(running.server.close(10.0))
    assert time.monotonic() - began < 1.0
    with pytest.raises(ConnectionRefusedError):
        connect(running.port).close()


@pytest.mark.skipif(not HAVE_PROC_FDS, reason="needs /proc/self/fd")
def test_close_drops_requests_that_outlive_the_grace_period(start: ServerFactory) -> None:
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling))
    with stall_request(running.port) as slow:
        assert stalling.served.wait(5)
        assert server_end_open(slow)
        began = time.monotonic()
        running.run(running.server.close(0.2))
        assert time.monotonic() - began < 3.0
        assert wait_until(lambda: not server_end_open(slow), timeout=0.5)
