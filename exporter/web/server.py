"""The asyncio HTTP server: connections, their limits and eviction, TLS, request slots,
authorization and writing responses. What a request means is `protocol`'s business, how much of
it is read `reading`'s, and what a path answers `routes`'.

asyncio rather than a thread per connection: idle and slow clients cost a little memory, not a
thread each, and every read has a deadline.

Deliberately small HTTP/1.1: GET and HEAD, keep-alive, bounded request heads, no request data
ever reflected into a response, no stack traces to clients.

Every connection counts against `web.max_connections` from the moment it is accepted, TLS
handshakes included; at the limit the least recently active connection that is not being
answered makes room, so clients that hold connections cannot lock a scraper out.
Authentication waits outside the `web.max_requests` slots, so a flood of bad passwords cannot
starve clients whose credentials are already verified.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from exporter.auth import AuthVerdict
from exporter.config import WebConfig, split_listen_address
from exporter.web.limits import (
    MAX_TLS_HANDSHAKES,
    SECURITY_CHECK_INTERVAL,
    STALLED_RESPONSE_SECONDS,
    STREAM_LIMIT,
    TLS_READ_BUFFER,
    TLS_WRITE_CHUNK,
    WRITE_BUFFER_HIGH,
    WRITE_CHUNK,
)
from exporter.web.protocol import (
    ALLOWED_METHODS,
    HttpError,
    Request,
    reason,
    response_head,
    text_headers,
)
from exporter.web.reading import read_request, read_request_line
from exporter.web.routes import MetricsSource, Routes

# The package's one logger, under the name operators already filter its log lines on.
log = logging.getLogger("exporter.web")


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
        self._routes = Routes(source, backend)
        self._config = config
        self._security = security
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
                line = await asyncio.wait_for(read_request_line(reader), wait)
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
                        read_request(line, reader), self._config.read_timeout
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

    # --- responses ---------------------------------------------------------------------------

    async def _respond(
        self, request: Request, writer: asyncio.StreamWriter, keep_alive: bool
    ) -> None:
        head = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            headers = {**text_headers(), "Allow": ALLOWED_METHODS}
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
                **text_headers(),
                "WWW-Authenticate": 'Basic realm="nvml-exporter", charset="UTF-8"',
            }
            await self._send(writer, 401, headers, b"Unauthorized\n", keep_alive, head)
            return
        route = self._routes.find(request.path)
        if route is None:
            await self._send(writer, 404, text_headers(), b"Not Found\n", keep_alive, head)
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

    async def _send_error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        extra: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        """Answers a request the connection cannot continue after; the caller then closes."""
        body = f"{reason(status)}\n".encode()
        headers = {**text_headers(), **(extra or {})}
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
        if self._security is not None and self._security.headers:
            # The operator's headers (HSTS, say); ours win where both set one.
            headers = {**self._security.headers, **headers}
        close = not keep_alive or self._closing
        writer.write(response_head(status, headers, len(body), close))
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
