"""Regression tests for what an adversarial run found in the HTTP server: each fails on the code
before the fix. The server runs in this process on loopback, with real sockets, real TLS and
real bcrypt."""

from __future__ import annotations

import asyncio.sslproto
import base64
import contextlib
import datetime
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import trustme
from test_web import (
    FakeSource,
    ServerFactory,
    StallingSnapshot,
    connect,
    exchange,
    parse_response,
    read_response,
    read_to_eof,
    send,
)

from exporter.web import limits as web
from exporter.webconfig import WebSecurity

GOOD = "GET /metrics HTTP/1.1\r\nHost: t\r\n{extra}\r\n"


@pytest.fixture
def start() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    yield factory
    factory.stop_all()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request_with(header: str) -> bytes:
    return GOOD.format(extra=f"{header}\r\nConnection: close\r\n").encode()


def unexpected_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- request parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length",
    [
        b"\xb2",  # "²" in latin-1, which str.isdigit() accepts and int() refuses
        b"\xb9\xb2",
        "\u0663".encode(),  # ARABIC-INDIC DIGIT THREE, which int() would read as 3
        "\uff11".encode(),  # FULLWIDTH DIGIT ONE
        b"1_0",
        b"+1",
        b"1 1",
        b"0x10",
        b"1e3",
        b"99999999999999999999",
    ],
)
def test_content_length_is_ascii_digits_only(
    start: ServerFactory, caplog: pytest.LogCaptureFixture, length: bytes
) -> None:
    running = start()
    data = b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: " + length + b"\r\n\r\n"
    response = exchange(running.port, data)
    assert response.status == 400
    assert response.headers["connection"] == "close"
    assert unexpected_errors(caplog) == []


def test_a_valid_content_length_is_still_read_and_discarded(start: ServerFactory) -> None:
    running = start()
    data = GOOD.format(extra="Content-Length: 3\r\nConnection: close\r\n").encode() + b"abc"
    assert exchange(running.port, data).status == 200


@pytest.mark.parametrize("empty_lines", [1, 2, web.MAX_LEADING_EMPTY_LINES])
def test_empty_lines_before_the_request_line_are_ignored(
    start: ServerFactory, empty_lines: int
) -> None:
    data = b"\r\n" * empty_lines + GOOD.format(extra="Connection: close\r\n").encode()
    assert exchange(start().port, data).status == 200


def test_an_endless_run_of_empty_lines_is_400(start: ServerFactory) -> None:
    data = b"\r\n" * (web.MAX_LEADING_EMPTY_LINES + 1) + GOOD.format(extra="").encode()
    assert exchange(start().port, data).status == 400


def test_empty_lines_between_keep_alive_requests_are_ignored(start: ServerFactory) -> None:
    running = start()
    with connect(running.port) as sock, sock.makefile("rb") as stream:
        send(sock, GOOD.format(extra="").encode())
        assert read_response(stream).status == 200
        send(sock, b"\r\n" + GOOD.format(extra="").encode())
        assert read_response(stream).status == 200


@pytest.mark.parametrize(
    "request_line",
    [
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443",
        "CONNECT example.com:443 HTTP/1.1",
        "OPTIONS * HTTP/1.1\r\nHost: t",
        "OPTIONS * HTTP/1.0",
    ],
)
def test_connect_and_server_wide_options_are_405(start: ServerFactory, request_line: str) -> None:
    response = exchange(start().port, f"{request_line}\r\n\r\n".encode())
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "header",
    [
        b"X-A\x00b: v",
        b"\x00: v",
        b"X-A: v\x00w",
        b"X-A: v\x01",
        b"X-A: v\x7f",
        b"X-A: v\rw",
        b"X\xe9: v",
        b"X-A : v",
        b"Host: second",
    ],
)
def test_control_characters_bad_names_and_a_second_host_are_400(
    start: ServerFactory, header: bytes
) -> None:
    data = b"GET /metrics HTTP/1.1\r\nHost: t\r\n" + header + b"\r\nConnection: close\r\n\r\n"
    assert exchange(start().port, data).status == 400


@pytest.mark.parametrize(
    "target", [b"/metrics?\x00", b"/metrics?\x01\x1b[31m", b"/metrics#frag", b"/metrics\x7f"]
)
def test_control_characters_and_fragments_in_the_target_are_400(
    start: ServerFactory, target: bytes
) -> None:
    data = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    assert exchange(start().port, data).status == 400


