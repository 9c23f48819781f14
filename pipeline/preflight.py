"""Checks of a validated job before any work: model source, input shards, output location.

`preflight` is what `sdedit-batch validate` shows and what `run` refuses a job on before it
starts Ray or writes OUT/job.json (`check_model`). Every problem is one line naming the field,
what was found and what is allowed; storage errors (no credentials, no bucket, access denied)
are problems, never tracebacks. With `offline`, every remote check (object storage, the
Hugging Face hub) is skipped and said so in `notes`; local paths are still checked.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError, PreflightError
from pipeline.shards import expand_shards, plan_pending
from pipeline.spec import JobSpec
from pipeline.storage import describe_error, join, url_fs, with_retries
from sdedit.conditioning import TextSpec
from sdedit.models import ModelLayout, ModelSourceError, inspect_model_dir
from sdedit.sources import cached_snapshot, local_path, source_kind

logger = logging.getLogger(__name__)

__all__ = ["Preflight", "check_model", "model_problems", "preflight"]


@dataclass
class Preflight:
    """What the checks found.

    Attributes:
        problems: one line per problem; the job is refused when there is any.
        notes: checks skipped (offline) and facts worth showing.
        shards: the expanded input shards, or None when they could not be listed.
        done: shards with a commit marker (None when not known).
    """

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: list[str] | None = None
    done: int | None = None


def _is_remote(url: str) -> bool:
    head, sep, _ = url.partition("://")
    return bool(sep) and head.split("::")[-1] not in ("file", "local")


def model_problems(source: str, storage_options: Mapping[str, Any] | None, *,
                   offline: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes) about a model source, without loading any weights.

    A local directory: its config files parse and name a supported network and scheduler,
    and its weights files are present (`sdedit.models.inspect_model_dir`). A URL: the config
    object exists and parses. A hub id: a complete snapshot is in the hub cache, or (unless
    `offline`) the hub lists the repository with a config file.
    """
    kind = source_kind(source)
    if kind == "missing":
        return [f"model.source: {source!r} not found (no directory "
                f"{os.path.abspath(local_path(source))}); allowed: a local diffusers model "
                "directory, a hub id such as google/ddpm-ema-bedroom-256, or an fsspec URL "
                "(s3://, gs://, ...)"], []
    if kind == "local":
        if not local_path(source).is_dir():
            return [f"model.source: {source!r} is a file; allowed: a model directory (convert "
                    "an original DDPM/SDEdit checkpoint first: sdedit.convert)"], []
        try:
            inspect_model_dir(local_path(source), source)
        except ModelSourceError as exc:
            return [f"model.source: {exc}"], []
        return [], []
    if kind == "url":
        if offline:
            return [], [f"model.source {source}: not checked (--offline)"]
        return _url_model_problems(source, storage_options), []
    return _hub_model_problems(source, offline)


