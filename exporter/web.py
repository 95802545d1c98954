"""HTTP: `/metrics`, `/`, `/healthz`, `/readyz`, on an asyncio server.

asyncio rather than a thread per connection: idle and slow clients cost a little memory, not a
thread each, and every read has a deadline. A scrape only reads the current Snapshot; it never
calls NVML and never waits for the sampler.

Deliberately small HTTP/1.1: GET and HEAD, keep-alive, bounded request heads, no request data
ever reflected into a response, no stack traces to clients.

The request parser is our own rather than a library such as h11: this server never accepts a
request body, a chunked coding, an upgrade or a trailer, so what it must parse is the request
line and header fields, which it checks against the RFC 9110/9112 grammar with the regular
expressions below, strictly (anything else is a 4xx and the connection closes). That keeps a
second HTTP stack off every GPU node. tests/test_http_fuzz.py feeds it arbitrary bytes.

Every connection counts against `web.max_connections` from the moment it is accepted, TLS
handshakes included; at the limit the least recently active connection that is not being
answered makes room, so clients that hold connections cannot lock a scraper out.
Authentication waits outside the `web.max_requests` slots, so a flood of bad passwords cannot
starve clients whose credentials are already verified.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import html
import logging
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Protocol

from exporter import __version__
from exporter.auth import AuthVerdict
from exporter.config import WebConfig, split_listen_address
from exporter.snapshot import Format, Snapshot

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
MAX_DISCARDED_BODY = 64 * 1024
STREAM_LIMIT = MAX_HEADER_BYTES + 2
# RFC 9112 2.2 asks servers to skip at least one empty line before a request line; a few more
# are skipped, but not an endless stream of them.
MAX_LEADING_EMPTY_LINES = 8
# A TLS connection holds OpenSSL state and asyncio's receive buffer from its first byte, so
# handshakes still in progress are capped well below web.max_connections; the oldest gives way.
MAX_TLS_HANDSHAKES = 64
SECURITY_CHECK_INTERVAL = 1.0  # seconds between looks at the web config's files
# asyncio gives each TLS connection a receive buffer of SSLProtocol.max_size (256 KiB) for its
# whole life, so a few hundred idle TLS connections would outgrow the memory the exporter is
# given. Requests here are a few hundred bytes and a TLS record is at most 16 KiB, so a buffer
# of two records costs nothing in speed.
TLS_READ_BUFFER = 32 * 1024
# Response bodies are written in pieces of these sizes (see _send); a TLS record holds 16 KiB.
WRITE_CHUNK = 64 * 1024
TLS_WRITE_CHUNK = 16 * 1024
# Unsent response bytes a connection may hold before its send waits for the client: asyncio's
# defaults (64 KiB plain, and 512 KiB more under TLS) would let each client that stops reading
# pin that much memory, at every one of web.max_connections.
WRITE_BUFFER_HIGH = 32 * 1024
# When every request slot is taken, a response that has waited this long for its client to read
# it gives its slot up (its connection is closed). A scraper reads its response at once; a
# client that asks and never reads would otherwise hold a slot until web.read_timeout.
STALLED_RESPONSE_SECONDS = 2.0

_REASONS = {
    200: "OK",
    401: "Unauthorized",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

# RFC 9110 5.6.2: token = 1*tchar; methods and field names are tokens.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 5.5: visible characters, spaces, tabs and obs-text; never NUL, CR, LF or other controls.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# A request target is visible ASCII (RFC 9112 3.2, RFC 3986); a fragment is never sent.
_TARGET = re.compile(r"[\x21-\x22\x24-\x7e]+")
_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() also takes "²" and "٣"

ALLOWED_METHODS = "GET, HEAD"

_COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
_PAGE_HEADERS = {
    **_COMMON_HEADERS,
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class Security(Protocol):
    """TLS and basic auth from an exporter-toolkit web config (exporter.webconfig)."""

    @property
    def ssl_context(self) -> ssl.SSLContext | None: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def auth_required(self) -> bool: ...
    def maybe_reload(self) -> None: ...
    def allow_request(self) -> bool: ...  # the web config's rate_limit
    async def authenticate(self, authorization: str | None) -> AuthVerdict: ...


class MetricsSource(Protocol):
    """What the web layer needs from the sampler."""

    @property
    def snapshot(self) -> Snapshot: ...
    def health_problem(self) -> str | None: ...  # None when live
    def readiness_problem(self) -> str | None: ...  # None when ready


class HttpError(Exception):
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(_REASONS.get(status, ""))
        self.status = status
        self.headers = headers


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def _quality(params: list[str]) -> float:
    for param in params:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "q":
            try:
                return max(0.0, min(1.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0


def negotiate_format(accept: str) -> Format:
    """OpenMetrics when the client prefers it (Prometheus does), else the classic text format."""
    openmetrics_q = text_q = 0.0
    for item in accept.split(","):
        media, *params = item.split(";")
        media = media.strip().lower()
        q = _quality(params)
        if media == "application/openmetrics-text":
            openmetrics_q = max(openmetrics_q, q)
        elif media in ("text/plain", "text/*", "*/*"):
            text_q = max(text_q, q)
    return Format.OPENMETRICS if openmetrics_q > 0 and openmetrics_q > text_q else Format.TEXT


def accepts_gzip(accept_encoding: str) -> bool:
    """RFC 9110 12.5.3: an explicit `gzip` entry wins over the `*` wildcard."""
    gzip_q: float | None = None
    wildcard_q: float | None = None
    for item in accept_encoding.split(","):
        coding, *params = item.split(";")
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            gzip_q = max(gzip_q or 0.0, _quality(params))
        elif coding == "*":
            wildcard_q = _quality(params)
    if gzip_q is not None:
        return gzip_q > 0
    return wildcard_q is not None and wildcard_q > 0


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    # Loop time since which a response has waited for its client to read it, if it does.
    waiting_since: float | None = None


class WebServer:
    def __init__(
        self,
        source: MetricsSource,
        config: WebConfig,
        backend: str,
        security: Security | None = None,
    ) -> None:
        self._source = source
        self._config = config
        self._security = security
        self._backend = backend
        self._servers: list[asyncio.AbstractServer] = []
        # Open connections, least recently active first: the first idle one gives way at the cap.
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        # TLS handshakes in progress, oldest first.
        self._handshakes: dict[asyncio.Task[None], _Connection] = {}
        # Connections whose response holds one of the web.max_requests slots.
        self._responding: dict[asyncio.Task[None], _Connection] = {}
        self._closing = False
        self._watcher: asyncio.Task[None] | None = None
        self.addresses: list[tuple[str, int]] = []
        self._landing = self._landing_page()

    async def start(self) -> None:
        host, port = split_listen_address(self._config.listen_address)
        # TLS is started per connection, after the connection is counted, rather than by the
        # listener: the listener would hand over connections only once their handshake is done,
        # leaving stalled handshakes uncounted and unbounded.
        server = await asyncio.start_server(
            self._on_connection, host=host, port=port, limit=STREAM_LIMIT, reuse_address=True
        )
        self._servers.append(server)
        for sock in server.sockets:
            name = sock.getsockname()
            self.addresses.append((name[0], name[1]))
        for addr, bound_port in self.addresses:
            shown = f"[{addr}]" if ":" in addr else addr
            log.info("listening", extra={"address": f"{shown}:{bound_port}"})
        if self._security is not None:
            if self._security.ssl_context is not None:
                protocol = asyncio.sslproto.SSLProtocol
                protocol.max_size = min(protocol.max_size, TLS_READ_BUFFER)
            self._watcher = asyncio.create_task(self._watch_security(self._security))

    async def close(self, grace: float) -> None:
        """Stops accepting, lets requests in progress finish (up to `grace`), drops idle ones."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
        for server in self._servers:
            server.close()
        busy = list(self._responding)
        for task in list(self._connections):
            if task not in self._responding:
                task.cancel()
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace)
            for task in late:
                # Its client is not reading fast enough to matter now: drop it outright.
                late_connection = self._connections.get(task)
                if late_connection is not None:
                    late_connection.writer.transport.abort()
                task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1)

    @staticmethod
    async def _watch_security(security: Security) -> None:
        # On a timer, not on a connection: a certificate that no client can verify any more
        # would otherwise be replaced only once some client completed a handshake with it.
        while True:
            await asyncio.sleep(SECURITY_CHECK_INTERVAL)
            try:
                security.maybe_reload()
            except Exception:
                log.exception("checking the web config files failed")

    # --- connection handling -------------------------------------------------------------------

    def _make_room(self) -> bool:
        """At web.max_connections, closes the least recently active connection that is not
        being answered in a request slot, or whose answer has waited STALLED_RESPONSE_SECONDS
        for its client to read it: an idle one, one in a TLS handshake or still sending its
        head, one waiting for a password check, one whose 404 or 401 its client never reads.
        False when every connection is being answered."""
        if len(self._connections) < self._config.max_connections:
            return True
        now = asyncio.get_running_loop().time()
        for task, connection in self._connections.items():
            if task not in self._responding or _stalled(connection, now):
                self._drop(task, connection)
                return True
        return False

    def _drop(self, task: asyncio.Task[None], connection: _Connection) -> None:
        del self._connections[task]
        self._handshakes.pop(task, None)
        self._responding.pop(task, None)
        connection.writer.transport.abort()
        task.cancel()

    def _touch(self, task: asyncio.Task[None]) -> None:
        connection = self._connections.pop(task, None)
        if connection is not None:
            self._connections[task] = connection

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing or not self._make_room():
            writer.transport.abort()
            return
        connection = _Connection(writer)
        self._connections[task] = connection
        try:
            context = self._security.ssl_context if self._security else None
            if context is not None:
                await self._handshake(task, connection, context)
            writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
            await self._serve_connection(task, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except (ssl.SSLError, TimeoutError):
            pass  # a failed or stalled handshake: nothing to answer, nothing worth a log line
        except Exception:
            log.exception("unexpected error while serving a connection")
        finally:
            if self._connections.get(task) is connection:
                del self._connections[task]
            self._handshakes.pop(task, None)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1)
            except (Exception, asyncio.CancelledError):
                # Unsent data to a client that stopped reading would hold the socket forever.
                writer.transport.abort()

    async def _handshake(
        self, task: asyncio.Task[None], connection: _Connection, context: ssl.SSLContext
    ) -> None:
        if len(self._handshakes) >= MAX_TLS_HANDSHAKES:
            oldest, stalled = next(iter(self._handshakes.items()))
            self._drop(oldest, stalled)
        self._handshakes[task] = connection
        try:
            await connection.writer.start_tls(
                context, ssl_handshake_timeout=self._config.read_timeout
            )
        except BaseException:
            # A failed handshake never tells the stream it is closed, so a graceful close
            # would wait out its whole deadline for nothing.
            connection.writer.transport.abort()
            raise
        finally:
            self._handshakes.pop(task, None)

    async def _serve_connection(
        self,
        task: asyncio.Task[None],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        first = True
        while not self._closing:
            wait = self._config.read_timeout if first else self._config.idle_timeout
            try:
                line = await asyncio.wait_for(self._request_line(reader), wait)
            except TimeoutError:
                if first:
                    await self._send_error(writer, 408)
                return
            except ValueError:  # the line outgrew the stream limit
                await self._send_error(writer, 414)
                return
            except HttpError as err:
                await self._send_error(writer, err.status)
                return
            if not line:
                return
            first = False
            self._touch(task)
            try:
                try:
                    request = await asyncio.wait_for(
                        self._read_request(line, reader), self._config.read_timeout
                    )
                except TimeoutError:
                    await self._send_error(writer, 408)
                    return
                except HttpError as err:
                    await self._send_error(writer, err.status, err.headers)
                    return
                keep_alive = request.keep_alive and not self._closing
                await self._respond(request, writer, keep_alive)
                if not keep_alive:
                    return
            finally:
                self._touch(task)

    @staticmethod
    async def _request_line(reader: asyncio.StreamReader) -> bytes:
        """The request line, past the empty lines RFC 9112 2.2 says to ignore; b"" at EOF."""
        for _ in range(MAX_LEADING_EMPTY_LINES + 1):
            line = await reader.readline()
            if line not in (b"\r\n", b"\n"):
                return line
        raise HttpError(400)

    async def _read_request(self, line: bytes, reader: asyncio.StreamReader) -> Request:
        if len(line) > MAX_REQUEST_LINE:
            raise HttpError(414)
        try:
            text = line.decode("ascii").rstrip("\r\n")
        except UnicodeDecodeError:
            raise HttpError(400) from None
        parts = text.split(" ")
        if len(parts) != 3 or not all(parts):
            raise HttpError(400)
        method, target, version = parts
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise HttpError(505 if version.startswith("HTTP/") else 400)
        if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
            raise HttpError(400)
        headers = await self._read_headers(reader)
        if method == "CONNECT" or (method == "OPTIONS" and target == "*"):
            # The authority and asterisk forms (RFC 9112 3.2.3, 3.2.4) are well formed; this
            # server just does not offer those methods.
            raise HttpError(405, headers={"Allow": ALLOWED_METHODS})
        if version == "HTTP/1.1" and "host" not in headers:
            raise HttpError(400)  # required by RFC 9112 3.2
        await self._discard_body(headers, reader)
        path = self._path(target)
        return Request(method=method, path=path, version=version, headers=headers)

    @staticmethod
    def _path(target: str) -> str:
        if target.startswith(("http://", "https://")):
            # Absolute form, as proxies send it: only the path matters.
            rest = target.split("://", 1)[1]
            target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        if not target.startswith("/"):
            raise HttpError(400)
        return target.split("?", 1)[0]

    @staticmethod
    async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
        headers: dict[str, str] = {}
        total = lines = 0
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                raise HttpError(431) from None
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            if line in (b"\r\n", b"\n"):
                return headers
            total += len(line)
            lines += 1
            if total > MAX_HEADER_BYTES or lines > MAX_HEADERS:
                raise HttpError(431)
            if line[:1] in (b" ", b"\t"):
                raise HttpError(400)  # obsolete line folding
            name, sep, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            # No whitespace may stand between a field name and its colon (RFC 9112 5.1).
            if not sep or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
                raise HttpError(400)
            name = name.lower()
            value = value.strip(" \t")
            if name in headers:
                if name == "host":
                    raise HttpError(400)  # RFC 9112 3.2: exactly one Host
                value = f"{headers[name]}, {value}"
            headers[name] = value

    @staticmethod
    async def _discard_body(headers: dict[str, str], reader: asyncio.StreamReader) -> None:
        if "transfer-encoding" in headers:
            raise HttpError(501)
        length_text = headers.get("content-length")
        if length_text is None:
            return
        if not _DIGITS.fullmatch(length_text):
            raise HttpError(400)
        length = int(length_text)
        if length > MAX_DISCARDED_BODY:
            raise HttpError(413)
        if length:
            await reader.readexactly(length)

    # --- responses ---------------------------------------------------------------------------

    async def _respond(
        self, request: Request, writer: asyncio.StreamWriter, keep_alive: bool
    ) -> None:
        head = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            headers = {**_text_headers(), "Allow": ALLOWED_METHODS}
            await self._send(writer, 405, headers, b"Method Not Allowed\n", keep_alive)
            return
        if self._security is not None and not self._security.allow_request():
            await self._send_error(writer, 429, {"Retry-After": "1"}, head=head)
            raise ConnectionAbortedError
        # Before a request slot is taken: clients waiting for a password check must not crowd
        # out those whose credentials are already verified.
        verdict = await self._authorize(request)
        if verdict is AuthVerdict.BUSY:
            await self._send_error(writer, 429, {"Retry-After": "1"}, head=head)
            raise ConnectionAbortedError
        if verdict is AuthVerdict.REFUSED:
            headers = {
                **_text_headers(),
                "WWW-Authenticate": 'Basic realm="nvml-exporter", charset="UTF-8"',
            }
            await self._send(writer, 401, headers, b"Unauthorized\n", keep_alive, head)
            return
        route: Callable[[Request], tuple[int, dict[str, str], bytes]] | None = {
            "/metrics": self._metrics,
            "/": self._landing_route,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }.get(request.path)
        if route is None:
            await self._send(writer, 404, _text_headers(), b"Not Found\n", keep_alive, head)
            return
        if len(self._responding) >= self._config.max_requests and not self._free_a_slot():
            await self._send_error(writer, 503, {"Retry-After": "1"}, head=head)
            raise ConnectionAbortedError
        task = asyncio.current_task()
        current = self._connections.get(task) if task is not None else None
        if task is None or current is None:
            raise ConnectionAbortedError  # dropped to make room while its head was parsed
        self._responding[task] = current
        try:
            try:
                status, headers, body = route(request)
            except Exception:
                log.exception("request failed", extra={"path": request.path})
                await self._send_error(writer, 500, head=head)
                raise ConnectionAbortedError from None
            await self._send(writer, status, headers, body, keep_alive, head)
        finally:
            self._responding.pop(task, None)

    def _free_a_slot(self) -> bool:
        """With every request slot taken, closes the connection whose response has waited
        longest for its client to read it, if that is over STALLED_RESPONSE_SECONDS: clients
        that ask and never read must not hold the slots Prometheus needs."""
        now = asyncio.get_running_loop().time()
        stalled = [
            (connection.waiting_since or 0.0, task, connection)
            for task, connection in self._responding.items()
            if _stalled(connection, now)
        ]
        if not stalled:
            return False
        _, task, connection = min(stalled, key=lambda entry: entry[0])
        self._drop(task, connection)
        return True

    async def _authorize(self, request: Request) -> AuthVerdict:
        security = self._security
        if security is None or not security.auth_required:
            return AuthVerdict.ACCEPTED
        if self._config.health_without_auth and request.path in ("/healthz", "/readyz"):
            return AuthVerdict.ACCEPTED
        return await security.authenticate(request.headers.get("authorization"))

    def _metrics(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        snapshot = self._source.snapshot
        fmt = negotiate_format(request.headers.get("accept", ""))
        if not snapshot.openmetrics:
            fmt = Format.TEXT
        compressed = accepts_gzip(request.headers.get("accept-encoding", ""))
        body = snapshot.body(fmt, compressed)
        headers = {
            **_COMMON_HEADERS,
            "Content-Type": fmt.content_type,
            "Vary": "Accept, Accept-Encoding",
        }
        if compressed:
            headers["Content-Encoding"] = "gzip"
        return 200, headers, body

    def _landing_route(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        return 200, {**_PAGE_HEADERS, "Content-Type": "text/html; charset=utf-8"}, self._landing

    def _healthz(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        problem = self._source.health_problem()
        if problem is None:
            return 200, _text_headers(), b"ok\n"
        return 503, _text_headers(), f"unhealthy: {problem}\n".encode()

    def _readyz(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        problem = self._source.readiness_problem()
        if problem is None:
            return 200, _text_headers(), b"ready\n"
        return 503, _text_headers(), f"not ready: {problem}\n".encode()

    def _landing_page(self) -> bytes:
        version = html.escape(__version__)
        backend = html.escape(self._backend)
        return (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>nvml-exporter</title>'
            "</head><body><h1>nvml-exporter</h1>"
            f"<p>Version {version}, backend {backend}.</p><ul>"
            '<li><a href="/metrics">/metrics</a>: metrics</li>'
            '<li><a href="/healthz">/healthz</a>: liveness</li>'
            '<li><a href="/readyz">/readyz</a>: readiness</li>'
            "</ul></body></html>\n"
        ).encode()

    async def _send_error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        extra: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        """Answers a request the connection cannot continue after; the caller then closes."""
        body = f"{_REASONS.get(status, 'Error')}\n".encode()
        headers = {**_text_headers(), **(extra or {})}
        await self._send(writer, status, headers, body, keep_alive=False, head=head)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
        head: bool = False,
    ) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
        lines.append(f"Date: {formatdate(usegmt=True)}")
        if self._security is not None and self._security.headers:
            # The operator's headers (HSTS, say); ours win where both set one.
            headers = {**self._security.headers, **headers}
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        lines.append(f"Content-Length: {len(body)}")
        if not keep_alive or self._closing:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        task = asyncio.current_task()
        connection = self._connections.get(task) if task is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.read_timeout
        # The body goes out a piece at a time, each handed on once the one before has left
        # (or the connection's small buffer has room): a client that stops reading then holds
        # at most WRITE_BUFFER_HIGH of it, not a copy of the whole body. Under TLS each piece
        # is also encrypted on its own, so the ciphertext buffer stays a piece's size.
        view = memoryview(b"" if head else body)
        chunk = TLS_WRITE_CHUNK if writer.get_extra_info("sslcontext") else WRITE_CHUNK
        try:
            for start in range(0, len(view), chunk):
                writer.write(view[start : start + chunk])
                if writer.transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH:
                    continue  # nothing to wait for: the usual case, kept cheap
                if connection is not None and connection.waiting_since is None:
                    connection.waiting_since = loop.time()
                await asyncio.wait_for(writer.drain(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            # A client that stops reading must not keep a socket and its buffer forever.
            writer.transport.abort()
            raise ConnectionAbortedError from None
        finally:
            if connection is not None:
                connection.waiting_since = None


def _stalled(connection: _Connection, now: float) -> bool:
    """Whether the connection's response has waited too long for its client to read it."""
    since = connection.waiting_since
    return since is not None and now - since >= STALLED_RESPONSE_SECONDS


def _text_headers() -> dict[str, str]:
    return {**_COMMON_HEADERS, "Content-Type": "text/plain; charset=utf-8"}