def test_obs_text_in_a_field_value_is_accepted(start: ServerFactory) -> None:
    data = b"GET /metrics HTTP/1.1\r\nHost: t\r\nUser-Agent: caf\xe9\r\nConnection: close\r\n\r\n"
    assert exchange(start().port, data).status == 200


# --- connections ---------------------------------------------------------------------------------


def idle_keep_alive(port: int) -> tuple[socket.socket, object]:
    sock = connect(port)
    stream = sock.makefile("rb")
    send(sock, GOOD.format(extra="").encode())
    assert read_response(stream).status == 200
    return sock, stream


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_at_the_connection_cap_the_least_recently_active_idle_connection_makes_room(
    start: ServerFactory,
) -> None:
    running = start(max_connections=10, idle_timeout=60)
    held = [idle_keep_alive(running.port) for _ in range(10)]
    try:
        # The first one is used again, so it is now the most recently active.
        first_sock, first_stream = held[0]
        send(first_sock, GOOD.format(extra="").encode())
        assert read_response(first_stream).status == 200  # type: ignore[arg-type]
        # A new scraper gets in although ten connections are held open ...
        assert exchange(running.port, request_with("X-New: 1")).status == 200
        # ... at the cost of the connection idle the longest, not of the busy scraper.
        assert closed_by_server(held[1][0])
        send(first_sock, GOOD.format(extra="").encode())
        assert read_response(first_stream).status == 200  # type: ignore[arg-type]
    finally:
        for sock, _ in held:
            sock.close()


def test_slow_clients_still_sending_their_head_give_way_to_a_new_scraper(
    start: ServerFactory,
) -> None:
    running = start(max_connections=5, read_timeout=30)
    slow = [connect(running.port) for _ in range(5)]
    try:
        for sock in slow:
            send(sock, b"GET /metrics HTTP/1.1\r\nHost: t\r\n")  # the head is not finished
        time.sleep(0.2)
        assert exchange(running.port, request_with("X-New: 1")).status == 200
        assert closed_by_server(slow[0])
    finally:
        for sock in slow:
            sock.close()


def test_connections_sending_a_response_are_not_dropped_for_new_ones(
    start: ServerFactory,
) -> None:
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling), max_connections=3, read_timeout=5)
    # Three responses too large for the socket buffers, held until their clients read them.
    held = [connect(running.port, rcvbuf=4096) for _ in range(3)]
    try:
        for sock in held:
            send(sock, request_with("X-Held: 1"))
        assert stalling.served.wait(5)
        time.sleep(0.3)
        with connect(running.port) as newcomer:
            send(newcomer, request_with("X-New: 1"))
            assert read_to_eof(newcomer) == b""  # refused: every slot is sending a response
        for sock in held:
            assert parse_response(read_to_eof(sock)).body == stalling.payload
    finally:
        for sock in held:
            sock.close()


def test_clients_that_ask_and_never_read_give_their_request_slots_up(
    start: ServerFactory,
) -> None:
    stalling = StallingSnapshot()  # a body far larger than the socket buffers
    running = start(FakeSource(stalling), max_requests=2, read_timeout=30)
    pinned = [connect(running.port, rcvbuf=1024) for _ in range(2)]
    try:
        for sock in pinned:
            send(sock, GOOD.format(extra="").encode())  # and never read
        assert stalling.served.wait(5)
        time.sleep(0.2)
        # Both slots are taken by responses nobody reads: at first a newcomer waits its turn ...
        assert exchange(running.port, request_with("X-Now: 1")).status == 503
        # ... but once they have stalled for long enough, it gets its answer.
        time.sleep(web.STALLED_RESPONSE_SECONDS + 0.2)
        assert exchange(running.port, request_with("X-Later: 1")).status == 200
        assert sum(closed_or_reset(sock) for sock in pinned) >= 1
    finally:
        for sock in pinned:
            sock.close()


