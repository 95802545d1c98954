"""Starting, probing and stopping the exporters under test, and reading their CPU and memory.

Both run as subprocesses against a stand-in fleet (its `env()` makes pynvml load the stand-in)
through `_launch.py`, which only names OS threads after Python threads so that per-thread CPU
time can be read from /proc. CPU time comes from /proc/PID/task/TID/schedstat (nanoseconds on
CPU, not the 10 ms ticks of /proc/PID/stat).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
import venv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCH = Path(__file__).resolve().parent / "_launch.py"
NVITOP_VERSION = "1.7.2"
_LISTENING = re.compile(r"msg=listening address=(\S+)")
_LAST_SAMPLE = re.compile(rb"^nvml_last_sample_timestamp_seconds (\S+)$", re.MULTILINE)
START_TIMEOUT_S = 60.0


class TargetError(RuntimeError):
    """An exporter under test did not start or answer."""


@dataclass
class Target:
    name: str
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn(
    command: list[str], env: Mapping[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def start_ours(
    env: Mapping[str, str],
    workdir: Path,
    interval: str = "1s",
    processes: bool = False,
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
    name: str = "nvml-exporter",
) -> Target:
    """`python -m exporter --web.listen-address 127.0.0.1:0 --sampling.interval 1s`, with a
    config file switching the opt-in `processes` collector on when `processes`."""
    command = [
        python,
        str(LAUNCH),
        "exporter",
        "--web.listen-address",
        "127.0.0.1:0",
        "--sampling.interval",
        interval,
        *extra_args,
    ]
    if processes:
        config = workdir / "exporter.yaml"
        config.write_text("collectors: {processes: true}\n")
        command += ["--config.file", str(config)]
    # Ahead of, not instead of, a PYTHONPATH the caller set (wheels carried to a GPU machine).
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))}
    log_path = workdir / "nvml-exporter.log"
    process = _spawn(command, env, REPO, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            host, _, port = match.group(1).rpartition(":")
            target = Target(name, process, host, int(port), log_path)
            _wait_for_metrics(target, b"nvml_up 1", deadline)
            return target
        time.sleep(0.02)
    target = Target(name, process, "", 0, log_path)
    stop(target)
    raise TargetError(f"nvml-exporter did not start:\n{target.log_tail()}")


def start_nvitop(
    python: str, env: Mapping[str, str], workdir: Path, probe: Path | None = None
) -> Target:
    """`nvitop-exporter --bind-address 127.0.0.1 --port PORT` (its interval: the default 1 s)."""
    port = _free_port()
    command = [
        python,
        str(LAUNCH),
        "nvitop_exporter",
        "--bind-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--hostname",
        "benchmark",
    ]
    env = dict(env)
    if probe is not None:
        env["NVML_BENCH_PROBE"] = str(probe)
    # Its own working directory: nvitop may write nvitop.log there.
    log_path = workdir / "nvitop-exporter.log"
    process = _spawn(command, env, workdir, log_path)
    target = Target("nvitop-exporter", process, "127.0.0.1", port, log_path)
    try:
        _wait_for_metrics(target, b"gpu_utilization", time.monotonic() + START_TIMEOUT_S)
    except TargetError:
        stop(target)
        raise
    return target


def _wait_for_metrics(target: Target, marker: bytes, deadline: float) -> None:
    while time.monotonic() < deadline:
        if target.process.poll() is not None:
            break
        try:
            if marker in scrape(target):
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    raise TargetError(f"{target.name} did not serve metrics:\n{target.log_tail()}")


def stop(target: Target) -> None:
    if target.process.poll() is None:
        target.process.send_signal(signal.SIGTERM)
        try:
            target.process.wait(10)
        except subprocess.TimeoutExpired:
            target.process.kill()
            target.process.wait()


def scrape(
    target: Target, headers: Mapping[str, str] | None = None, connection: str = "close"
) -> bytes:
    """One GET /metrics on a fresh connection; raises on a non-200 answer."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Connection": connection, **(headers or {})})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise http.client.HTTPException(f"HTTP {response.status}")
        return body
    finally:
        conn.close()


def last_sample_timestamp(target: Target) -> float | None:
    """nvml_last_sample_timestamp_seconds from a scrape (our exporter only)."""
    match = _LAST_SAMPLE.search(scrape(target))
    return float(match.group(1)) if match else None


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """Nanoseconds on CPU per OS thread name, over the threads alive now (gpu3 etc. kept)."""
    by_name: dict[str, int] = {}
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread just exited
        by_name[name] = by_name.get(name, 0) + ns
    return by_name


def process_cpu_ns(pid: int) -> int:
    return sum(thread_cpu_ns(pid).values())


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise TargetError(f"no VmRSS for {pid}")


def nvitop_python(explicit: str | None, cache: Path) -> str:
    """An interpreter with nvitop-exporter: `explicit`, or a venv under `cache` made on first
    use with `pip install nvitop-exporter==NVITOP_VERSION`."""
    if explicit:
        return explicit
    env_dir = cache / f"venv-nvitop-exporter-{NVITOP_VERSION}"
    python = env_dir / "bin" / "python"
    probe = [str(python), "-c", "import nvitop_exporter"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return str(python)
    print(f"installing nvitop-exporter {NVITOP_VERSION} into {env_dir} ...", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"nvitop-exporter=={NVITOP_VERSION}"],
        check=True,
    )
    return str(python)


def nvitop_versions(python: str) -> str:
    code = (
        "import importlib.metadata as m;"
        "print(' '.join(f'{p} {m.version(p)}' for p in "
        "('nvitop-exporter', 'nvitop', 'nvidia-ml-py', 'prometheus-client', 'psutil')))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "nvitop-exporter (version unknown)"
