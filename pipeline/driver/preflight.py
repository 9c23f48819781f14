"""Checks of a validated job before any work: model source, input shards, output location.

`preflight` is what `sdedit-batch validate` shows: every check `run` makes before it starts
Ray or writes OUT/job.json (`check_model`, then `jobrecord.prepare_output`: the output is
writable and a job.json there has the same output-affecting settings), so that validate's
exit 0 means run starts. Every problem is one line naming the field,
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

from pipeline.errors import PipelineError, PreflightError, ResumeConflictError
from pipeline.input.peek import guide_size
from pipeline.input.shards import expand_shards
from pipeline.job.memory import (
    JobPlan,
    compute_problems,
    job_plan,
    plan_problems,
    precision_of,
    weights_request,
)
from pipeline.job.modelcheck import layout_problems
from pipeline.job.spec import JobSpec
from pipeline.output.folder import OutputFolder
from pipeline.output.jobrecord import resume_conflict
from pipeline.storage import describe_error, is_local, join, url_fs, with_retries
from sdedit import (
    ModelLayout,
    ModelSourceError,
    Precision,
    cached_snapshot,
    hub_download_hint,
    hub_repo_files,
    inspect_model_dir,
    local_path,
    lora_fit,
    lora_kind,
    source_kind,
)

logger = logging.getLogger(__name__)

__all__ = ["ModelCheck", "Preflight", "check_model", "lora_problems", "model_layout",
           "model_problems", "preflight"]


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


@dataclass
class ModelCheck:
    """What the model checks resolved: layout (None: unreadable here), precision, plan."""

    layout: ModelLayout | None = None
    precision: Precision | None = None
    plan: JobPlan | None = None


def _is_remote(url: str) -> bool:
    head, sep, _ = url.partition("://")
    return bool(sep) and head.split("::")[-1] not in ("file", "local")


def model_problems(source: str, storage_options: Mapping[str, Any] | None, *,
                   offline: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes) about a model source, without loading any weights (`model_layout`)."""
    _, problems, notes = model_layout(source, storage_options, offline=offline)
    return problems, notes


def model_layout(source: str, storage_options: Mapping[str, Any] | None, *,
                 offline: bool = False) -> tuple[ModelLayout | None, list[str], list[str]]:
    """(layout or None, problems, notes) of a model source, without loading any weights.

    A local directory: its config files parse and name a supported family, network and
    scheduler, and its weights files are present (`sdedit.families.inspect_model_dir`; the
    layout is returned). A URL: the config object exists and parses. A hub id: a complete
    snapshot is in the hub cache (the layout is returned), or (unless `offline`) the hub lists
    the repository with a config file.
    """
    kind = source_kind(source)
    if kind == "missing":
        return None, [f"model.source: {source!r} not found (no directory "
                      f"{os.path.abspath(local_path(source))}); allowed: a local diffusers "
                      "model directory, a hub id such as google/ddpm-ema-bedroom-256, or an "
                      "fsspec URL (s3://, gs://, ...)"], []
    if kind == "local":
        if not local_path(source).is_dir():
            return None, [f"model.source: {source!r} is a file; allowed: a model directory "
                          "(convert an original DDPM/SDEdit checkpoint first: "
                          "pipeline.tools.convert)"], []
        try:
            layout = inspect_model_dir(local_path(source), source)
        except ModelSourceError as exc:
            return None, [f"model.source: {exc}"], []
        return layout, [], [describe_layout(source, layout)]
    if kind == "url":
        if offline:
            return None, [], [f"model.source {source}: not checked (--offline)"]
        return None, _url_model_problems(source, storage_options), []
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