def test_clients_that_pipeline_cheap_requests_and_never_read_give_way_at_the_cap(
    start: ServerFactory,
) -> None:
    running = start(max_connections=4, read_timeout=30, idle_timeout=30)
    pinned = [connect(running.port, rcvbuf=1024) for _ in range(4)]
    try:
        flood = b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n" * 40000  # 404s, no request slot
        for sock in pinned:
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                sock.sendall(flood)
        time.sleep(web.STALLED_RESPONSE_SECONDS + 0.5)
        # Their answers wait for them; a new scraper still gets in.
        assert exchange(running.port, request_with("X-New: 1")).status == 200
    finally:
        for sock in pinned:
            sock.close()


def test_connections_waiting_for_a_password_check_give_way_at_the_cap(
    start: ServerFactory, tmp_path: Path
) -> None:
    # A costly hash keeps the checks of the wrong passwords waiting while the scraper arrives.
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=13)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    running = start(security=WebSecurity(str(config)), max_connections=4, read_timeout=30)
    good = request_with(f"Authorization: {basic('prometheus', 'right')}")
    assert exchange(running.port, good).status == 200  # verified once, cached from now on
    waiting = [connect(running.port) for _ in range(4)]
    try:
        for i, sock in enumerate(waiting):
            send(sock, request_with(f"Authorization: {basic('prometheus', f'guess{i}')}"))
        time.sleep(0.1)
        assert exchange(running.port, good).status == 200
    finally:
        for sock in waiting:
            sock.close()


