"""Reading a job: a YAML file and `--set key.path=value` overrides, validated once into a
`JobSpec`.

Every problem is listed in one `SpecError`. Relative local paths are relative to the working
directory, not to the job file. See docs/jobs.md."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from pipeline.errors import SpecError
from pipeline.images import DEFAULT_QUALITY, IMAGE_EXTS
from pipeline.job.spec import LORA_CHECKS, NAME, SECTIONS, ActorsSpec, JobSpec, default_of
from pipeline.job.validation import (
    BAD,
    FREE,
    Check,
    Reader,
    YamlLoader,
    collect_overrides,
    fmt,
    number,
    yaml_error,
)
from sdedit import Lora

logger = logging.getLogger(__name__)

__all__ = ["apply_overrides", "load_spec", "parse_spec"]

SCHEMA: dict[str, Any] = {"name": None, **{
    section: {f.name: FREE if f.name == "storage_options" else
              dict.fromkeys(("max", "min")) if f.name == "actors" else None
              for f in dataclasses.fields(cls)}
    for section, cls in SECTIONS.items()}}
"""The job's keys (nested dicts; FREE = any sub-key; None = a leaf), for `--set` paths."""


def load_spec(path: str, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a local YAML job file, apply `key.path=value` overrides and validate it."""
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
    """A deep copy of `data` with each `key.path=value` override set (the value read as YAML);
    `SpecError(source="--set")` names every bad override."""
    errors: list[str] = []
    result = collect_overrides(data, overrides, SCHEMA, errors)
    if errors:
        raise SpecError(errors, source="--set")
    return result


def parse_spec(data: Mapping[str, Any], source: str = "job",
               overrides: Sequence[str] = ()) -> JobSpec:
    """Validate a job mapping (after `overrides`) into a `JobSpec`."""
    reader = _JobReader()
    if not isinstance(data, Mapping):
        raise SpecError([f"job: {fmt(data)} is not a mapping; allowed: a mapping with keys "
                         + ", ".join(sorted(SCHEMA))], source=source)
    top = reader.section(collect_overrides(data, overrides, SCHEMA, reader.errors), "", SCHEMA)
    name = reader.value(top, "", "name", NAME)
    values = {section: reader.spec_section(top, section) for section in SECTIONS}
    _cross_checks(values, reader.errors)
    if reader.errors:
        raise SpecError(reader.errors, source=source)
    spec = JobSpec(name=name, **{section: SECTIONS[section](**fields)
                                 for section, fields in values.items()})
    logger.debug("job spec %s from %s: fingerprint %s", spec.name, source, spec.fingerprint())
    return spec


class _JobReader(Reader):
    """A `Reader` that knows the job's sections, `compute.actors` and `model.lora`."""

    def actors(self, data: Mapping[str, Any], check: Check) -> Any:
        """compute.actors: a mapping {min, max} or a bare int n meaning min = max = n."""
        raw = data.get("actors")
        if raw is not None and not isinstance(raw, Mapping):
            count = self.value(data, "compute", "actors", check)
            return BAD if count is BAD else ActorsSpec(count, count)
        section = self.section(raw, "compute.actors", SCHEMA["compute"]["actors"])
        low = self.value(section, "compute.actors", "min", number(0, integer=True), 1)
        floor = 1 if low is BAD else max(1, low)  # max defaults to max(1, min)
        high_check = number(floor, integer=True)
        if floor > 1:
            high_check = Check(f"an integer >= compute.actors.min ({floor})",
                               high_check.convert)
        high = self.value(section, "compute.actors", "max", high_check, floor)
        return BAD if BAD in (low, high) else ActorsSpec(low, high)

    def lora(self, data: Mapping[str, Any], check: Check) -> Any:
        """model.lora: a list of {source, scale (default 1.0)} mappings (null = none)."""
        raw = data.get("lora")
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.errors.append(f"model.lora: {fmt(raw)} is not a list; allowed: "
                               f"{check.allowed}, e.g. [{{source: my-lora.safetensors, "
                               "scale: 0.8}]")
            return BAD
        loras = []
        for i, item in enumerate(raw):
            where = f"model.lora[{i}]"
            if not isinstance(item, Mapping):
                self.errors.append(f"{where}: {fmt(item)} is not a mapping; allowed: a mapping "
                                   "with keys scale, source")
                loras.append(BAD)
                continue
            section = self.section(item, where, dict.fromkeys(LORA_CHECKS))
            source = self.value(section, where, "source", LORA_CHECKS["source"])
            scale = self.value(section, where, "scale", LORA_CHECKS["scale"], 1.0)
            loras.append(BAD if BAD in (source, scale) else Lora(source, scale))
        return BAD if BAD in loras else tuple(loras)

    def spec_section(self, top: Mapping[str, Any], name: str) -> dict[str, Any]:
        """Checked field values of one section; defaults come from its dataclass."""
        data = self.section(top.get(name), name, SCHEMA[name])
        values = {}
        for f in dataclasses.fields(SECTIONS[name]):
            check = f.metadata["check"]
            if (name, f.name) == ("compute", "actors"):
                values[f.name] = self.actors(data, check)
            elif (name, f.name) == ("model", "lora"):
                values[f.name] = self.lora(data, check)
            else:
                values[f.name] = self.value(data, name, f.name, check, default_of(f))
        return values


def _cross_checks(values: Mapping[str, dict[str, Any]], errors: list[str]) -> None:
    """Checks that involve several fields, skipped where one of them is already invalid; what the
    model decides is `pipeline.job.modelcheck`'s."""
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
    score = values["score"]
    if BAD not in (score["metrics"], score["aesthetic_model"]) and \
            "aesthetic" in score["metrics"] and score["aesthetic_model"] is None:
        errors.append("score.aesthetic_model: missing; the aesthetic scorer needs it; allowed: "
                      "the LAION improved aesthetic predictor's state dict (a local file or an "
                      "fsspec URL), or drop aesthetic from score.metrics")
    if values["compute"]["device"] == "cuda" and values["compute"]["gpus_per_actor"] == 0:
        errors.append("compute.gpus_per_actor: 0.0 with compute.device cuda; allowed: a number "
                      "in (0, 8] when device is cuda")