def _hub_model_problems(repo_id: str, offline: bool
                        ) -> tuple[ModelLayout | None, list[str], list[str]]:
    """A hub id: checked in the hub cache first, then (unless offline) on the hub."""
    snapshot = cached_snapshot(repo_id)
    cache_problem = None
    if snapshot is not None:
        try:
            layout = inspect_model_dir(snapshot, repo_id)
            return layout, [], [f"model.source {repo_id}: in the hub cache (revision "
                                f"{snapshot.name})", describe_layout(repo_id, layout)]
        except ModelSourceError as exc:
            cache_problem = str(exc)
    if offline:
        state = f"incomplete in the hub cache ({cache_problem})" if cache_problem else \
            "not in the hub cache"
        return None, [], [f"model.source {repo_id}: {state}; the hub was not checked "
                          "(--offline)"]
    try:
        files = hub_repo_files(repo_id)  # one request: no retries, no warnings
    except Exception as exc:
        return None, [f"model.source: {repo_id!r} is no local directory "
                      f"({os.path.abspath(local_path(repo_id))} does not exist), and as a hub id "
                      f"it is not in the hub cache (HF_HOME) and the hub cannot tell about it "
                      f"({type(exc).__name__}: {str(exc)[:160]}); allowed: an existing model "
                      f"directory, or a hub repository that is reachable or cached (cache it "
                      f"with {hub_download_hint(repo_id)} where the hub is reachable)"], []
    if not {"config.json", "model_index.json"} & set(files):
        return None, [f"model.source: hub repository {repo_id} has no config.json or "
                      "model_index.json; expected a diffusers model"], []
    return None, [], [f"model.source {repo_id}: on the hub; downloaded into the hub cache on "
                      "first use"]


def describe_layout(source: str, layout: ModelLayout) -> str:
    """One line naming what a model is, read from its config files."""
    text = "no text" if layout.text is None else \
        f"prompts, guidance {layout.text.guidance}"
    h, w = layout.sample_size
    return (f"model.source {source}: {layout.family} model, {layout.process.name.upper()} "
            f"noise process (samplers {', '.join(layout.process.samplers)}), {text}, trained "
            f"at {w}x{h}, image sides multiples of {layout.downsample_factor}")


def lora_problems(spec: JobSpec, layout: ModelLayout | None, *, offline: bool = False
                  ) -> tuple[list[str], list[str]]:
    """(problems, notes) about `model.lora`: each LoRA is read and its keys checked against the
    model's layers built from its config files on the meta device (`sdedit.lora.lora_fit`; no
    base weights are read), naming the keys that do not fit. Needs the layout read here (a
    local directory or a cached hub snapshot); otherwise each actor checks it on load."""
    loras = spec.model.lora
    if not loras:
        return [], []
    if layout is None:
        return [], ["model.lora: checked against the model when it loads (its config files "
                    "could not be read here)"]
    problems, notes = [], []
    for i, lora in enumerate(loras):
        if offline and lora_kind(lora.source) in ("url", "hub"):
            notes.append(f"model.lora[{i}] {lora.source}: not checked (--offline)")
            continue
        problems += [f"model.lora[{i}]: {problem}" for problem in
                     lora_fit(layout, lora, storage_options=spec.model.storage_options)]
    return problems, notes


def check_model(spec: JobSpec, *, offline: bool = False,
                record: dict[str, Any] | None = None,
                shards: list[str] | None = None) -> tuple[list[str], ModelCheck]:
    """Refuse a job whose model source is missing or not loadable, whose settings the model
    cannot run (a sampler, t0 / steps, prompts or guidance: `pipeline.job.modelcheck`; a
    compute.dtype its weights cannot take), whose LoRAs do not fit the model
    (`lora_problems`) or whose memory plan exceeds compute.gpu_memory_gb, before any work.
    `record`: the output's job.json (what `auto` weights mean: `pipeline.job.memory`).

    Returns (the notes, the memory plan's lines first; what was resolved); raises
    `PreflightError` listing the problems.
    """
    problems, notes, check = _model_problems(spec, offline, record)
    if not problems:
        problems += _memory(spec, check, shards, notes)
    if problems:
        raise PreflightError(problems, source=spec.name)
    return notes, check


def _model_problems(spec: JobSpec, offline: bool, record: dict[str, Any] | None = None
                    ) -> tuple[list[str], list[str], ModelCheck]:
    """(problems, notes, what was resolved) of the model source, then (when it could be read)
    of the settings the model decides (`pipeline.job.modelcheck`), of the weights' precision
    and of the LoRAs; a model whose config files cannot be read here has them checked by each
    actor when it loads, and a note says so."""
    layout, problems, notes = model_layout(spec.model.source, spec.model.storage_options,
                                           offline=offline)
    check = ModelCheck(layout)
    if problems:
        return problems, notes, check
    if layout is None:
        notes.append("sdedit settings, the weights' precision and the memory plan are checked "
                     "against the model when it loads (its config files could not be read "
                     "here)")
    else:
        problems += layout_problems(spec, layout)
        check.precision = precision_of(weights_request(spec, record), layout)
        problems += compute_problems(spec, check.precision)
    lora, lora_notes = lora_problems(spec, layout, offline=offline)
    return problems + lora, notes + lora_notes, check


