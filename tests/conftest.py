"""Shared fixtures: start the real exporter as a process, scrape it over loopback."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubelet_stub import kubelet, sockdir  # noqa: F401  (fixtures for every test module)
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"msg=listening address=(\S+)")


@dataclass
class Scrape:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        raw = self.body
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        return raw.decode()

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample, keyed by (name, labels); parses the classic text format."""
        out = {}
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    def values(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples().items() if n == name}


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5) -> Scrape:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Scrape(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as err:
        return Scrape(err.code, dict(err.headers), err.read())


@dataclass
class ExporterProcess:
    proc: subprocess.Popen[str]
    address: str
    log_lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def get(self, path: str = "/metrics", headers: Mapping[str, str] | None = None) -> Scrape:
        return http_get(self.url + path, headers)

    def log(self) -> str:
        return "\n".join(self.log_lines)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s; log:\n{self.log()}")
            time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_exporter(
    args: list[str], env: Mapping[str, str] | None = None, timeout: float = 15.0
) -> ExporterProcess:
    """Starts `python -m exporter` on a free loopback port and waits until it listens."""
    cmd = [sys.executable, "-m", "exporter", "--web.listen-address", "127.0.0.1:0", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    found = threading.Event()
    holder: dict[str, str] = {}

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and not found.is_set():
                holder["address"] = match.group(1)
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(timeout):
        proc.kill()
        proc.wait()
        raise AssertionError("exporter did not start listening; log:\n" + "\n".join(lines))
    return ExporterProcess(proc, holder["address"], lines)


@pytest.fixture
def exporter() -> Iterator[Callable[..., ExporterProcess]]:
    started: list[ExporterProcess] = []

    def factory(*args: str, env: Mapping[str, str] | None = None) -> ExporterProcess:
        process = start_exporter(list(args), env)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.stop()


@pytest.fixture
def running() -> Iterator[list[ExporterProcess]]:
    """Exporters a test started itself (start_exporter), stopped when it ends."""
    processes: list[ExporterProcess] = []
    yield processes
    for process in processes:
        process.stop()


@pytest.fixture
def tmp_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "exporter.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
