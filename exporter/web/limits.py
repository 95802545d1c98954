"""How much the server lets one client hold: request sizes, buffers, deadlines, evictions.

The limits set per deployment (`web.max_connections`, `web.max_requests`, the timeouts) are in
the configuration; these are the ones no operator should need to change.
"""

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
# Response bodies are written in pieces of these sizes (see WebServer._send); a TLS record
# holds 16 KiB.
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
