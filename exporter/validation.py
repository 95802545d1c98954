"""What every configuration file of the exporter is read and checked with: the YAML reader,
the value parsers, and the errors they raise.

Each parser takes `(value, path)` and raises InvalidValue naming the key path; the file's
reader turns that into a ConfigError that also names the file.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import stat
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

# Configuration files are a few kilobytes; the cap keeps a hostile or mistaken file (a log, a
# device) from stalling start-up or a SIGHUP reload in the pure-Python YAML parser.
MAX_CONFIG_BYTES = 1 << 20
# Errors end up on one log line and on a terminal; neither should receive megabytes.
MAX_MESSAGE_CHARS = 1000
# Values echoed back in an error (`got ...`): enough to recognise, never the whole value.
MAX_VALUE_CHARS = 80
# No configuration nests deeper than a handful of levels; the composer and constructor recurse.
MAX_YAML_DEPTH = 32
# The pure-Python parser is slow per token: a file within MAX_CONFIG_BYTES but dense with tiny
# nodes (`[1,1,1,...]`) would still stall a reload for seconds. Real files have a few hundred.
MAX_YAML_NODES = 10_000


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = MAX_VALUE_CHARS
        self.maxother = MAX_VALUE_CHARS
        self.maxlong = MAX_VALUE_CHARS

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int past sys.get_int_max_str_digits() raises instead of answering.
        if x.bit_length() > 4 * MAX_VALUE_CHARS:
            return f"<{x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


def short_repr(value: object) -> str:
    """repr() for error messages: bounded in length and in the work done, whatever the value."""
    return _cap(_SHORT_REPR.repr(value), MAX_VALUE_CHARS)


class ConfigError(Exception):
    """A configuration problem, already phrased as `source: key.path: reason`."""

    def __init__(self, message: str) -> None:
        super().__init__(_cap(message, MAX_MESSAGE_CHARS))


# --- value parsers: each takes (value, path) and raises InvalidValue naming the path -----------

T = TypeVar("T")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class InvalidValue(Exception):
    """A value that fails validation, at the key path `path` of its file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path


def _seconds(value: object) -> float | None:
    """Seconds, possibly infinite or NaN; None when `value` is no duration at all."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.removeprefix("-")
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    return None


def parse_duration(value: object, path: str) -> float:
    """Seconds from a number or a Prometheus-style duration such as `500ms`, `1m30s`."""
    seconds = _seconds(value)
    if seconds is None:
        raise InvalidValue(path, f"must be a duration like 1s or 500ms, got {short_repr(value)}")
    # NaN slips through every range check below (all comparisons are false), and YAML spells
    # it `.nan`; infinity would overflow the sleeps and deadlines computed from it.
    if not math.isfinite(seconds):
        raise InvalidValue(path, f"must be a finite duration, got {short_repr(value)}")
    return seconds


def parse_non_negative_duration(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds < 0:
        raise InvalidValue(path, f"must be >= 0, got {short_repr(value)}")
    return seconds


def parse_positive_duration(value: object, path: str, *, minimum: float, maximum: float) -> float:
    seconds = parse_duration(value, path)
    if seconds <= 0:
        raise InvalidValue(path, f"must be > 0, got {short_repr(value)}")
    if seconds < minimum or seconds > maximum:
        raise InvalidValue(
            path, f"must be between {minimum:g}s and {maximum:g}s, got {short_repr(value)}"
        )
    return seconds


def parse_int(value: object, path: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(path, f"must be an integer, got {short_repr(value)}")
    if not minimum <= value <= maximum:
        raise InvalidValue(
            path, f"must be between {minimum} and {maximum}, got {short_repr(value)}"
        )
    return value


def parse_non_empty_string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidValue(path, f"must be a non-empty string, got {short_repr(value)}")
    return value


def parse_scalar_text(value: object, path: str) -> str:
    """Any scalar as text, as exporter-toolkit's YAML decoder reads a string field (web config
    files say `X-XSS-Protection: 1`)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidValue(path, f"must be a string, got {short_repr(value)}")
    return str(value)


def parse_choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidValue(path, f"must be one of {', '.join(choices)}, got {short_repr(value)}")
    return str(value)


def parse_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(path, f"must be true or false, got {short_repr(value)}")
    return value


