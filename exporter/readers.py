"""The reader threads the sampler reads GPUs on, against a deadline."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Generic, TypeVar

Result = TypeVar("Result")


class Readers(Generic[Result]):
    """Daemon threads that read devices, normally one: reading GPUs one after another on one
    thread costs far less CPU than a thread per GPU, whose NVML calls would hand the GIL back
    and forth on every call. While reads are queued and no thread is idle, another is started
    when nothing has finished for `stall` seconds (an NVML call hanging) or when, at the pace
    so far, the queue would not be through by the deadline (slow GPUs); so one stuck or slow
    GPU never holds up the others. Surplus threads exit once idle.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one NVML call
    hanging forever would keep a stopping exporter from ever exiting.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Result], Callable[[], Result]] | None]
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._started = 0

    def _spawn(self) -> None:
        with self._lock:
            self._threads += 1
            self._started += 1
            name = "gpu-reader" if self._started == 1 else f"gpu-reader-{self._started}"
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._idle and self._threads > 1:
                    self._threads -= 1
                    return
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                with self._lock:
                    self._threads -= 1
                return
            future, call = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def run(
        self, calls: Mapping[int, Callable[[], Result]], deadline: float, stall: float
    ) -> dict[int, Future[Result]]:
        """Queues the reads and waits for them until `deadline` (time.monotonic)."""
        futures: dict[int, Future[Result]] = {}
        for key, call in calls.items():
            future: Future[Result] = Future()
            self._jobs.put((future, call))
            futures[key] = future
        with self._lock:
            idle = self._idle
        if not idle:
            self._spawn()
        pending = set(futures.values())
        started = time.monotonic()
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Woken when all are done, not on each: every wake-up takes the GIL from the reader.
            _, pending = wait_futures(pending, timeout=min(stall, remaining))
            queued = sum(1 for f in pending if not f.running() and not f.done())
            finished = len(futures) - len(pending)
            if queued and self._behind(finished, queued, started, deadline, stall):
                self._spawn()
        for future in pending:
            # Still queued at the deadline: dropped rather than run late, in front of the next
            # sample's reads. (A read already running cannot be stopped.)
            future.cancel()
        return futures

    def _behind(
        self, finished: int, queued: int, started: float, deadline: float, stall: float
    ) -> bool:
        """Whether the queued reads need another thread: none is idle, and either nothing has
        finished for `stall` (a read hangs) or, at the pace so far, one thread would not get
        through them before the deadline (slow reads)."""
        with self._lock:
            if self._idle:
                return False
        now = time.monotonic()
        if not finished:
            return now - started >= stall
        return (now - started) / finished * queued > deadline - now

    def shutdown(self) -> None:
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)
