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
import functools
import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.errors import SpecError
from pipeline.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, IMAGE_EXTS, OUTPUT_FORMATS
from pipeline.job.validation import (
    BAD,
    FREE,
    REQUIRED,
    Check,
    Reader,
    YamlLoader,
    choice,
    collect_overrides,
    fmt,
    number,
    optional,
    string,
    typed,
    yaml_error,
)
from pipeline.redaction import redact
from sdedit import DTYPES as DEVICE_DTYPES
from sdedit import SAMPLERS as ENGINE_SAMPLERS
from sdedit import Lora

logger = logging.getLogger(__name__)

SAMPLERS = tuple(ENGINE_SAMPLERS)
IMAGE_FORMATS = tuple(OUTPUT_FORMATS)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", *DEVICE_DTYPES)

FINGERPRINT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_EXT_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True)
class ModelSpec:
    """The pretrained denoiser: a local dir, a hub id (org/name) or an fsspec URL."""

    source: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    lora: tuple[Lora, ...] = ()
    """LoRAs fused into the model (`sdedit.lora`); URL sources read with storage_options."""


@dataclass(frozen=True)
class InputSpec:
    """Input WebDataset shards (patterns, expanded by `pipeline.input.shards`) and member names."""

    shards: tuple[str, ...]
    image: str | None = None
    """Member extension of the guide image; None = first of png, jpg, jpeg, webp present."""
    mask: str | None = None
    """Member extension of the optional mask (white = regenerate), e.g. "mask.png"."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest width x height of a guide or mask, read from the header before decoding; a
    larger image is an error row (kind "size")."""


@dataclass(frozen=True)
class OutputSpec:
    """Where output shards, manifests and commit markers go."""

    path: str
    image_format: str = "png"
    include_guide: bool = True
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    png_compress_level: int = 1
    """zlib level of PNG outputs, 0-9: file size only, never pixels (README: 1 is 4.7x faster
    to encode than Pillow's default 6, for 8% larger files)."""
    jpeg_quality: int = DEFAULT_QUALITY
    """Quality 0-100 of jpg outputs (Pillow's scale): changes their pixels, so in the
    fingerprint when not the default (README: size and time per quality)."""
    webp_quality: int = DEFAULT_QUALITY
    """Quality 0-100 of (lossy) webp outputs, as jpeg_quality."""

    def quality(self) -> int | None:
        """The quality the output format uses: jpeg_quality, webp_quality, or None (png)."""
        return {"jpg": self.jpeg_quality, "webp": self.webp_quality}.get(self.image_format)


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
    prompt: str | None = None
    """Text-conditioned models: the prompt of rows that set none (None = "")."""
    negative_prompt: str | None = None
    """Text-conditioned models: the negative prompt of rows that set none (None = "")."""
    guidance_scale: float | None = None
    """Text-conditioned models: classifier-free guidance g >= 1 (1 = conditional pass only), or
    the guidance input g >= 0 of a guidance-distilled model (Flux-dev); None = the family's
    default. The model's range is checked by `pipeline.job.modelcheck`."""


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
    host_threads: int | None = None
    """Threads decoding inputs and encoding outputs beside the device; None = the actor's
    CPUs, at least 2."""
    shard_timeout_s: float | None = None
    """Seconds an attempt at a shard may take before it fails (and is retried); None = 10x
    the slowest attempt the run has committed, at least an hour (`pipeline.driver.schedule`)."""


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
        data["model"]["lora"] = _plain(self.model.lora)
        return data

    def output_affecting(self) -> dict[str, Any]:
        """The fields that change the outputs; resuming requires them to be unchanged.

        A setting added later (`_LATER_SETTINGS`) is included only when it differs from its
        default, whose outputs are those of before it existed: the fingerprint of a job that
        keeps the default is the one it had then, so such a job resumes unchanged.
        """
        data: dict[str, Any] = {
            "fingerprint_version": FINGERPRINT_VERSION,
            "model": {"source": self.model.source},
            "input": {"image": self.input.image, "mask": self.input.mask},
            "output": {"image_format": self.output.image_format,
                       "include_guide": self.output.include_guide},
            "sdedit": {name: value for name, value in dataclasses.asdict(self.sdedit).items()
                       if ("sdedit", name) not in _LATER_SETTINGS},
        }
        for section, name in _LATER_SETTINGS:
            value = getattr(getattr(self, section), name)
            if value != _field_default(_SECTIONS[section], name):
                data.setdefault(section, {})[name] = _plain(value)
        return data

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON of `output_affecting()`."""
        canonical = json.dumps(self.output_affecting(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
        data = yaml.load(text, Loader=YamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise SpecError([yaml_error(error)], source=path) from error
    return parse_spec({} if data is None else data, source=path, overrides=overrides)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of `data` with each `key.path=value` override set (value parsed as
    YAML). Raises `SpecError(source="--set")` naming every bad override."""
    errors: list[str] = []
    result = collect_overrides(data, overrides, _SCHEMA, errors)
    if errors:
        raise SpecError(errors, source="--set")
    return result


