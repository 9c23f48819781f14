"""The machinery of the job's checks: YAML reading, `--set` overrides, value checks.

A `Check` converts one value or raises `InvalidValueError`; a `Reader` walks a mapping and
collects every problem as one line "key.path: value ...; allowed: ...", so that a job file is
refused once with all of its problems. The job's own schema is in `spec.py`."""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from sdedit import QUOTE_CHARS, quoted

FREE = "*"
"""Schema marker: a free-form mapping (storage options) whose sub-keys are not checked."""
BAD = object()
"""The value of a field that failed its check."""
REQUIRED = object()
"""The default of a field that must be given."""


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads YAML 1.2 floats such as 1e-3."""


def _construct_mapping(loader: YamlLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: list[Any] = []
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node, deep=True)


YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_error(error: yaml.YAMLError) -> str:
    """One line for a YAML error, with 1-based line and column when known."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_path(parts: Sequence[str], schema: Mapping[str, Any]) -> str | None:
    """Why a dotted override path is not in `schema`, or None when it is."""
    node: Any = schema
    for depth, part in enumerate(parts):
        if node == FREE and part:
            return None
        if not isinstance(node, dict) or part not in node:
            where = _prefix(".".join(parts[: depth + 1]) or "''")
            if not isinstance(node, dict):
                return f"unknown key {where}; {_prefix('.'.join(parts[:depth]))} has no sub-keys"
            return (f"unknown key {where}; allowed keys: {', '.join(sorted(node))}"
                    + suggest(part[:QUOTE_CHARS], list(node)))
        node = node[part]
    return None


def set_path(data: dict[str, Any], parts: Sequence[str], value: Any) -> str | None:
    """Set data[p0][p1]... = value, creating mappings; returns a problem or None."""
    current = data
    for depth, part in enumerate(parts[:-1]):
        child = current.get(part)
        if child is None:
            child = {}
        elif part == "actors" and isinstance(child, int) and not isinstance(child, bool):
            child = {"min": child, "max": child}  # bare `actors: n` means min = max = n
        elif not isinstance(child, Mapping):
            where = ".".join(parts[: depth + 1])
            return f"cannot set a sub-key: {where} is {fmt(child)}, not a mapping"
        current[part] = child = dict(child)
        current = child
    current[parts[-1]] = value
    return None


def collect_overrides(data: Mapping[str, Any], overrides: Sequence[str],
                      schema: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    """A deep copy of `data` with the valid overrides applied; problems are appended to `errors`."""
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = key.strip().split(".")
        problem = unknown_path(parts, schema) if sep else (
            "missing '='; allowed: KEY.PATH=VALUE, e.g. sdedit.t0=0.4")
        if problem is None:
            try:
                value = yaml.load(raw, Loader=YamlLoader)  # a SafeLoader subclass
            except yaml.YAMLError as error:
                problem = f"value is not valid YAML ({yaml_error(error)})"
            else:
                problem = set_path(result, parts, value)
        if problem is not None:
            errors.append(f"--set {_prefix(override)}: {problem}")
    return result


class InvalidValueError(Exception):
    """A value failed a check: `problem` completes "key: value ...", `hint` ends the line."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.problem, self.hint = problem, hint


@dataclass(frozen=True)
class Check:
    """A converter (raises `InvalidValueError`) and the human text of what it allows."""

    allowed: str
    convert: Callable[[Any], Any]




def fmt(value: Any) -> str:
    """A value as the user wrote it, YAML-ish; of a long value only a prefix and its length."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return quoted(value)


def _prefix(text: str) -> str:
    """`text` as it is, or its first `QUOTE_CHARS` characters, "..." and its length."""
    return text if len(text) <= QUOTE_CHARS else \
        f"{text[:QUOTE_CHARS]}... ({len(text):,} characters)"


def number(low: float, high: float = math.inf, *, integer: bool = False,
            open_low: bool = False) -> Check:
    kind = "an integer" if integer else "a number"
    low_text, high_text = (str(x) if integer else f"{x:g}" for x in (low, high))
    if high == math.inf:
        allowed = f"{kind} {'>' if open_low else '>='} {low_text}"
    else:
        allowed = f"{kind} in {'(' if open_low else '['}{low_text}, {high_text}]"

    def convert(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidValueError(f"is not {kind}")
        if integer and not isinstance(value, int):
            raise InvalidValueError("is not an integer")
        if not math.isfinite(value) or not low <= value <= high or (open_low and value == low):
            raise InvalidValueError("is out of range")
        return value if integer else float(value)
    return Check(allowed, convert)


def choice(options: Sequence[str]) -> Check:
    def convert(value: Any) -> str:
        if value not in options:
            raise InvalidValueError("is not allowed",
                                suggest(value, options) if isinstance(value, str) else "")
        return value
    return Check("one of " + ", ".join(options), convert)


def text(limit: int) -> Check:
    """A string of at most `limit` characters, or null (prompts)."""
    def convert(value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise InvalidValueError("is not a string")
        if value is not None and len(value) > limit:
            raise InvalidValueError(f"is longer than {limit:,} characters")
        return value
    return Check(f"a string of at most {limit:,} characters, or null", convert)


def string(allowed: str, pattern: re.Pattern[str] | None = None, strip: str = "") -> Check:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise InvalidValueError("is not a non-empty string")
        value = value.lstrip(strip) if strip else value
        if pattern is not None and not pattern.match(value):
            raise InvalidValueError("is not allowed")
        return value
    return Check(allowed, convert)


def optional(check: Check) -> Check:
    return Check(check.allowed + " or null",
                  lambda value: None if value is None else check.convert(value))


def typed(allowed: str, problem: str, accept: Callable[[Any], bool],
           convert: Callable[[Any], Any] = lambda value: value) -> Check:
    def check(value: Any) -> Any:
        if not accept(value):
            raise InvalidValueError(problem)
        return convert(value)
    return Check(allowed, check)


class Reader:
    """Reads the job mapping section by section, collecting every problem in `errors`."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def section(self, data: Any, path: str, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """The mapping at `path` (empty if absent or bad), unknown keys reported; a missing
        section is reported through its required keys."""
        keys = ", ".join(sorted(schema))
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            self.errors.append(f"{path or 'job'}: {fmt(data)} is not a mapping; "
                               f"allowed: a mapping with keys {keys}")
            return {}
        for key in data:
            if key not in schema:
                self.errors.append(f"{path + '.' if path else ''}{_prefix(str(key))}: unknown "
                                   f"key; allowed keys: {keys}"
                                   + suggest(str(key)[:QUOTE_CHARS], list(schema)))
        return data

    def value(self, data: Mapping[str, Any], path: str, key: str, check: Check,
              default: Any = REQUIRED) -> Any:
        """The checked value of data[key], `default` when absent, `BAD` when invalid."""
        dotted = f"{path}.{key}" if path else key
        if key not in data:
            if default is REQUIRED:
                self.errors.append(f"{dotted}: missing; allowed: {check.allowed}")
                return BAD
            return default
        try:
            return check.convert(data[key])
        except InvalidValueError as invalid:
            self.errors.append(f"{dotted}: {fmt(data[key])} {invalid.problem}; "
                               f"allowed: {check.allowed}{invalid.hint}")
            return BAD
