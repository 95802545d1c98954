"""How sample values are written into exposition text."""

from __future__ import annotations

import math

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.snapshot import Family, Header, format_value, render_openmetrics, render_text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (0.0, "0"),
        (-0.0, "0"),
        (-3.0, "-3"),
        (56.0, "56"),
        (6.81e10, "68100000000"),  # not 6.81e+10: as dcgm-exporter prints integer fields
        (2**60, "1152921504606846976"),
        (2**53 + 1, "9007199254740993"),  # an int exactly, past what a double holds
        (0.5, "0.5"),
        (28.999999999999996, "28.999999999999996"),  # not integral: exact
        (1234567.5, "1.2345675e+06"),  # as Go prints it
        (1e22, "1e+22"),  # beyond int64: no 23-digit expansion
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_are_written_as_integers_where_integral_and_exactly_otherwise(
    value: float, text: str
) -> None:
    assert format_value(value) == text


def test_every_written_value_reads_back_as_the_same_number() -> None:
    for value in (1.0, 56.0, 6.81e10, 2.0**62, 0.1 + 0.2, 1234567.5, 1e-9, -7.25, 1e300):
        assert float(format_value(value)) == value


def test_integer_values_parse_in_both_text_formats() -> None:
    header = Header("t_bytes_total", "counter", "Bytes.")
    family = Family(header, [f't_bytes_total{{gpu="0"}} {format_value(68100000000.0)}\n'])
    text = render_text([family]).decode()
    assert text.endswith("} 68100000000\n")
    (parsed,) = text_string_to_metric_families(text)
    assert parsed.samples[0].value == 68100000000
    (parsed,) = openmetrics_families(render_openmetrics([family]).decode())  # type: ignore[no-untyped-call]
    assert parsed.samples[0].value == 68100000000