def _shard_list(value: Any) -> bool:
    items = [value] if isinstance(value, str) else value
    return isinstance(items, list) and bool(items) and all(
        isinstance(item, str) and item.strip() for item in items)


_OPTIONS = typed("a mapping of fsspec storage options", "is not a mapping with string keys",
                  lambda v: v is None or (isinstance(v, Mapping) and all(
                      isinstance(k, str) for k in v)),
                  lambda v: copy.deepcopy(dict(v or {})))
_EXT = optional(string("a member extension such as png or mask.png", _EXT_RE, strip="."))
_INT = functools.partial(number, integer=True)
_NAME = string("letters, digits, '_', '.' and '-'", _NAME_RE)
_TEXT = typed("a string or null", "is not a string", lambda v: v is None or isinstance(v, str))
_SECTIONS: dict[str, type] = {"model": ModelSpec, "input": InputSpec, "output": OutputSpec,
                              "sdedit": SdeditSpec, "compute": ComputeSpec}
_LATER_SETTINGS = (("input", "max_pixels"), ("sdedit", "prompt"), ("sdedit", "negative_prompt"),
                   ("sdedit", "guidance_scale"), ("output", "jpeg_quality"),
                   ("output", "webp_quality"), ("model", "lora"))
"""Output-affecting settings added after fingerprint version 1 (see output_affecting)."""


def _plain(value: Any) -> Any:
    """A setting as JSON / YAML values (a tuple of dataclasses -> a list of mappings)."""
    if isinstance(value, tuple):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


def _field_default(cls: type, name: str) -> Any:
    """The declared default of dataclass field `name` of `cls`."""
    found = next(f for f in dataclasses.fields(cls) if f.name == name)
    return found.default_factory() if found.default is dataclasses.MISSING else found.default
_CHECKS: dict[str, dict[str, Check]] = {
    "model": {"source": string("a local directory, a hub id such as "
                                "google/ddpm-ema-bedroom-256 or an fsspec URL"),
              "storage_options": _OPTIONS,
              "lora": Check("a list of {source, scale} mappings", lambda v: v)},  # _JobReader.lora
    "input": {"shards": typed("a URL, brace range ({000000..000127}) or glob, or a list of "
                               "them", "is not a non-empty string or a non-empty list of them",
                               _shard_list, lambda v: (v,) if isinstance(v, str) else tuple(v)),
              "image": _EXT, "mask": _EXT, "storage_options": _OPTIONS,
              "max_pixels": _INT(1, 2**40)},
    "output": {"path": string("a local path or fsspec URL"),
               "image_format": choice(IMAGE_FORMATS),
               "include_guide": typed("true or false", "is not a boolean",
                                       lambda v: isinstance(v, bool)),
               "storage_options": _OPTIONS, "png_compress_level": _INT(0, 9),
               "jpeg_quality": _INT(0, 100), "webp_quality": _INT(0, 100)},
    "sdedit": {"t0": number(0, 1, open_low=True), "sampler": choice(SAMPLERS),
               "steps": optional(_INT(1)), "repeats": _INT(1),
               "samples_per_input": _INT(1, 100), "seed": _INT(0, 2**63 - 1),
               "eta": number(0), "prompt": _TEXT, "negative_prompt": _TEXT,
               "guidance_scale": optional(number(0, 100))},
    "compute": {"device": choice(DEVICES), "dtype": choice(DTYPES),
                "batch_size": _INT(1, 4096), "gpus_per_actor": number(0, 8),
                "cpus_per_actor": optional(number(0, open_low=True)),
                "actors": Check("an integer >= 1 or a mapping with keys max, min",
                                 _INT(1).convert),  # read by _JobReader.actors
                "shard_retries": _INT(0, 100), "host_threads": optional(_INT(1, 256)),
                "shard_timeout_s": optional(number(0, open_low=True))},
}
_LORA_CHECKS = {"source": string("a LoRA file or folder (local, hub id or fsspec URL)"),
                "scale": number(-10, 10)}
_SCHEMA: dict[str, Any] = {"name": None, **{
    section: {key: FREE if key == "storage_options" else
              dict.fromkeys(("max", "min")) if key == "actors" else None for key in checks}
    for section, checks in _CHECKS.items()}}


