"""Property-based tests of the HTTP request parser through a real socket: whatever bytes a client
sends, the server answers with well-formed HTTP/1.1 responses (or closes without one when the
request never completed), never raises, never logs an unexpected error and never hangs."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_web import ServerFactory, read_to_eof

# Bounded and repeatable for CI: the same examples on every run.
FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
STATUSES = {200, 400, 401, 404, 405, 408, 413, 414, 429, 431, 501, 503, 505}
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [A-Za-z ]+")


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, Errors]]:
    factory = ServerFactory()
    running = factory(read_timeout=2, idle_timeout=2)
    errors = Errors()
    logger = logging.getLogger("exporter.web")
    logger.addHandler(errors)
    try:
        yield running.port, errors
    finally:
        logger.removeHandler(errors)
        factory.stop_all()


def exchange(port: int, data: bytes) -> bytes:
    """Sends `data`, says it is all (half-close), and reads until the server closes; a server
    that neither answers nor closes fails the test through the socket timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed before reading everything: fine
        return read_to_eof(sock)


def responses(reply: bytes) -> list[int]:
    """The statuses of the complete, well-formed responses in `reply`; fails on anything else."""
    statuses = []
    while reply:
        head, sep, rest = reply.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {reply[:200]!r}"
        status_line, *header_lines = head.split(b"\r\n")
        match = STATUS_LINE.fullmatch(status_line)
        assert match, f"bad status line {status_line!r}"
        headers = {}
        for line in header_lines:
            name, colon, value = line.partition(b":")
            assert colon and name and name == name.strip(), f"bad header line {line!r}"
            headers[name.lower()] = value.strip()
        length = int(headers[b"content-length"])
        statuses.append(int(match.group(1)))
        if not rest or rest.startswith(b"HTTP/1.1 "):
            reply = rest  # an answer to HEAD: the length is announced, the body not sent
            continue
        assert len(rest) >= length, f"short body: {length} announced, {len(rest)} sent"
        reply = rest[length:]
    return statuses


def check(server: tuple[int, Errors], data: bytes) -> None:
    port, errors = server
    errors.records.clear()
    statuses = responses(exchange(port, data))
    assert set(statuses) <= STATUSES, statuses
    assert not errors.records, [r.getMessage() for r in errors.records]


METHODS = st.sampled_from(
    ["GET", "HEAD", "POST", "OPTIONS", "CONNECT", "get", "G\x00T", "", "GET GET", "\u00c9"]
) | st.text(min_size=1, max_size=12)
TARGETS = st.sampled_from(
    ["/metrics", "/", "/healthz", "/readyz", "*", "host:443", "http://x/metrics", "", "/%00", "//"]
) | st.text(max_size=40)
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", ""]) | (
    st.text(max_size=10)
)
NAMES = st.sampled_from(
    ["Host", "Content-Length", "Transfer-Encoding", "Connection", "Authorization", "Accept"]
) | st.text(max_size=20)
VALUES = st.sampled_from(
    ["t", "0", "5", "\u00b2", "\u0663", "-1", "chunked", "close", "keep-alive", "Basic !!", ""]
) | st.text(max_size=60)
# Numbers written with the digits other scripts and Unicode's super- and subscripts have, which
# Python's int() and str.isdigit() take for digits and HTTP does not.
NUMBERS = st.text(alphabet="0123456789\u00b2\u00b3\u00b9\u0660\u0663\uff11", min_size=1, max_size=4)
FIELDS = st.tuples(NAMES, VALUES) | st.tuples(st.sampled_from(["Content-Length", "Host"]), NUMBERS)
ENDINGS = st.sampled_from(["\r\n", "\n", "\r", ""])


@st.composite
def structured_requests(draw: st.DrawFn) -> bytes:
    ending = draw(ENDINGS)
    lines = [draw(st.sampled_from(["", "\r\n", "\r\n\r\n"]))]
    if draw(st.booleans()):
        # A valid skeleton, so that what follows reaches the deeper checks.
        lines.append(f"{draw(st.sampled_from(['GET', 'HEAD']))} /metrics HTTP/1.1\r\nHost: t\r\n")
    else:
        lines.append(f"{draw(METHODS)} {draw(TARGETS)} {draw(VERSIONS)}{ending}")
    for name, value in draw(st.lists(FIELDS, max_size=8)):
        lines.append(f"{name}:{draw(st.sampled_from([' ', '', '  ', chr(9)]))}{value}{ending}")
    lines.append(draw(st.sampled_from(["\r\n", "\n", ""])))
    encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
    data = "".join(lines).encode(encoding, errors="replace")
    return data + draw(st.binary(max_size=64))


@FUZZ
@given(data=st.binary(max_size=4096))
def test_any_bytes_get_well_formed_answers(server: tuple[int, Errors], data: bytes) -> None:
    check(server, data)


@FUZZ
@given(data=structured_requests())
def test_near_valid_requests_get_well_formed_answers(
    server: tuple[int, Errors], data: bytes
) -> None:
    check(server, data)


@FUZZ
@given(requests=st.lists(structured_requests(), min_size=2, max_size=4))
def test_pipelined_requests_get_well_formed_answers(
    server: tuple[int, Errors], requests: list[bytes]
) -> None:
    check(server, b"".join(requests))


@FUZZ
@given(
    number=NUMBERS | st.text(max_size=6),
    encoding=st.sampled_from(["utf-8", "latin-1"]),
)
def test_content_length_is_served_only_when_it_is_ascii_digits(
    server: tuple[int, Errors], number: str, encoding: str
) -> None:
    raw = number.encode(encoding, errors="replace")
    head = b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: " + raw + b"\r\n\r\n"
    ascii_digits = raw.strip(b" \t").isdigit() and raw.strip(b" \t").isascii()
    body = b"x" * int(raw) if ascii_digits and int(raw) <= 4096 else b""
    port, errors = server
    errors.records.clear()
    statuses = responses(exchange(port, head + body))
    assert not errors.records, [r.getMessage() for r in errors.records]
    if ascii_digits and int(raw) <= 4096:
        assert statuses == [200]
    elif not ascii_digits and raw.strip(b" \t"):
        assert statuses == [400]


def test_the_fuzzed_server_still_serves_a_plain_scrape(server: tuple[int, Errors]) -> None:
    reply = exchange(server[0], b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert responses(reply) == [200]
