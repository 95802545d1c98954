"""A real Prometheus server on loopback, for end-to-end tests.

    with prometheus_server([exporter.address], tmp_path) as prom:
        up = prom.wait_for_query('up{job="nvml"}', lambda r: len(r) == 1)

The server scrapes every second, keeps its TSDB under `tmp_path`, listens on a free
127.0.0.1 port, logs to a file, and is stopped (SIGTERM, then SIGKILL) on exit. If the
`with` block raises, the server's log is printed so that pytest shows it with the failure.

`extra_scrape_config` is merged (recursively; lists are replaced) into the scrape job, e.g.
`{"scheme": "https", "tls_config": {"ca_file": ...}, "basic_auth": {...}}`. `extra_args` are
more Prometheus flags; one that names a default flag (`--log.level=debug`) replaces it.

Expect ~5 s before the first scrape whatever the interval: Prometheus 2.x passes discovered
targets to its scrape manager on a fixed 5 s tick. Share one server between tests where the
tests only query, and wrap each test body in `prom.log_on_failure()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 3

Sample = dict[str, Any]
"""One element of a vector result: {"metric": {label: value}, "value": [ts, "value"]}."""


class PrometheusAPIError(RuntimeError):
    """The HTTP API answered with status "error" (bad query, timeout, ...)."""


def find_prometheus() -> str | None:
    """The Prometheus binary: $PROMETHEUS_BIN, else `prometheus` on PATH."""
    return os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")


def prometheus_version(binary: str | None = None) -> tuple[int, int, int]:
    """(major, minor, patch) of the installed Prometheus, e.g. (2, 42, 0)."""
    binary = binary or find_prometheus()
    if binary is None:
        raise FileNotFoundError("prometheus binary not found")
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True, timeout=10
    )
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if match is None:
        raise RuntimeError(f"cannot parse `prometheus --version`: {out.stdout + out.stderr!r}")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def value(sample: Sample) -> float:
    """The float value of one vector element."""
    return float(sample["value"][1])


def labels(sample: Sample) -> dict[str, str]:
    metric: dict[str, str] = sample["metric"]
    return metric


def _abridged(log: str, head: int = 10, tail: int = 40) -> str:
    """A start-up log without the 200 lines of usage text a bad flag prints."""
    lines = log.splitlines()
    if len(lines) <= head + tail:
        return log
    return "\n".join([*lines[:head], f"[... {len(lines) - head - tail} lines ...]", *lines[-tail:]])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, val in extra.items():
        if isinstance(val, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], val)
        else:
            out[key] = val
    return out


def scrape_config(
    targets: Sequence[str],
    job_name: str = "nvml",
    scrape_interval: str = "1s",
    extra_scrape_config: Mapping[str, Any] | None = None,
    jobs: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The whole prometheus.yml as a dict: one job scraping `targets` (host:port), or, when
    `jobs` are given, those scrape jobs as they are."""
    job: dict[str, Any] = {
        "job_name": job_name,
        "static_configs": [{"targets": list(targets)}],
    }
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [dict(j) for j in jobs] or [_merge(job, extra_scrape_config or {})],
    }


