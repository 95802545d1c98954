"""Log lines: one event per line, machine-parseable, with the context as fields."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from exporter import logs


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("exporter.nvml", logging.WARNING, __file__, 1, msg, (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_logfmt_quotes_only_what_needs_quoting() -> None:
    line = logs.LogfmtFormatter().format(
        record("GPU down", gpu=3, reason="gpu_is_lost", detail='says "hi"\nthere')
    )
    assert line.startswith("ts=")
    assert ' level=warn logger=exporter.nvml msg="GPU down" gpu=3 reason=gpu_is_lost ' in line
    assert line.endswith('detail="says \\"hi\\"\\nthere"')
    assert "\n" not in line


def test_json_lines_carry_the_same_fields() -> None:
    data = json.loads(logs.JsonFormatter().format(record("GPU down", gpu=3)))
    assert data["level"] == "warn" and data["msg"] == "GPU down" and data["gpu"] == 3


def test_exceptions_stay_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed")
        rec.exc_info = sys.exc_info()
    line = logs.LogfmtFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in line


@pytest.mark.parametrize(("level", "number"), [("debug", 10), ("warn", 30), ("error", 40)])
def test_setup_sets_the_level(level: str, number: int) -> None:
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        logs.setup(level, "logfmt")
        assert root.level == number
        assert isinstance(root.handlers[0].formatter, logs.LogfmtFormatter)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