def parse_mapping(value: object, path: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidValue(path, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if key not in known:
            raise InvalidValue(
                join_path(path, _key_text(key)), f"unknown key (known: {', '.join(known)})"
            )
    return value


def _key_text(key: object) -> str:
    """An unknown key as it goes into a key path: as written when plain, else a short repr."""
    if isinstance(key, str) and key.isprintable() and len(key) <= MAX_VALUE_CHARS:
        return key
    return short_repr(key)


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_section(
    cls: type[T],
    raw: object,
    path: str,
    parsers: Mapping[str, Callable[[object, str], Any]],
) -> T:
    """Builds dataclass `cls` from `raw`, parsing each present key with its parser."""
    data = parse_mapping(raw, path, tuple(parsers))
    values = {key: parsers[key](data[key], join_path(path, key)) for key in data}
    return cls(**values)


def check_not_above(
    path: str, key: str, value: float, limit_key: str, limit: float, unit: str = ""
) -> None:
    """One key of a section bounded by another of the same section."""
    if value > limit:
        raise InvalidValue(
            join_path(path, key),
            f"must not exceed {join_path(path, limit_key)} ({limit:g}{unit}), got {value:g}{unit}",
        )


def optional(parser: Callable[[object, str], T]) -> Callable[[object, str], T | None]:
    def parse(value: object, path: str) -> T | None:
        return None if value is None else parser(value, path)

    return parse


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Unsupported(ComposerError):
    """Well-formed YAML that configuration files may not use."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader for configuration files: refuses aliases, deep nesting and duplicate keys.

    Aliases are what turn a few hundred bytes into gigabytes (`billion laughs`): each one
    multiplies what every later step (validation, error messages) walks. A configuration has no
    use for them, so anchors are accepted and any `*alias`, merge keys included, is refused.
    Duplicate keys are refused because the last one silently winning hides typos.
    """

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        aliased = self.check_event(yaml.AliasEvent)
        event: Any = self.current_event  # what check_event looked at
        if aliased:
            raise _Unsupported(
                None, None, "YAML aliases (*name) are not supported", event.start_mark
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise _Unsupported(
                None,
                None,
                f"nesting deeper than {MAX_YAML_DEPTH} levels is not supported",
                event.start_mark,
            )
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _Unsupported(
                None,
                None,
                f"more than {MAX_YAML_NODES} YAML nodes are not supported",
                event.start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as err:
            # PyYAML's scalar constructors let ValueError, KeyError, IndexError... escape for
            # values such as `2024-13-45`, `!!bool maybe` or an int past Python's digit limit.
            # Only ValueError's text says something to a reader of the file.
            kind = str(node.tag).rpartition(":")[2]
            reason = f": {_cap(str(err), 200)}" if type(err) is ValueError else ""
            raise ConstructorError(
                None,
                None,
                f"cannot read {short_repr(node.value)} as {kind}{reason}",
                node.start_mark,
            ) from None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if isinstance(node, MappingNode):  # `!!set a` gets here with a scalar: refused below
            self._refuse_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicates(self, node: MappingNode) -> None:
        seen: set[Hashable] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                # `<<: {...}` written inline (an alias never gets here); its own keys count.
                merged = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for mapping in merged:
                    if isinstance(mapping, MappingNode):
                        self._refuse_duplicates(mapping)
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: SafeConstructor reports it
            if duplicate:
                raise ConstructorError(
                    None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                )


def read_yaml(path: str) -> object:
    """A YAML file's document, read with StrictLoader and only up to MAX_CONFIG_BYTES, or a
    ConfigError naming the file and, for syntax, the line."""
    try:
        with Path(path).open("rb") as file:
            info = os.fstat(file.fileno())
            size = info.st_size if stat.S_ISREG(info.st_mode) else None
            data = b"" if size and size > MAX_CONFIG_BYTES else file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    if (size or 0) > MAX_CONFIG_BYTES or len(data) > MAX_CONFIG_BYTES:
        # Pipes and devices report no size: only that there was more than the cap.
        shown = size if size else f"more than {MAX_CONFIG_BYTES}"
        raise ConfigError(f"{path}: is {shown} bytes; at most {MAX_CONFIG_BYTES} are read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    try:
        return yaml.load(text, Loader=StrictLoader)
    except _Unsupported as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}{err.problem}") from None
    except yaml.reader.ReaderError as err:
        # Its own message spans two lines and counts characters from the start of the file.
        if not isinstance(err.position, int) or not isinstance(err.character, int):
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        raise ConfigError(
            f"{path}: invalid YAML at line {line}, column {column}: unacceptable character "
            f"#x{err.character:04x}: {err.reason}"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except Exception as err:
        # PyYAML lets untyped errors escape from a few of its constructors (and `loader` may
        # add its own); whatever the file holds, the answer is a ConfigError.
        raise ConfigError(f"{path}: invalid YAML: {type(err).__name__}: {err}") from None