@dataclass
class PromServer:
    proc: subprocess.Popen[bytes]
    address: str
    config_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @contextlib.contextmanager
    def log_on_failure(self) -> Iterator[None]:
        """Prints the server's log if the block raises (for servers shared between tests)."""
        try:
            yield
        except BaseException:
            print(f"--- prometheus log ({self.log_path}) ---\n{self.log()}")
            raise

    # --- HTTP API ----------------------------------------------------------------------------

    def api(self, path: str, params: Mapping[str, str] | None = None, timeout: float = 5) -> Any:
        """GET /api/v1/<path>; returns `data`, raises PrometheusAPIError on an error status."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            # Errors (400 bad_data, 422 execution, 503 timeout) still carry a JSON body.
            try:
                body = json.load(err)
            except ValueError:
                raise PrometheusAPIError(f"GET {url}: HTTP {err.code}") from err
        if body.get("status") != "success":
            raise PrometheusAPIError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """Instant query. A vector comes back as is; a scalar as one sample with no labels."""
        params = {"query": expr}
        if at is not None:
            params["time"] = repr(at)
        data = self.api("query", params)
        if data["resultType"] == "vector":
            result: list[Sample] = data["result"]
            return result
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PrometheusAPIError(f"{expr!r}: unexpected result type {data['resultType']}")

    def values(self, expr: str, at: float | None = None) -> dict[frozenset[tuple[str, str]], float]:
        """Instant query as {labels: value}."""
        return {frozenset(labels(s).items()): value(s) for s in self.query(expr, at)}

    def wait_for_query(
        self,
        expr: str,
        predicate: Callable[[list[Sample]], bool] = bool,
        timeout: float = 15.0,
        interval: float = 0.2,
    ) -> list[Sample]:
        """Polls `expr` until `predicate(result)` holds; returns that result.

        Query errors while waiting count as "not yet" (e.g. a scrape not done), but the last
        one is reported if the deadline passes.
        """
        deadline = time.monotonic() + timeout
        last: list[Sample] | Exception | None = None
        while True:
            self._check_running()
            try:
                last = self.query(expr)
                if predicate(last):
                    return last
            except (PrometheusAPIError, OSError) as err:
                last = err
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{expr!r}: condition not met within {timeout}s; last result: {last!r}\n"
                    f"targets: {self._targets_summary()}\nprometheus log:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def targets(self, state: str = "active") -> list[dict[str, Any]]:
        """Targets from /api/v1/targets (`active` or `dropped`)."""
        data = self.api("targets", {"state": state})
        key = "activeTargets" if state == "active" else "droppedTargets"
        result: list[dict[str, Any]] = data[key]
        return result

    def wait_for_targets(
        self, health: str = "up", count: int = 1, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """Waits until `count` active targets have been scraped with the given health."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            found = [t for t in self.targets() if t["health"] == health]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"fewer than {count} targets {health} within {timeout}s: "
                    f"{self._targets_summary()}\nprometheus log:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def metadata(self, metric: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """/api/v1/metadata: {family name: [{"type", "help", "unit"}, ...]}."""
        result: dict[str, list[dict[str, Any]]] = self.api(
            "metadata", {"metric": metric} if metric else None
        )
        return result

    def _targets_summary(self) -> str:
        try:
            return repr(
                [
                    {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                    for t in self.targets()
                ]
            )
        except (PrometheusAPIError, OSError) as err:
            return f"<unavailable: {err}>"

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {self.proc.returncode}; log:\n{self.log_tail()}"
            )

    # --- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _start(
    binary: str, config_path: Path, storage: Path, log_path: Path, extra_args: Sequence[str]
) -> PromServer | None:
    """One attempt on a fresh port; None if the port was taken meanwhile."""
    address = f"127.0.0.1:{_free_port()}"
    flags = {
        "--config.file": str(config_path),
        "--web.listen-address": address,
        "--storage.tsdb.path": str(storage),
        "--storage.tsdb.retention.time": "1h",
        "--query.max-concurrency": "4",
        "--web.max-connections": "64",
        "--log.level": "info",
    }
    # Prometheus refuses a repeated flag, so an extra `--name=value` replaces the default.
    overridden = {arg.partition("=")[0] for arg in extra_args}
    cmd = [binary]
    cmd += [f"{name}={val}" for name, val in flags.items() if name not in overridden]
    cmd += extra_args
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GOMAXPROCS": os.environ.get("GOMAXPROCS", "2")},
        )
    server = PromServer(proc, address, config_path, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if "address already in use" in server.log():
                return None
            log = _abridged(server.log())
            raise RuntimeError(f"prometheus exited with {proc.returncode} at start; log:\n{log}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as response,
        ):
            if response.status == 200:
                return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"prometheus not ready within {START_TIMEOUT}s; log:\n{server.log()}")


@contextlib.contextmanager
def prometheus_server(
    targets: Sequence[str],
    tmp_path: Path,
    extra_scrape_config: Mapping[str, Any] | None = None,
    *,
    job_name: str = "nvml",
    scrape_interval: str = "1s",
    extra_args: Sequence[str] = (),
    jobs: Sequence[Mapping[str, Any]] = (),
) -> Iterator[PromServer]:
    """Starts Prometheus scraping `targets` (host:port) as job `job_name`, or with the scrape
    `jobs` given whole; stops it on exit."""
    binary = find_prometheus()
    if binary is None:
        raise FileNotFoundError("prometheus binary not found (set PROMETHEUS_BIN)")
    root = tmp_path / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "prometheus.yml"
    config = scrape_config(targets, job_name, scrape_interval, extra_scrape_config, jobs)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = root / "prometheus.log"

    server = None
    for _ in range(_PORT_ATTEMPTS):
        server = _start(binary, config_path, root / "data", log_path, extra_args)
        if server is not None:
            break
    if server is None:
        log = log_path.read_text(errors="replace")
        raise RuntimeError(f"no free port after {_PORT_ATTEMPTS} attempts; log:\n{log}")
    try:
        with server.log_on_failure():
            yield server
    finally:
        server.stop()
