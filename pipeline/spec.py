"""The job spec: one YAML file validated once into frozen, typed dataclasses.

`load_spec` reads a job file, applies `--set key.path=value` overrides and returns a `JobSpec`,
or raises one `SpecError` that lists every problem found (unknown keys with a suggestion, bad
values with what is allowed, cross-field conflicts). Below the CLI, code receives these objects
or explicit arguments taken from them, never the raw mapping.

Relative local paths (model.source, input.shards, output.path) are kept as written and are
relative to the working directory of the command, not to the job file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.errors import SpecError
from pipeline.storage import redact

logger = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddim", "ve", "dpmpp2m")
IMAGE_FORMATS = ("png", "jpg", "webp")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")
AUTO_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
"""Guide members tried in order when input.image is null."""
NUM_TRAIN_STEPS = 1000
"""VP discretisation used for the cross-field check: t0 starts at round(t0 * 1000) steps."""

FINGERPRINT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_EXT_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_FREE = "*"  # schema marker: a free-form mapping (storage options)


@dataclass(frozen=True)
class ModelSpec:
    """The pretrained denoiser: a local dir, a hub id (org/name) or an fsspec URL."""

    source: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputSpec:
    """Input WebDataset shards (patterns, expanded by `pipeline.shards`) and member names."""

    shards: tuple[str, ...]
    image: str | None = None
    """Member extension of the guide image; None = first of png, jpg, jpeg, webp present."""
    mask: str | None = None
    """Member extension of the optional mask (white = regenerate), e.g. "mask.png"."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSpec:
    """Where output shards, manifests and commit markers go."""

    path: str
    image_format: str = "png"
    include_guide: bool = True
    storage_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SdeditSpec:
    """The SDEdit parameters; all of them change the outputs."""

    t0: float = 0.5
    sampler: str = "ddpm"
    steps: int | None = None  # reverse steps; None = the sampler's default
    repeats: int = 1
    samples_per_input: int = 1
    seed: int = 0
    eta: float = 0.0  # DDIM stochasticity; only used by sampler ddim


@dataclass(frozen=True)
class ActorsSpec:
    """Autoscaling bounds of the actor pool."""

    min: int = 1
    max: int = 1


@dataclass(frozen=True)
class ComputeSpec:
    """Where and how the work runs; never changes the outputs."""

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    gpus_per_actor: float = 1.0  # used when the device resolves to cuda
    cpus_per_actor: float | None = None  # None = decided by the runner
    actors: ActorsSpec = field(default_factory=ActorsSpec)
    shard_retries: int = 2


