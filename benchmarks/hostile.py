"""`python -m benchmarks.hostile`: what clients without credentials can cost the exporter.

Starts the exporter on the simulated fleet (loopback only) and measures its resident memory
while it holds idle plain connections, idle TLS connections and stalled TLS handshakes, and
the authenticated scrapes' success and latency during a wrong-password flood. Every load is
bounded in count and time. Prints a Markdown section for docs/performance.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import trustme

MAX_CONNECTIONS = 512
FLOOD_SECONDS = 10.0
FLOOD_CLIENTS = 60


@dataclass
class Exporter:
    proc: subprocess.Popen[bytes]
    port: int

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return kib / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def exporter(directory: Path, web_config: str | None) -> Iterator[Exporter]:
    port = free_port()
    config = directory / "exporter.yaml"
    config.write_text(
        f"web: {{listen_address: '127.0.0.1:{port}', max_connections: {MAX_CONNECTIONS}, "
        "read_timeout: 10s, idle_timeout: 60s}\n"
    )
    args = [sys.executable, "-m", "exporter", "--simulate", "8", "--config.file", str(config)]
    if web_config is not None:
        path = directory / "web.yml"
        path.write_text(web_config)
        args += ["--web.config.file", str(path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the exporter did not start") from None
                time.sleep(0.1)
        time.sleep(2)  # a few samples, so the baseline holds rendered bodies
        yield Exporter(proc, port)
    finally:
        proc.terminate()
        proc.wait(10)


def request(auth: str | None = None) -> bytes:
    header = f"Authorization: {auth}\r\n" if auth else ""
    return f"GET /metrics HTTP/1.1\r\nHost: t\r\n{header}\r\n".encode()


def read_one(sock: socket.socket) -> int:
    """Reads one response on a keep-alive connection; returns its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head[9:12])


def held(sockets: list[socket.socket]) -> int:
    """How many of `sockets` the server still holds open."""
    count = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            count += sock.recv(1) != b""
        except (BlockingIOError, ssl.SSLWantReadError):
            count += 1
        except OSError:
            pass
    return count


def idle_connections(port: int, tls: ssl.SSLContext | None, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(request())
        read_one(sock)
        sockets.append(sock)
    return sockets


def never_reading(port: int, tls: ssl.SSLContext | None, count: int) -> list[socket.socket]:
    """Connections that ask for /metrics and never read the answer."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(request())
        sockets.append(sock)
    return sockets


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def settle() -> None:
    time.sleep(1.5)


def pki(directory: Path) -> tuple[str, ssl.SSLContext]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(directory / "server.crt"))
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return "tls_server_config: {cert_file: server.crt, key_file: server.key}\n", client


def memory_rows(directory: Path) -> list[str]:
    rows = []
    tls_config, client = pki(directory)
    for kind, web_config, context in (("plain HTTP", None, None), ("TLS", tls_config, client)):
        with exporter(directory, web_config) as target:
            base = target.rss_mib()
            sockets = idle_connections(target.port, context, MAX_CONNECTIONS)
            settle()
            rss = target.rss_mib()
            rows.append(
                f"| {MAX_CONNECTIONS} idle keep-alive connections, {kind} | {held(sockets)} "
                f"| {base:.1f} | {rss:.1f} | {(rss - base) * 1024 / MAX_CONNECTIONS:.0f} |"
            )
            close_all(sockets)
        with exporter(directory, web_config) as target:
            base = target.rss_mib()
            sockets = never_reading(target.port, context, MAX_CONNECTIONS)
            settle()
            rss = target.rss_mib()
            ok = idle_connections(target.port, context, 1)
            rows.append(
                f"| {MAX_CONNECTIONS} connections that ask for /metrics and never read, {kind}; "
                f"then one real client | {held(sockets)} held; the client served: {len(ok) == 1} "
                f"| {base:.1f} | {rss:.1f} | {(rss - base) * 1024 / MAX_CONNECTIONS:.0f} |"
            )
            close_all(sockets + ok)
    with exporter(directory, tls_config) as tls:
        base = tls.rss_mib()
        stalled = [socket.create_connection(("127.0.0.1", tls.port)) for _ in range(900)]
        settle()
        rss = tls.rss_mib()
        count = held(stalled)
        ok = idle_connections(tls.port, client, 1)
        rows.append(
            f"| 900 stalled TLS handshakes (TCP open, no ClientHello), then one real client "
            f"| {count} held; the client served: {len(ok) == 1} | {base:.1f} | {rss:.1f} "
            f"| {(rss - base) * 1024 / max(count, 1):.0f} |"
        )
        close_all(stalled + ok)
        settle()
        rows.append(f"| after all of them closed | 0 | | {tls.rss_mib():.1f} | |")
    return rows


def flood_rows(directory: Path) -> list[str]:
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=10)).decode()
    good = "Basic " + base64.b64encode(b"prometheus:right").decode()
    with exporter(directory, f"basic_auth_users: {{prometheus: '{hashed}'}}\n") as target:
        stop = threading.Event()
        flood: Counter[int] = Counter()
        lock = threading.Lock()

        def attacker(worker: int) -> None:
            attempt = 0
            while not stop.is_set():
                attempt += 1
                token = base64.b64encode(f"prometheus:guess-{worker}-{attempt}".encode()).decode()
                try:
                    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
                        sock.sendall(request(f"Basic {token}"))
                        status = read_one(sock)
                except OSError:
                    status = 0
                with lock:
                    flood[status] += 1

        with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
            sock.sendall(request(good))
            assert read_one(sock) == 200  # verified once, as a scraper is
        threads = [threading.Thread(target=attacker, args=(i,)) for i in range(FLOOD_CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(1)
        latencies, statuses = [], Counter[int]()
        deadline = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < deadline:
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
                sock.sendall(request(good))
                statuses[read_one(sock)] += 1
            latencies.append(time.perf_counter() - started)
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(10)
    p50 = statistics.median(latencies) * 1000
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000
    answered = ", ".join(f"{status or 'reset'}: {n}" for status, n in sorted(flood.items()))
    return [
        f"| {FLOOD_CLIENTS} clients sending wrong passwords for {FLOOD_SECONDS:.0f} s "
        f"| {answered} | {statuses[200]}/{sum(statuses.values())} "
        f"| {p50:.1f} / {p99:.1f} |"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        memory = memory_rows(directory)
        flood = flood_rows(directory)
    print(
        "Command: `python -m benchmarks.hostile` (8 simulated GPUs, loopback, "
        f"web.max_connections {MAX_CONNECTIONS}, {os.cpu_count()} cores).\n"
    )
    print(
        "| load | connections the exporter held | RSS before (MiB) | RSS during (MiB) "
        "| KiB per connection |"
    )
    print("|---|---:|---:|---:|---:|")
    print("\n".join(memory))
    print()
    print(
        "| flood | what the flood got | authenticated scrapes answered 200 "
        "| their latency p50 / p99 (ms) |"
    )
    print("|---|---|---:|---:|")
    print("\n".join(flood))
    return 0


if __name__ == "__main__":
    sys.exit(main())