def _memory(spec: JobSpec, check: ModelCheck, shards: list[str] | None,
            notes: list[str]) -> list[str]:
    """The memory plan (`pipeline.job.memory`) as notes (first), and its refusal when it
    exceeds compute.gpu_memory_gb."""
    if check.layout is None or check.precision is None:
        return []
    size, source = guide_size(shards, spec.input.storage_options, spec.input.image,
                              spec.input.max_pixels, check.layout.downsample_factor)
    try:
        check.plan = job_plan(spec, check.layout, check.precision, size, source)
    except Exception as exc:  # a config the plan cannot build: say so, run anyway
        notes.insert(0, f"memory plan: not made ({type(exc).__name__}: {str(exc)[:200]})")
        return []
    notes[:0] = check.plan.lines(spec)
    gib = spec.compute.gpu_memory_gb
    return plan_problems(spec, check.plan, gib, f"compute.gpu_memory_gb {gib}")


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


def _output_problems(spec: JobSpec, offline: bool, report: Preflight, overwrite: bool) -> None:
    """The output checks `run` makes before Ray (`jobrecord.prepare_output`): the location is
    writable (a probe object written, read back and deleted; folders made for it removed
    again) and a job.json there records the same output-affecting settings; then its commit
    markers are counted. For object stores the bucket is listed first."""
    out, options = spec.output.path, spec.output.storage_options
    if offline and _is_remote(out):
        report.notes.append(f"output.path {out}: not checked (--offline)")
        return
    try:
        if _is_remote(out):
            fs, path = url_fs(out, options)
            bucket = path.split("/", 1)[0]
            with_retries(lambda: fs.ls(bucket, detail=False), what="list output bucket",
                         url=out)
    except Exception as exc:
        report.problems.append(f"output.path: cannot read {out}: {describe_error(exc)}")
        return
    folder = OutputFolder.of(spec)
    try:
        _probe_writable(folder)
    except PipelineError as exc:  # "output.path OUT: cannot write: ..."
        report.problems.append(str(exc))
    try:
        conflict = resume_conflict(spec, folder.read_record())
        if report.shards is not None:
            _, done = folder.plan(report.shards)
            report.done = len(done)
    except ResumeConflictError as exc:
        conflict = str(exc)
    except Exception as exc:
        report.problems.append(f"output.path: cannot read {out}: {describe_error(exc)}")
        return
    if conflict and overwrite:
        report.notes.append(f"output.path: {conflict} (run --overwrite discards them)")
    elif conflict:
        report.problems.append(f"output.path: {conflict}")


def _probe_writable(folder: OutputFolder) -> None:
    """`OutputFolder.check_writable` as `run` calls it, leaving no local folder it made."""
    fs, path = url_fs(folder.path, folder.options)
    made: list[str] = []
    if is_local(fs):
        place = os.path.abspath(path)
        while not os.path.exists(place) and place != os.path.dirname(place):
            made.append(place)
            place = os.path.dirname(place)
    try:
        folder.check_writable()
    finally:
        for place in made:  # the deepest first
            try:
                os.rmdir(place)
            except OSError:
                break


def preflight(spec: JobSpec, *, offline: bool = False, overwrite: bool = False) -> Preflight:
    """Every check of a job before any work (see the module docstring); never raises for a
    problem of the job or of storage: each one is a line of `problems`. The checks `run`
    makes before it starts Ray are all here, so no problem means `run` starts; `overwrite`
    checks as `run --overwrite` does (changed settings are a note, not a problem)."""
    report = Preflight()
    record = _record(spec, offline, overwrite)
    report.problems, report.notes, check = _model_problems(spec, offline, record)
    _input_problems(spec, offline, report)
    if not report.problems:
        report.problems += _memory(spec, check, report.shards, report.notes)
    _output_problems(spec, offline, report, overwrite)
    return report


def _record(spec: JobSpec, offline: bool, overwrite: bool) -> dict[str, Any] | None:
    """The output's job.json `run` would resume (else None), for what `auto` weights mean."""
    if offline and _is_remote(spec.output.path):
        return None
    try:
        record = OutputFolder.of(spec).read_record()
        if resume_conflict(spec, record) is not None:
            return None
    except Exception:
        return None
    return record
