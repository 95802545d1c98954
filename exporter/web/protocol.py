"""HTTP/1.1 as this server speaks it: the request grammar, content negotiation, reason phrases
and response heads. Pure functions over bytes and strings; reading and writing sockets is the
server's work.

The request parser is our own rather than a library such as h11: this server never accepts a
request body, a chunked coding, an upgrade or a trailer, so what it must parse is the request
line and header fields, which it checks against the RFC 9110/9112 grammar with the regular
expressions below, strictly (anything else is a 4xx and the connection closes). That keeps a
second HTTP stack off every GPU node. tests/test_http_fuzz.py feeds it arbitrary bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate

from exporter.snapshot import Format
from exporter.web.limits import MAX_DISCARDED_BODY, MAX_REQUEST_LINE

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

COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
PAGE_HEADERS = {
    **COMMON_HEADERS,
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

# What a route answers: status, header fields, body.
Reply = tuple[int, dict[str, str], bytes]


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


# --- requests ------------------------------------------------------------------------------------


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    """Method, target and version of a request line, or HttpError."""
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
    return method, target, version


def add_header_field(headers: dict[str, str], line: bytes) -> None:
    """Adds one field line to `headers`, keyed by lower-case name; a repeated field's values are
    joined with commas (RFC 9110 5.3)."""
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


def check_request_head(method: str, target: str, version: str, headers: dict[str, str]) -> None:
    """Refuses well-formed heads this server does not serve."""
    if method == "CONNECT" or (method == "OPTIONS" and target == "*"):
        # The authority and asterisk forms (RFC 9112 3.2.3, 3.2.4) are well formed; this
        # server just does not offer those methods.
        raise HttpError(405, headers={"Allow": ALLOWED_METHODS})
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(400)  # required by RFC 9112 3.2


def body_length(headers: dict[str, str]) -> int:
    """The length of the body to read and discard: this server never takes a request body, but
    a short one is skipped so that the connection can go on."""
    if "transfer-encoding" in headers:
        raise HttpError(501)
    length_text = headers.get("content-length")
    if length_text is None:
        return 0
    if not _DIGITS.fullmatch(length_text):
        raise HttpError(400)
    length = int(length_text)
    if length > MAX_DISCARDED_BODY:
        raise HttpError(413)
    return length


def request_path(target: str) -> str:
    """The path of a request target, without its query."""
    if target.startswith(("http://", "https://")):
        # Absolute form, as proxies send it: only the path matters.
        rest = target.split("://", 1)[1]
        target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    if not target.startswith("/"):
        raise HttpError(400)
    return target.split("?", 1)[0]


# --- negotiation ---------------------------------------------------------------------------------


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


# --- responses -----------------------------------------------------------------------------------


def reason(status: int) -> str:
    return _REASONS.get(status, "Error")


def text_headers() -> dict[str, str]:
    return {**COMMON_HEADERS, "Content-Type": "text/plain; charset=utf-8"}


def response_head(status: int, headers: dict[str, str], content_length: int, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}"]
    lines.append(f"Date: {formatdate(usegmt=True)}")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    lines.append(f"Content-Length: {content_length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
