"""Reading one request head off a connection, within the limits, and skipping a short body.

What the bytes mean is `protocol`'s business; this module only decides how much to read.
"""

from __future__ import annotations

import asyncio

from exporter.web.limits import MAX_HEADER_BYTES, MAX_HEADERS, MAX_LEADING_EMPTY_LINES
from exporter.web.protocol import (
    HttpError,
    Request,
    add_header_field,
    body_length,
    check_request_head,
    parse_request_line,
    request_path,
)


async def read_request_line(reader: asyncio.StreamReader) -> bytes:
    """The request line, past the empty lines RFC 9112 2.2 says to ignore; b"" at EOF."""
    for _ in range(MAX_LEADING_EMPTY_LINES + 1):
        line = await reader.readline()
        if line not in (b"\r\n", b"\n"):
            return line
    raise HttpError(400)


async def read_request(line: bytes, reader: asyncio.StreamReader) -> Request:
    """The request whose line is `line`: its header fields, then a short body read and dropped
    so that the connection can go on."""
    method, target, version = parse_request_line(line)
    headers = await _read_headers(reader)
    check_request_head(method, target, version, headers)
    length = body_length(headers)
    if length:
        await reader.readexactly(length)
    path = request_path(target)
    return Request(method=method, path=path, version=version, headers=headers)


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
        add_header_field(headers, line)
