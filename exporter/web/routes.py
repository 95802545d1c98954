"""What each path answers: `/metrics`, `/`, `/healthz`, `/readyz`.

A route only reads what the sampler last published; it never calls NVML and never waits for the
sampler.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Protocol

from exporter import __version__
from exporter.snapshot import Format, Snapshot
from exporter.web.protocol import (
    COMMON_HEADERS,
    PAGE_HEADERS,
    Reply,
    Request,
    accepts_gzip,
    negotiate_format,
    text_headers,
)

Route = Callable[[Request], Reply]


class MetricsSource(Protocol):
    """What the web layer needs from the sampler."""

    @property
    def snapshot(self) -> Snapshot: ...
    def health_problem(self) -> str | None: ...  # None when live
    def readiness_problem(self) -> str | None: ...  # None when ready


class Routes:
    def __init__(self, source: MetricsSource, backend: str) -> None:
        self._source = source
        self._landing = _landing_page(backend)
        self._routes: dict[str, Route] = {
            "/metrics": self._metrics,
            "/": self._landing_route,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    def find(self, path: str) -> Route | None:
        return self._routes.get(path)

    def _metrics(self, request: Request) -> Reply:
        snapshot = self._source.snapshot
        fmt = negotiate_format(request.headers.get("accept", ""))
        if not snapshot.openmetrics:
            fmt = Format.TEXT
        compressed = accepts_gzip(request.headers.get("accept-encoding", ""))
        body = snapshot.body(fmt, compressed)
        headers = {
            **COMMON_HEADERS,
            "Content-Type": fmt.content_type,
            "Vary": "Accept, Accept-Encoding",
        }
        if compressed:
            headers["Content-Encoding"] = "gzip"
        return 200, headers, body

    def _landing_route(self, request: Request) -> Reply:
        return 200, {**PAGE_HEADERS, "Content-Type": "text/html; charset=utf-8"}, self._landing

    def _healthz(self, request: Request) -> Reply:
        problem = self._source.health_problem()
        if problem is None:
            return 200, text_headers(), b"ok\n"
        return 503, text_headers(), f"unhealthy: {problem}\n".encode()

    def _readyz(self, request: Request) -> Reply:
        problem = self._source.readiness_problem()
        if problem is None:
            return 200, text_headers(), b"ready\n"
        return 503, text_headers(), f"not ready: {problem}\n".encode()


def _landing_page(backend: str) -> bytes:
    version = html.escape(__version__)
    shown_backend = html.escape(backend)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>nvml-exporter</title>'
        "</head><body><h1>nvml-exporter</h1>"
        f"<p>Version {version}, backend {shown_backend}.</p><ul>"
        '<li><a href="/metrics">/metrics</a>: metrics</li>'
        '<li><a href="/healthz">/healthz</a>: liveness</li>'
        '<li><a href="/readyz">/readyz</a>: readiness</li>'
        "</ul></body></html>\n"
    ).encode()
