"""Every check `run` makes before it starts Ray or writes OUT/job.json, so that `validate`'s exit
0 means run starts: model, settings, LoRAs, scorers, memory, inputs, output.

Each problem is one line naming the field, what was found and what is allowed, storage errors
included. See docs/jobs.md, "what validate checks"."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.driver.sources import is_remote, model_layout
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
from pipeline.output.scorerecord import scores_conflict
from pipeline.score.models import scorer_model_problems
from pipeline.storage import describe_error, is_local, url_fs, with_retries
from sdedit import (
    ModelLayout,
    Precision,
    local_path,
    lora_fit,
    lora_kind,
)

logger = logging.getLogger(__name__)

__all__ = ["ModelCheck", "Preflight", "check_model", "lora_problems", "preflight",
           "scorer_problems"]


@dataclass
class Preflight:
    """What the checks found: `problems` (any refuses the job), `notes` (checks skipped, facts
    worth showing), the expanded `shards` and those `done` (None when not known)."""

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


def lora_problems(spec: JobSpec, layout: ModelLayout | None, *, offline: bool = False
                  ) -> tuple[list[str], list[str]]:
    """(problems, notes) of `model.lora`: each LoRA's keys against the model's layers built on
    the meta device (no base weights read); without a layout read here, each actor checks them on
    load."""
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
    """Refuse a model that is missing or not loadable, settings it cannot run, LoRAs that do not
    fit or a memory plan over compute.gpu_memory_gb, before any work (`PreflightError`).
    `record`: the output's job.json. Returns (notes, the plan's first; what was resolved)."""
    problems, notes, check = _model_problems(spec, offline, record)
    if not problems:
        problems += _memory(spec, check, shards, notes)
    if problems:
        raise PreflightError(problems, source=spec.name)
    return notes, check


def _model_problems(spec: JobSpec, offline: bool, record: dict[str, Any] | None = None
                    ) -> tuple[list[str], list[str], ModelCheck]:
    """(problems, notes, what was resolved) of the model source, then (when readable here) of its
    settings, precision and LoRAs; otherwise each actor checks them on load, and a note says so."""
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
    scorers, scorer_notes = scorer_problems(spec, offline=offline)
    return problems + lora + scorers, notes + lora_notes + scorer_notes, check


def scorer_problems(spec: JobSpec, *, offline: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes) of the `score:` section's models, without loading weights."""
    score = spec.score
    problems: list[str] = []
    notes: list[str] = []
    if score.uses_clip:
        found, said = scorer_model_problems(score.clip_model, offline=offline)
        problems, notes = problems + found, notes + said
    if "aesthetic" in score.metrics and score.aesthetic_model is not None:
        found, said = scorer_model_problems(score.aesthetic_model, aesthetic=True,
                                            offline=offline)
        problems, notes = problems + found, notes + said
    return problems, notes


def _memory(spec: JobSpec, check: ModelCheck, shards: list[str] | None,
            notes: list[str]) -> list[str]:
    """The memory plan as notes (first), and its refusal when it exceeds compute.gpu_memory_gb."""
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
    """Expand the input patterns (remote globs only online); check that local shards exist and,
    online, that the first remote one does."""
    patterns = list(spec.input.shards)
    if offline and any(is_remote(p) for p in patterns):
        report.notes.append("input.shards: remote shards not listed or checked (--offline)")
        local = [p for p in patterns if not is_remote(p)]
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
    missing = [url for url in shards if not is_remote(url) and not local_path(url).exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        report.problems.append(f"input.shards: {len(missing)} of {len(shards)} local shard(s) "
                               f"do not exist: {shown}")
    remote = [url for url in shards if is_remote(url)]
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
    """The output checks `run` makes before Ray: writable (probe objects, folders made for it
    removed), no other run holding the lease (a stale one is a note), the same output-affecting
    settings as its job.json; then markers counted and damaged commits noted."""
    out, options = spec.output.path, spec.output.storage_options
    if offline and is_remote(out):
        report.notes.append(f"output.path {out}: not checked (--offline)")
        return
    try:
        if is_remote(out):
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
        lease = folder.lease_state()
        if lease is not None and lease.stale is None:  # `run` is refused the same way
            report.problems.append(f"output.path: another run is writing to {out}: "
                                   f"{lease.describe()}")
        elif lease is not None:
            report.notes.append(f"output.path: a stale lease ({lease.describe()}); run takes "
                                "it over")
        conflict = resume_conflict(spec, folder.read_record())
        if report.shards is not None:
            plan = folder.plan(report.shards)
            report.done = len(plan.done)
            if plan.damaged:
                shown = "; ".join(list(plan.damaged.values())[:3])
                report.notes.append(f"output.path: {len(plan.damaged)} committed shard(s) are "
                                    f"damaged ({shown}); run makes them again")
    except ResumeConflictError as exc:
        conflict = str(exc)
    except Exception as exc:
        report.problems.append(f"output.path: cannot read {out}: {describe_error(exc)}")
        return
    if conflict and overwrite:
        report.notes.append(f"output.path: {conflict} (run --overwrite discards them)")
    elif conflict:
        report.problems.append(f"output.path: {conflict}")
    if spec.score.enabled and not conflict:
        try:
            scored = scores_conflict(folder, spec.score.settings())
        except Exception as exc:
            report.problems.append(f"output.path: cannot read {out}: {describe_error(exc)}")
            return
        if scored and overwrite:
            report.notes.append(f"score: {scored} (run --overwrite discards the old scores)")
        elif scored:
            report.problems.append(f"score: {scored}")


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
    """Every check of a job before any work; each problem of the job or of storage is a line of
    `problems`, never raised, so none means `run` starts. `overwrite` checks as `run
    --overwrite`."""
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
    if offline and is_remote(spec.output.path):
        return None
    try:
        record = OutputFolder.of(spec).read_record()
        if resume_conflict(spec, record) is not None:
            return None
    except Exception:
        return None
    return record