class _JobReader(Reader):
    """A `Reader` that knows the job's sections and the `compute.actors` shorthand."""

    def actors(self, data: Mapping[str, Any]) -> Any:
        """compute.actors: a mapping {min, max} or a bare int n meaning min = max = n."""
        raw = data.get("actors")
        if raw is not None and not isinstance(raw, Mapping):
            count = self.value(data, "compute", "actors", _CHECKS["compute"]["actors"])
            return BAD if count is BAD else ActorsSpec(count, count)
        section = self.section(raw, "compute.actors", _SCHEMA["compute"]["actors"])
        low = self.value(section, "compute.actors", "min", _INT(0), 1)
        floor = 1 if low is BAD else max(1, low)  # max defaults to max(1, min)
        check = _INT(floor)
        if floor > 1:
            check = Check(f"an integer >= compute.actors.min ({floor})", check.convert)
        high = self.value(section, "compute.actors", "max", check, floor)
        return BAD if BAD in (low, high) else ActorsSpec(low, high)

    def lora(self, data: Mapping[str, Any]) -> Any:
        """model.lora: a list of {source, scale (default 1.0)} mappings (null = none)."""
        raw = data.get("lora")
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.errors.append(f"model.lora: {fmt(raw)} is not a list; allowed: "
                               f"{_CHECKS['model']['lora'].allowed}, e.g. [{{source: "
                               "my-lora.safetensors, scale: 0.8}]")
            return BAD
        loras = []
        for i, item in enumerate(raw):
            where = f"model.lora[{i}]"
            if not isinstance(item, Mapping):
                self.errors.append(f"{where}: {fmt(item)} is not a mapping; allowed: a mapping "
                                   "with keys scale, source")
                loras.append(BAD)
                continue
            section = self.section(item, where, dict.fromkeys(_LORA_CHECKS))
            source = self.value(section, where, "source", _LORA_CHECKS["source"])
            scale = self.value(section, where, "scale", _LORA_CHECKS["scale"], 1.0)
            loras.append(BAD if BAD in (source, scale) else Lora(source, scale))
        return BAD if BAD in loras else tuple(loras)

    def spec_section(self, top: Mapping[str, Any], name: str) -> dict[str, Any]:
        """Checked field values of one section; defaults come from its dataclass."""
        fields = dataclasses.fields(_SECTIONS[name])
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else
                    f.default_factory() if f.default_factory is not dataclasses.MISSING
                    else REQUIRED for f in fields}
        data = self.section(top.get(name), name, _SCHEMA[name])
        return {key: self.actors(data) if key == "actors" else
                self.lora(data) if (name, key) == ("model", "lora") else
                self.value(data, name, key, _CHECKS[name][key], default)
                for key, default in defaults.items()}


def _cross_checks(values: Mapping[str, dict[str, Any]], errors: list[str]) -> None:
    """Checks that involve several fields; skipped where one of them is already invalid.

    Settings the model decides (which samplers it runs, how many steps t0 starts from, whether
    it takes prompts) are checked against the model itself, from its config files, by
    `pipeline.job.modelcheck` (validate, run before Ray, and each actor)."""
    sampler, eta = values["sdedit"]["sampler"], values["sdedit"]["eta"]
    if BAD not in (sampler, eta) and eta != 0 and sampler != "ddim":
        errors.append(f"sdedit.eta: {fmt(eta)} is only used by sampler ddim (sampler is "
                      f"{sampler}); allowed: 0, or sampler ddim")
    image_format = values["output"]["image_format"]
    for name, fmt_used in (("jpeg_quality", "jpg"), ("webp_quality", "webp")):
        quality = values["output"][name]
        if BAD not in (image_format, quality) and quality != DEFAULT_QUALITY and \
                image_format != fmt_used:
            errors.append(f"output.{name}: {quality} is only used with output.image_format "
                          f"{fmt_used} (image_format is {image_format}); allowed: "
                          f"{DEFAULT_QUALITY} (the default), or image_format {fmt_used}")
    image, mask = values["input"]["image"], values["input"]["mask"]
    guides = (image,) if image else IMAGE_EXTS
    if image is not BAD and mask not in (BAD, None) and mask in guides:
        errors.append(f"input.mask: {fmt(mask)} is also the guide image (input.image: "
                      f"{fmt(image)}); allowed: a different member, e.g. mask.png")
    if values["compute"]["device"] == "cuda" and values["compute"]["gpus_per_actor"] == 0:
        errors.append("compute.gpus_per_actor: 0.0 with compute.device cuda; allowed: a number "
                      "in (0, 8] when device is cuda")


def parse_spec(data: Mapping[str, Any], source: str = "job",
               overrides: Sequence[str] = ()) -> JobSpec:
    """Validate a job mapping (after applying `overrides`) into a `JobSpec`.

    Raises `SpecError(errors, source)` listing every problem, override problems included.
    """
    reader = _JobReader()
    if not isinstance(data, Mapping):
        raise SpecError([f"job: {fmt(data)} is not a mapping; allowed: a mapping with keys "
                         + ", ".join(sorted(_SCHEMA))], source=source)
    top = reader.section(collect_overrides(data, overrides, _SCHEMA, reader.errors), "",
                         _SCHEMA)
    name = reader.value(top, "", "name", _NAME)
    values = {section: reader.spec_section(top, section) for section in _SECTIONS}
    _cross_checks(values, reader.errors)
    if reader.errors:
        raise SpecError(reader.errors, source=source)
    spec = JobSpec(name=name, **{section: _SECTIONS[section](**fields)
                                 for section, fields in values.items()})
    logger.debug("job spec %s from %s: fingerprint %s", spec.name, source, spec.fingerprint())
    return spec