def _url_model_problems(source: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """The config object of a model at a URL exists and is a JSON object."""
    name = "config.json"
    try:
        for name in ("config.json", "unet/config.json"):
            found = _read_if_exists(join(source, name), storage_options)
            if found is not None:
                if not isinstance(json.loads(found), dict):
                    return [f"model.source: {source}/{name} is not a JSON object"]
                return []
    except json.JSONDecodeError as exc:
        return [f"model.source: {source}/{name} is not valid JSON: {exc}"]
    except Exception as exc:
        return [f"model.source: cannot read {source}: {describe_error(exc)}"]
    return [f"model.source: no config.json or unet/config.json at {source}; expected a "
            "diffusers model directory (config.json, diffusion_pytorch_model.safetensors, "
            "scheduler_config.json) or a pipeline (model_index.json, unet/, scheduler/)"]


def _read_if_exists(url: str, storage_options: Mapping[str, Any] | None) -> bytes | None:
    """The bytes of the object at `url`, or None when it does not exist."""
    fs, path = url_fs(url, storage_options)
    if not with_retries(lambda: fs.exists(path), what="check", url=url):
        return None
    return with_retries(lambda: fs.cat_file(path), what="read", url=url)


def _hub_model_problems(repo_id: str, offline: bool) -> tuple[list[str], list[str]]:
    """A hub id: checked in the hub cache first, then (unless offline) on the hub."""
    snapshot = cached_snapshot(repo_id)
    cache_problem = None
    if snapshot is not None:
        try:
            inspect_model_dir(snapshot, repo_id)
            return [], [f"model.source {repo_id}: in the hub cache (revision {snapshot.name})"]
        except ModelSourceError as exc:
            cache_problem = str(exc)
    if offline:
        state = f"incomplete in the hub cache ({cache_problem})" if cache_problem else \
            "not in the hub cache"
        return [], [f"model.source {repo_id}: {state}; the hub was not checked (--offline)"]
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(repo_id)
    except Exception as exc:
        return [f"model.source: {repo_id!r} is no local directory "
                f"({os.path.abspath(local_path(repo_id))} does not exist), and as a hub id it is "
                f"not in the hub cache (HF_HOME) and the hub cannot tell about it "
                f"({type(exc).__name__}: {str(exc)[:160]}); allowed: an existing model "
                f"directory, or a hub repository that is reachable or cached (`huggingface-cli "
                f"download {repo_id}`)"], []
    if not {"config.json", "model_index.json"} & set(files):
        return [f"model.source: hub repository {repo_id} has no config.json or "
                "model_index.json; expected a diffusers model"], []
    return [], [f"model.source {repo_id}: on the hub; downloaded into the hub cache on first use"]


def _layout(spec: JobSpec) -> ModelLayout | None:
    """The model's layout read from its configs (a local directory or a cached hub snapshot),
    or None when it cannot be known without fetching or is unreadable (model_problems says
    why)."""
    kind = source_kind(spec.model.source)
    directory = local_path(spec.model.source) if kind == "local" else \
        cached_snapshot(spec.model.source) if kind == "hub" else None
    if directory is None or not directory.is_dir():
        return None
    try:
        return inspect_model_dir(directory, spec.model.source)
    except ModelSourceError:
        return None


def text_problems(spec: JobSpec) -> list[str]:
    """What the job asks of the model that it cannot do, known without loading it for a local
    directory or a cached hub snapshot (otherwise the actor refuses it on load): job-level
    prompts or guidance for a model that takes no text, a sampler its noise process does not
    run, a negative prompt or guidance scale for a family that takes none (Flux)."""
    layout = _layout(spec)
    if layout is None:
        return []
    return fit_problems(spec, layout.text, layout.process.samplers, layout.family)


def fit_problems(spec: JobSpec, text: TextSpec | None, samplers: tuple[str, ...],
                 family: str) -> list[str]:
    """The job's sampler, prompts and guidance against a model's text side and samplers."""
    sd = spec.sdedit
    problems = []
    if sd.sampler not in samplers:
        problems.append(f"sdedit.sampler: {sd.sampler!r} cannot run on {spec.model.source}, a "
                        f"{family} model; allowed: {', '.join(samplers)}")
    given = [name for name in ("prompt", "negative_prompt", "guidance_scale")
             if getattr(sd, name) is not None]
    if text is None:
        return problems + [
            f"sdedit.{name}: {getattr(sd, name)!r} is for text-conditioned models, and "
            f"{spec.model.source} is an unconditional pixel model; allowed: null (per-row "
            "json and txt members are carried over unchanged)" for name in given]
    if sd.negative_prompt and not text.negative_prompts:
        problems.append(f"sdedit.negative_prompt: {sd.negative_prompt!r} is not used by "
                        f"{spec.model.source}, a {family} model without classifier-free "
                        f"guidance (guidance: {text.guidance}); allowed: null or \"\"")
    if sd.guidance_scale is not None and text.guidance == "none":
        problems.append(f"sdedit.guidance_scale: {sd.guidance_scale!r} is not used by "
                        f"{spec.model.source}, a {family} model that takes no guidance; "
                        "allowed: null")
    return problems


def model_note(spec: JobSpec) -> list[str]:
    """What the model is, read from its configs: family, noise process, guidance."""
    layout = _layout(spec)
    if layout is None:
        return []
    guidance = "none" if layout.text is None else layout.text.guidance
    return [f"model.source: a {layout.family} model ({layout.process.name} noise process, "
            f"samplers {', '.join(layout.process.samplers)}; guidance {guidance}; sides "
            f"multiples of {layout.downsample_factor})"]


def check_model(spec: JobSpec, *, offline: bool = False) -> list[str]:
    """Refuse a job whose model source is missing or not loadable, or that gives prompts to
    a model that takes none, before any work.

    Returns the notes; raises `PreflightError` listing the problems.
    """
    problems, notes = model_problems(spec.model.source, spec.model.storage_options,
                                     offline=offline)
    problems += text_problems(spec)
    if problems:
        raise PreflightError(problems, source=spec.name)
    return notes


def _input_problems(spec: JobSpec, offline: bool, report: Preflight) -> None:
    """Expand the input patterns (globs of remote storage only when online); check that local
    shards exist and, online, that the first remote one does."""
    patterns = list(spec.input.shards)
    if offline and any(_is_remote(p) for p in patterns):
        report.notes.append("input.shards: remote shards not listed or checked (--offline)")
        local = [p for p in patterns if not _is_remote(p)]
        if not local:
            return
        patterns = local
    try:
        shards = expand_shards(patterns, spec.input.storage_options)
    except PipelineError as exc:
        report.problems.append(str(exc) if str(exc).startswith("input.shards") else
                               f"input.shards: {exc}")
        return
    report.shards = shards
    missing = [url for url in shards if not _is_remote(url) and not local_path(url).exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        report.problems.append(f"input.shards: {len(missing)} of {len(shards)} local shard(s) "
                               f"do not exist: {shown}")
    remote = [url for url in shards if _is_remote(url)]
    if remote and not offline:
        try:
            fs, path = url_fs(remote[0], spec.input.storage_options)
            if not with_retries(lambda: fs.exists(path), what="check input shard",
                                url=remote[0]):
                report.problems.append(f"input.shards: the first remote shard {remote[0]} does "
                                       "not exist")
        except Exception as exc:
            report.problems.append(f"input.shards: cannot read {remote[0]}: "
                                   f"{describe_error(exc)}")


def _output_problems(spec: JobSpec, offline: bool, report: Preflight) -> None:
    """Read (never write) the output location: its commit markers, and for object stores that
    the bucket can be reached."""
    out = spec.output.path
    if offline and _is_remote(out):
        report.notes.append(f"output.path {out}: not checked (--offline)")
        return
    try:
        if _is_remote(out):
            fs, path = url_fs(out, spec.output.storage_options)
            bucket = path.split("/", 1)[0]
            with_retries(lambda: fs.ls(bucket, detail=False), what="list output bucket",
                         url=out)
        if report.shards is not None:
            _, done = plan_pending(report.shards, out, spec.output.storage_options)
            report.done = len(done)
    except Exception as exc:
        report.problems.append(f"output.path: cannot read {out}: {describe_error(exc)}")


def preflight(spec: JobSpec, *, offline: bool = False) -> Preflight:
    """Every check of a job before any work (see the module docstring); never raises for a
    problem of the job or of storage: each one is a line of `problems`."""
    report = Preflight()
    problems, notes = model_problems(spec.model.source, spec.model.storage_options,
                                     offline=offline)
    report.problems += problems + text_problems(spec)
    report.notes += notes + model_note(spec)
    _input_problems(spec, offline, report)
    _output_problems(spec, offline, report)
    return report