@dataclass(frozen=True)
class JobSpec:
    """A validated job. Build it with `load_spec` or `parse_spec`."""

    name: str
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    sdedit: SdeditSpec = field(default_factory=SdeditSpec)
    compute: ComputeSpec = field(default_factory=ComputeSpec)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able resolved spec; secrets in storage options are replaced by "***"."""
        data = dataclasses.asdict(self)
        for section in ("model", "input", "output"):
            data[section]["storage_options"] = redact(data[section]["storage_options"])
        data["input"]["shards"] = list(self.input.shards)
        return data

    def output_affecting(self) -> dict[str, Any]:
        """The fields that change the outputs; resuming requires them to be unchanged."""
        return {
            "fingerprint_version": FINGERPRINT_VERSION,
            "model": {"source": self.model.source},
            "input": {"image": self.input.image, "mask": self.input.mask},
            "output": {"image_format": self.output.image_format,
                       "include_guide": self.output.include_guide},
            "sdedit": dataclasses.asdict(self.sdedit),
        }

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON of `output_affecting()`."""
        canonical = json.dumps(self.output_affecting(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- YAML reading

class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads YAML 1.2 floats such as 1e-3."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
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


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_error(error: yaml.YAMLError) -> str:
    """One line for a YAML error, with 1-based line and column when known."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_spec(path: str, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a local YAML job file, apply `key.path=value` overrides and validate it.

    Raises `SpecError(errors, source=path)` listing every problem found.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        problem = f"cannot read job file: {error.strerror or error}"
        raise SpecError([problem], source=path) from error
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise SpecError([_yaml_error(error)], source=path) from error
    return parse_spec({} if data is None else data, source=path, overrides=overrides)


# ---------------------------------------------------------------- overrides

def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown_path(parts: Sequence[str]) -> str | None:
    """Why a dotted override path is not in the schema, or None when it is."""
    node: Any = _SCHEMA
    for depth, part in enumerate(parts):
        if node == _FREE and part:
            return None
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[: depth + 1]) or "''"
            if not isinstance(node, dict):
                return f"unknown key {where}; {'.'.join(parts[:depth])} has no sub-keys"
            return (f"unknown key {where}; allowed keys: {', '.join(sorted(node))}"
                    + _suggest(part, list(node)))
        node = node[part]
    return None


def _set_path(data: dict[str, Any], parts: Sequence[str], value: Any) -> str | None:
    """Set data[p0][p1]...= value, creating mappings; returns a problem or None."""
    current = data
    for depth, part in enumerate(parts[:-1]):
        child = current.get(part)
        if child is None:
            child = {}
        elif part == "actors" and isinstance(child, int) and not isinstance(child, bool):
            child = {"min": child, "max": child}  # bare `actors: n` means min = max = n
        elif not isinstance(child, Mapping):
            where = ".".join(parts[: depth + 1])
            return f"cannot set a sub-key: {where} is {_fmt(child)}, not a mapping"
        current[part] = child = dict(child)
        current = child
    current[parts[-1]] = value
    return None


def _apply_overrides(data: Mapping[str, Any], overrides: Sequence[str],
                     errors: list[str]) -> dict[str, Any]:
    """Deep copy of `data` with the valid overrides applied; problems are appended to errors."""
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = key.strip().split(".")
        problem = _unknown_path(parts) if sep else (
            "missing '='; allowed: KEY.PATH=VALUE, e.g. sdedit.t0=0.4")
        if problem is None:
            try:
                value = yaml.load(raw, Loader=_Loader)
            except yaml.YAMLError as error:
                problem = f"value is not valid YAML ({_yaml_error(error)})"
            else:
                problem = _set_path(result, parts, value)
        if problem is not None:
            errors.append(f"--set {override}: {problem}")
    return result


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of `data` with each `key.path=value` override set (value parsed as
    YAML). Raises `SpecError(source="--set")` naming every bad override."""
    errors: list[str] = []
    result = _apply_overrides(data, overrides, errors)
    if errors:
        raise SpecError(errors, source="--set")
    return result


# ---------------------------------------------------------------- validation

class _InvalidError(Exception):
    """A value failed a check: `problem` completes "key: value ...", `hint` ends the line."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.problem, self.hint = problem, hint


@dataclass(frozen=True)
class _Check:
    """A converter (raises `_InvalidError`) and the human text of what it allows."""

    allowed: str
    convert: Callable[[Any], Any]


_BAD = object()  # the value of a field that failed its check
_REQUIRED = object()


def _fmt(value: Any) -> str:
    """A value as the user wrote it: YAML-ish, with quotes around strings."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _number(low: float, high: float = math.inf, *, integer: bool = False,
            open_low: bool = False) -> _Check:
    kind = "an integer" if integer else "a number"
    low_text, high_text = (str(x) if integer else f"{x:g}" for x in (low, high))
    if high == math.inf:
        allowed = f"{kind} {'>' if open_low else '>='} {low_text}"
    else:
        allowed = f"{kind} in {'(' if open_low else '['}{low_text}, {high_text}]"

    def convert(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _InvalidError(f"is not {kind}")
        if integer and not isinstance(value, int):
            raise _InvalidError("is not an integer")
        if not math.isfinite(value) or not low <= value <= high or (open_low and value == low):
            raise _InvalidError("is out of range")
        return value if integer else float(value)
    return _Check(allowed, convert)


def _choice(options: Sequence[str]) -> _Check:
    def convert(value: Any) -> str:
        if value not in options:
            raise _InvalidError("is not allowed",
                                _suggest(value, options) if isinstance(value, str) else "")
        return value
    return _Check("one of " + ", ".join(options), convert)


def _string(allowed: str, pattern: re.Pattern[str] | None = None, strip: str = "") -> _Check:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _InvalidError("is not a non-empty string")
        value = value.lstrip(strip) if strip else value
        if pattern is not None and not pattern.match(value):
            raise _InvalidError("is not allowed")
        return value
    return _Check(allowed, convert)


def _optional(check: _Check) -> _Check:
    return _Check(check.allowed + " or null",
                  lambda value: None if value is None else check.convert(value))


def _typed(allowed: str, problem: str, accept: Callable[[Any], bool],
           convert: Callable[[Any], Any] = lambda value: value) -> _Check:
    def check(value: Any) -> Any:
        if not accept(value):
            raise _InvalidError(problem)
        return convert(value)
    return _Check(allowed, check)


def _shard_list(value: Any) -> bool:
    items = [value] if isinstance(value, str) else value
    return isinstance(items, list) and bool(items) and all(
        isinstance(item, str) and item.strip() for item in items)


_OPTIONS = _typed("a mapping of fsspec storage options", "is not a mapping with string keys",
                  lambda v: v is None or (isinstance(v, Mapping) and all(
                      isinstance(k, str) for k in v)),
                  lambda v: copy.deepcopy(dict(v or {})))
_EXT = _optional(_string("a member extension such as png or mask.png", _EXT_RE, strip="."))
_INT = functools.partial(_number, integer=True)
_NAME = _string("letters, digits, '_', '.' and '-'", _NAME_RE)
_SECTIONS: dict[str, type] = {"model": ModelSpec, "input": InputSpec, "output": OutputSpec,
                              "sdedit": SdeditSpec, "compute": ComputeSpec}
_CHECKS: dict[str, dict[str, _Check]] = {
    "model": {"source": _string("a local directory, a hub id such as "
                                "google/ddpm-ema-bedroom-256 or an fsspec URL"),
              "storage_options": _OPTIONS},
    "input": {"shards": _typed("a URL, brace range ({000000..000127}) or glob, or a list of "
                               "them", "is not a non-empty string or a non-empty list of them",
                               _shard_list, lambda v: (v,) if isinstance(v, str) else tuple(v)),
              "image": _EXT, "mask": _EXT, "storage_options": _OPTIONS},
    "output": {"path": _string("a local path or fsspec URL"),
               "image_format": _choice(IMAGE_FORMATS),
               "include_guide": _typed("true or false", "is not a boolean",
                                       lambda v: isinstance(v, bool)),
               "storage_options": _OPTIONS},
    "sdedit": {"t0": _number(0, 1, open_low=True), "sampler": _choice(SAMPLERS),
               "steps": _optional(_INT(1)), "repeats": _INT(1),
               "samples_per_input": _INT(1, 100), "seed": _INT(0, 2**63 - 1),
               "eta": _number(0)},
    "compute": {"device": _choice(DEVICES), "dtype": _choice(DTYPES),
                "batch_size": _INT(1, 4096), "gpus_per_actor": _number(0, 8),
                "cpus_per_actor": _optional(_number(0, open_low=True)),
                "actors": _Check("an integer >= 1 or a mapping with keys max, min",
                                 _INT(1).convert),  # read by _Reader.actors
                "shard_retries": _INT(0, 100)},
}
_SCHEMA: dict[str, Any] = {"name": None, **{
    section: {key: _FREE if key == "storage_options" else
              dict.fromkeys(("max", "min")) if key == "actors" else None for key in checks}
    for section, checks in _CHECKS.items()}}


class _Reader:
    """Reads the job mapping section by section, collecting every problem in `errors`."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def section(self, data: Any, path: str, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """The mapping at `path` (empty if absent or bad); unknown keys are reported.

        A missing section is not reported itself: its required keys are.
        """
        keys = ", ".join(sorted(schema))
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            self.errors.append(f"{path or 'job'}: {_fmt(data)} is not a mapping; "
                               f"allowed: a mapping with keys {keys}")
            return {}
        for key in data:
            if key not in schema:
                self.errors.append(f"{path + '.' if path else ''}{key}: unknown key; allowed "
                                   f"keys: {keys}" + _suggest(str(key), list(schema)))
        return data

    def value(self, data: Mapping[str, Any], path: str, key: str, check: _Check,
              default: Any = _REQUIRED) -> Any:
        """The checked value of data[key], `default` when absent, `_BAD` when invalid."""
        dotted = f"{path}.{key}" if path else key
        if key not in data:
            if default is _REQUIRED:
                self.errors.append(f"{dotted}: missing; allowed: {check.allowed}")
                return _BAD
            return default
        try:
            return check.convert(data[key])
        except _InvalidError as invalid:
            self.errors.append(f"{dotted}: {_fmt(data[key])} {invalid.problem}; "
                               f"allowed: {check.allowed}{invalid.hint}")
            return _BAD

    def actors(self, data: Mapping[str, Any]) -> Any:
        """compute.actors: a mapping {min, max} or a bare int n meaning min = max = n."""
        raw = data.get("actors")
        if raw is not None and not isinstance(raw, Mapping):
            count = self.value(data, "compute", "actors", _CHECKS["compute"]["actors"])
            return _BAD if count is _BAD else ActorsSpec(count, count)
        section = self.section(raw, "compute.actors", _SCHEMA["compute"]["actors"])
        low = self.value(section, "compute.actors", "min", _INT(0), 1)
        floor = 1 if low is _BAD else max(1, low)  # max defaults to max(1, min)
        check = _INT(floor)
        if floor > 1:
            check = _Check(f"an integer >= compute.actors.min ({floor})", check.convert)
        high = self.value(section, "compute.actors", "max", check, floor)
        return _BAD if _BAD in (low, high) else ActorsSpec(low, high)

    def spec_section(self, top: Mapping[str, Any], name: str) -> dict[str, Any]:
        """Checked field values of one section; defaults come from its dataclass."""
        fields = dataclasses.fields(_SECTIONS[name])
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else
                    f.default_factory() if f.default_factory is not dataclasses.MISSING
                    else _REQUIRED for f in fields}
        data = self.section(top.get(name), name, _SCHEMA[name])
        return {key: self.actors(data) if key == "actors" else
                self.value(data, name, key, _CHECKS[name][key], default)
                for key, default in defaults.items()}


def _cross_checks(values: Mapping[str, dict[str, Any]], errors: list[str]) -> None:
    """Checks that involve several fields; skipped where one of them is already invalid."""
    t0, sampler, steps, eta = (values["sdedit"][k] for k in ("t0", "sampler", "steps", "eta"))
    if _BAD not in (t0, sampler) and sampler in ("ddpm", "ddim", "dpmpp2m"):
        start = round(t0 * NUM_TRAIN_STEPS)
        if start < 1:
            errors.append(f"sdedit.t0: {_fmt(t0)} gives no denoising step with sampler "
                          f"{sampler}; allowed: a number in (0.0005, 1]")
        elif steps not in (_BAD, None) and steps > start:
            errors.append(f"sdedit.steps: {steps} is more than the {start} steps that t0="
                          f"{t0:g} starts from (round(t0*{NUM_TRAIN_STEPS})); allowed: an "
                          f"integer in [1, {start}] with sampler {sampler}")
    if _BAD not in (sampler, eta) and eta != 0 and sampler != "ddim":
        errors.append(f"sdedit.eta: {_fmt(eta)} is only used by sampler ddim (sampler is "
                      f"{sampler}); allowed: 0, or sampler ddim")
    image, mask = values["input"]["image"], values["input"]["mask"]
    guides = (image,) if image else AUTO_IMAGE_EXTS
    if image is not _BAD and mask not in (_BAD, None) and mask in guides:
        errors.append(f"input.mask: {_fmt(mask)} is also the guide image (input.image: "
                      f"{_fmt(image)}); allowed: a different member, e.g. mask.png")
    if values["compute"]["device"] == "cuda" and values["compute"]["gpus_per_actor"] == 0:
        errors.append("compute.gpus_per_actor: 0.0 with compute.device cuda; allowed: a number "
                      "in (0, 8] when device is cuda")


def parse_spec(data: Mapping[str, Any], source: str = "job",
               overrides: Sequence[str] = ()) -> JobSpec:
    """Validate a job mapping (after applying `overrides`) into a `JobSpec`.

    Raises `SpecError(errors, source)` listing every problem, override problems included.
    """
    reader = _Reader()
    if not isinstance(data, Mapping):
        raise SpecError([f"job: {_fmt(data)} is not a mapping; allowed: a mapping with keys "
                         + ", ".join(sorted(_SCHEMA))], source=source)
    top = reader.section(_apply_overrides(data, overrides, reader.errors), "", _SCHEMA)
    name = reader.value(top, "", "name", _NAME)
    values = {section: reader.spec_section(top, section) for section in _SECTIONS}
    _cross_checks(values, reader.errors)
    if reader.errors:
        raise SpecError(reader.errors, source=source)
    spec = JobSpec(name=name, **{section: _SECTIONS[section](**fields)
                                 for section, fields in values.items()})
    logger.debug("job spec %s from %s: fingerprint %s", spec.name, source, spec.fingerprint())
    return spec
