"""`--log.level debug` changes what is logged, never what is exported.

logging raises KeyError for an `extra=` key that names a LogRecord attribute ("args", "name",
"msg"...), and only when the record is made, so only at a level that logs it: such a key in a
debug line breaks whatever read led to it, at debug level alone. A static check finds such keys
in every module; full samples at DEBUG, on the simulated fleet and on the real pynvml path over
the C stand-in, must equal samples at INFO.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import nvml_stub
import pytest
from fakes import FakeClock

from exporter import logs
from exporter.config import Config, SimulationConfig
from exporter.sampler import Sampler
from exporter.simulate.driver import SimulatedDriver
from exporter.snapshot import Format

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"
RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


def _literal_keys(node: ast.expr) -> Iterator[tuple[str, int]]:
    """Keys of a dict display or a dict(...) call, with their line numbers."""
    if isinstance(node, ast.Dict):
        for key in node.keys:
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                yield key.value, key.lineno
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        for keyword in node.keywords:
            if keyword.arg is not None:
                yield keyword.arg, keyword.value.lineno
        for arg in node.args:
            yield from _literal_keys(arg)


def extra_keys(source: str) -> Iterator[tuple[str, int]]:
    """Every key passed as `extra=` in `source`: dict displays, dict(...) calls, and what a
    function of the same module returns when `extra=` calls it."""
    tree = ast.parse(source)
    returns: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            returns[node.name] = [
                r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value
            ]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg != "extra":
                continue
            value = keyword.value
            yield from _literal_keys(value)
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
                for returned in returns.get(value.func.id, ()):
                    yield from _literal_keys(returned)


def test_the_reserved_names_are_logging_s_own() -> None:
    assert {"args", "name", "msg", "message", "asctime", "levelname", "exc_info"} <= RESERVED


def test_the_check_finds_reserved_keys_in_every_form() -> None:
    source = textwrap.dedent(
        """
        def where():
            return {"gpu": 1, "module": "x"}
        log.debug("a", extra={"gpu": 1, "args": (1,)})
        log.info("b", extra=dict(name="x", reason="y"))
        log.warning("c", extra=where())
        """
    )
    found = {key for key, _ in extra_keys(source)}
    assert found == {"gpu", "args", "name", "reason", "module"}
    assert found & RESERVED == {"args", "name", "module"}


def test_no_extra_key_anywhere_in_the_exporter_is_a_logrecord_attribute() -> None:
    clashes = []
    seen = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for key, line in extra_keys(path.read_text()):
            seen += 1
            if key in RESERVED:
                clashes.append(f"{path.relative_to(PACKAGE.parent)}:{line}: extra key {key!r}")
    assert seen > 20, "the check found almost no extra= keys: is it still looking?"
    assert clashes == []


class _Strict(logging.Handler):
    """Formats every record both ways; unlike the stream handlers, it lets a formatting error
    out instead of printing it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.stream = io.StringIO()
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        self.stream.write(logs.LogfmtFormatter().format(record) + "\n")
        json.loads(logs.JsonFormatter().format(record))


@pytest.fixture
def exporter_logger() -> Iterator[tuple[logging.Logger, _Strict]]:
    logger = logging.getLogger("exporter")
    handler = _Strict()
    saved = logger.level
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


Summary = tuple[dict[str, float], int]


def _simulated_samples(level: int, logger: logging.Logger) -> list[Summary]:
    """Collector success and the number of series of each of a few samples of eight simulated
    GPUs: the first, which meets every unsupported value, and one a period later, when each is
    asked again."""
    logger.setLevel(level)
    config = dataclasses.replace(
        Config(backend="simulated"), simulation=SimulationConfig(devices=8)
    )
    clock = FakeClock()
    sampler = Sampler(config, SimulatedDriver(config.simulation, clock=clock), clock=clock)
    summaries = []
    try:
        for step in (0, 1, 30, 1):
            clock.advance(step)
            text = sampler.sample_once().body(Format.TEXT, compressed=False).decode()
            summaries.append(_summary(text))
    finally:
        sampler.stop(5.0)
    return summaries


def _summary(text: str) -> Summary:
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    success = {}
    for line in series:
        if line.startswith("nvml_collector_success{"):
            name = line.split('collector="', 1)[1].split('"', 1)[0]
            success[name] = float(line.rsplit(" ", 1)[1])
    return success, len(series)


def test_a_simulated_fleet_exports_the_same_at_debug_as_at_info(
    exporter_logger: tuple[logging.Logger, _Strict],
) -> None:
    logger, handler = exporter_logger
    info = _simulated_samples(logging.INFO, logger)
    debug = _simulated_samples(logging.DEBUG, logger)
    for success, _ in info:
        assert success and set(success.values()) == {1.0}
    assert debug == info
    # The debug lines were made (and formatted): unsupported values, asked again in time.
    assert "value not available" in handler.stream.getvalue()


# Samples a default configuration over the stand-in at INFO, then at DEBUG, in one process
# (pynvml loads the library once per process), every log record formatted both ways.
_STUB_RUN = """
import json, logging, sys, time
from exporter import logs
from exporter.config import Config
from exporter.nvml.pynvml_driver import PynvmlDriver
from exporter.sampler import Sampler
from exporter.snapshot import Format

class Strict(logging.Handler):
    def emit(self, record):
        logs.LogfmtFormatter().format(record)
        json.loads(logs.JsonFormatter().format(record))

logger = logging.getLogger("exporter")
logger.addHandler(Strict())
out = {}
for level in ("info", "debug"):
    logger.setLevel(logs.LEVELS[level])
    sampler = Sampler(Config(), PynvmlDriver())
    out[level] = []
    for _ in range(2):
        text = sampler.sample_once().body(Format.TEXT, compressed=False).decode()
        series = [l for l in text.splitlines() if l and not l.startswith("#")]
        success = {
            l.split('collector="', 1)[1].split('"', 1)[0]: float(l.rsplit(" ", 1)[1])
            for l in series if l.startswith("nvml_collector_success{")
        }
        out[level].append({"success": success, "series": len(series)})
        time.sleep(0.05)
    sampler.stop(5.0)
print(json.dumps(out))
"""


def test_the_pynvml_path_over_the_stand_in_exports_the_same_at_debug_as_at_info(
    tmp_path: Path,
) -> None:
    with nvml_stub.Fleet(tmp_path, num_devices=8) as fleet:
        # Something unsupported on every GPU, so that the debug line about it is made.
        fleet.fail("nvmlDeviceGetPerformanceState", nvml_stub.NVML_ERROR_NOT_SUPPORTED)
        result = subprocess.run(
            [sys.executable, "-c", _STUB_RUN],
            env=fleet.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    for sample in out["info"]:
        assert sample["success"] and set(sample["success"].values()) == {1.0}
    assert out["debug"] == out["info"]
