"""Runs a Python module as `python -m MODULE ARGS...` would, with two additions for the benchmark.

    python benchmarks/_launch.py MODULE [ARGS...]

- Each Python thread's name becomes its OS thread name (prctl PR_SET_NAME, first 15 bytes), so
  the benchmark can read per-thread CPU time from /proc/PID/task/TID/{comm,schedstat}. Python
  before 3.14 leaves every thread named after the executable. The cost is one prctl per thread
  start; nothing else in the program changes.
- With NVML_BENCH_PROBE=PATH, every pynvml entry point and symbol lookup is wrapped to record
  which NVML functions the program calls that the loaded library lacks (FunctionNotFound) or
  that fail, with the error, as JSON in PATH. Only for a separate probe run: the wrappers cost
  CPU, so measured runs never set it.
- With NVML_BENCH_COUNT=PATH, every C function pynvml hands out is wrapped to count its calls,
  and the counts per symbol are written as JSON to PATH four times a second. For a real GPU,
  where there is no stand-in to count them; about half a microsecond per call.

Standalone on purpose (no imports from this repository): it also runs under the interpreter of
the separate environment nvitop-exporter is installed in.
"""

from __future__ import annotations

import ctypes
import json
import os
import runpy
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PR_SET_NAME = 15


def _set_os_thread_name(name: str) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _name_threads() -> None:
    original: Callable[[threading.Thread], None] = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap_inner(self: threading.Thread) -> None:
        _set_os_thread_name(self.name)
        original(self)

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]
    _set_os_thread_name("MainThread")


def _probe(path: str) -> None:
    import pynvml  # type: ignore[import-not-found,unused-ignore]

    seen: dict[str, dict[str, int]] = {}
    lock = threading.Lock()

    def note(function: str, error: BaseException) -> None:
        kind = type(error).__name__
        with lock:
            errors = seen.setdefault(function, {})
            errors[kind] = errors.get(kind, 0) + 1
            if errors[kind] == 1:
                tmp = Path(path + ".tmp")
                tmp.write_text(json.dumps(seen, indent=1, sort_keys=True))
                tmp.replace(path)

    def wrap(name: str, function: Callable[..., Any], label: Callable[..., str]) -> None:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except pynvml.NVMLError as error:
                note(label(*args), error)
                raise

        wrapper.__name__ = function.__name__
        setattr(pynvml, name, wrapper)

    for name in dir(pynvml):
        value = getattr(pynvml, name)
        if name.startswith("nvml") and callable(value) and not isinstance(value, type):
            wrap(name, value, lambda *args, _name=name: _name)
    lookup = pynvml._nvmlGetFunctionPointer
    wrap("_nvmlGetFunctionPointer", lookup, lambda *args: f"symbol {args[0] if args else '?'}")
    Path(path).write_text("{}")


class _Counted:
    """A C function that counts its calls; attributes (restype) pass through to it."""

    def __init__(self, name: str, function: Any, counts: dict[str, int]) -> None:
        object.__setattr__(self, "_function", function)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_counts", counts)

    def __call__(self, *args: Any) -> Any:
        self._counts[self._name] += 1
        return self._function(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._function, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._function, name, value)


def _count(path: str) -> None:
    import pynvml  # type: ignore[import-not-found,unused-ignore]

    counts: dict[str, int] = {}
    counted: dict[str, _Counted] = {}
    lookup = pynvml._nvmlGetFunctionPointer

    def counting_lookup(name: str) -> Any:
        wrapper = counted.get(name)
        if wrapper is None:
            counts.setdefault(name, 0)
            wrapper = counted[name] = _Counted(name, lookup(name), counts)
        return wrapper

    pynvml._nvmlGetFunctionPointer = counting_lookup

    def write_counts() -> None:
        tmp = Path(path + ".tmp")
        while True:
            tmp.write_text(json.dumps(dict(counts)))
            tmp.replace(path)
            threading.Event().wait(0.25)

    threading.Thread(target=write_counts, name="nvml-counts", daemon=True).start()


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    _name_threads()
    probe = os.environ.get("NVML_BENCH_PROBE")
    if probe:
        _probe(probe)
    count = os.environ.get("NVML_BENCH_COUNT")
    if count:
        _count(count)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