def test_a_client_that_stops_reading_pins_a_bounded_amount_of_unsent_response(
    start: ServerFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    write_pair(tmp_path, ca.issue_cert("localhost"))
    stalling = StallingSnapshot()
    running = start(FakeSource(stalling), security=WebSecurity(tls_config(tmp_path)))
    with (
        connect(running.port, rcvbuf=1024) as raw,
        verifying_client(ca).wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        sock.sendall(request_with("X-Never-Reads: 1"))
        assert stalling.served.wait(5)
        time.sleep(0.3)
        [(_, connection)] = running.server._connections.items()
        transport = connection.writer.transport
        assert transport.get_write_buffer_size() <= 2 * web.WRITE_BUFFER_HIGH


def closed_or_reset(sock: socket.socket) -> bool:
    """Whether the server has ended this connection (after whatever it had sent)."""
    sock.settimeout(2)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# --- TLS -----------------------------------------------------------------------------------------


def write_pair(directory: Path, leaf: trustme.LeafCert) -> None:
    for name, blob in (
        ("server.crt", leaf.cert_chain_pems[0]),
        ("server.key", leaf.private_key_pem),
    ):
        staging = directory / (name + ".new")
        staging.write_bytes(blob.bytes())
        staging.replace(directory / name)


def tls_config(directory: Path, extra: str = "") -> str:
    path = directory / "web.yml"
    path.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n" + extra)
    return str(path)


def tls_get(port: int, ctx: ssl.SSLContext, timeout: float = 5) -> int:
    """The status of one GET over TLS; 0 when the server closed without answering."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        sock.sendall(request_with("X-Tls: 1"))
        reply = read_to_eof(sock)
    # A refused client certificate shows under TLS 1.3 only after the handshake, as a close.
    return parse_response(reply).status if reply else 0


def verifying_client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


def past(days: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)


def test_a_replaced_expired_certificate_is_served_without_any_client_connecting(
    start: ServerFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    write_pair(tmp_path, ca.issue_cert("localhost", not_before=past(30), not_after=past(1)))
    running = start(security=WebSecurity(tls_config(tmp_path)))
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_get(running.port, verifying_client(ca))
    write_pair(tmp_path, ca.issue_cert("localhost"))
    # Nobody connects while the files change: the server has to notice on its own.
    time.sleep(web.SECURITY_CHECK_INTERVAL * 2.5)
    assert tls_get(running.port, verifying_client(ca)) == 200


def test_a_certificate_from_a_new_ca_is_served_without_any_client_connecting(
    start: ServerFactory, tmp_path: Path
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    write_pair(tmp_path, old_ca.issue_cert("localhost"))
    running = start(security=WebSecurity(tls_config(tmp_path)))
    assert tls_get(running.port, verifying_client(old_ca)) == 200
    write_pair(tmp_path, new_ca.issue_cert("localhost"))
    time.sleep(web.SECURITY_CHECK_INTERVAL * 2.5)
    assert tls_get(running.port, verifying_client(new_ca)) == 200


def test_a_client_ca_added_under_mtls_is_trusted_without_any_client_connecting(
    start: ServerFactory, tmp_path: Path
) -> None:
    ca, old_clients, new_clients = trustme.CA(), trustme.CA(), trustme.CA()
    write_pair(tmp_path, ca.issue_cert("localhost"))
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(old_clients.cert_pem.bytes())
    config = tls_config(
        tmp_path, "  client_ca_file: clients.pem\n  client_auth_type: RequireAndVerifyClientCert\n"
    )
    running = start(security=WebSecurity(config))
    client = verifying_client(ca)
    new_clients.issue_cert("scraper@example.com").configure_cert(client)
    try:
        refused = tls_get(running.port, client) != 200
    except (ssl.SSLError, ConnectionResetError):
        refused = True
    assert refused
    staging = tmp_path / "clients.pem.new"
    staging.write_bytes(old_clients.cert_pem.bytes() + new_clients.cert_pem.bytes())
    staging.replace(bundle)
    time.sleep(web.SECURITY_CHECK_INTERVAL * 2.5)
    assert tls_get(running.port, client) == 200


def test_tls_connections_keep_small_buffers_and_still_carry_large_bodies(
    start: ServerFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    write_pair(tmp_path, ca.issue_cert("localhost"))
    stalling = StallingSnapshot()  # a body far larger than a TLS record or the read buffer
    running = start(FakeSource(stalling), security=WebSecurity(tls_config(tmp_path)))
    assert asyncio.sslproto.SSLProtocol.max_size <= web.TLS_READ_BUFFER
    with (
        socket.create_connection(("127.0.0.1", running.port), timeout=10) as raw,
        verifying_client(ca).wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        sock.sendall(request_with("X-Big: 1"))
        response = parse_response(read_to_eof(sock))
    assert response.status == 200
    assert response.body == stalling.payload


def test_stalled_tls_handshakes_count_as_connections_and_give_way(
    start: ServerFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    write_pair(tmp_path, ca.issue_cert("localhost"))
    running = start(security=WebSecurity(tls_config(tmp_path)), max_connections=20, read_timeout=30)
    stalled = [connect(running.port) for _ in range(40)]  # TCP only, never a ClientHello
    try:
        # At most max_connections are held: the earliest stalled ones were closed for the later.
        assert sum(closed_by_server(sock) for sock in stalled[:20]) == 20
        assert tls_get(running.port, verifying_client(ca)) == 200
    finally:
        for sock in stalled:
            sock.close()


def test_tls_handshakes_in_progress_are_capped_below_the_connection_cap(
    start: ServerFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    write_pair(tmp_path, ca.issue_cert("localhost"))
    running = start(security=WebSecurity(tls_config(tmp_path)), read_timeout=30)
    extra = 16
    stalled = [connect(running.port) for _ in range(web.MAX_TLS_HANDSHAKES + extra)]
    try:
        assert sum(closed_by_server(sock) for sock in stalled[:extra]) == extra
        assert tls_get(running.port, verifying_client(ca)) == 200
    finally:
        for sock in stalled:
            sock.close()


# --- authentication ------------------------------------------------------------------------------


def test_verified_scrapers_keep_being_served_during_a_wrong_password_flood(
    start: ServerFactory, tmp_path: Path
) -> None:
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=10)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    running = start(security=WebSecurity(str(config)), max_requests=40)
    good = request_with(f"Authorization: {basic('prometheus', 'right')}")
    assert exchange(running.port, good).status == 200  # verified once, as a scraper would be

    stop = threading.Event()
    flood_statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def flood(worker: int) -> None:
        attempt = 0
        while not stop.is_set():
            attempt += 1
            bad = request_with(f"Authorization: {basic('prometheus', f'guess-{worker}-{attempt}')}")
            try:
                status = exchange(running.port, bad).status
            except OSError:
                continue
            with lock:
                flood_statuses[status] += 1

    attackers = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(60)]
    for thread in attackers:
        thread.start()
    try:
        time.sleep(0.5)  # the flood is in full swing
        statuses = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            statuses.append(exchange(running.port, good).status)
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in attackers:
            thread.join(10)
    assert statuses and set(statuses) == {200}, Counter(statuses)
    assert set(flood_statuses) <= {401, 429}, flood_statuses
    assert flood_statuses[401] > 0
