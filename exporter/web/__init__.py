"""HTTP: `/metrics`, `/`, `/healthz`, `/readyz`, on an asyncio server.

A scrape only reads the current Snapshot; it never calls NVML and never waits for the sampler.
`protocol` is the HTTP grammar and its pure helpers, `routes` what each path answers, `server`
the connections: their limits, TLS, reading requests and writing responses.
"""

from exporter.web.routes import MetricsSource
from exporter.web.server import Security, WebServer

__all__ = ["MetricsSource", "Security", "WebServer"]
