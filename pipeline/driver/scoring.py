"""`sdedit-batch score`: the score sidecars of a finished or half-finished output, after the
fact.

The job is OUT/job.json's, with the `score:` and `compute:` sections of a job file and `--set`
overrides; every committed shard without a sidecar is scored on the actor pool under the output's
lease, resumable like `run`. See docs/scores.md."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.driver.pool import ActorPool, PoolStoppedError, PoolWork, ray_session
from pipeline.driver.preflight import scorer_problems
from pipeline.errors import PipelineError, PreflightError, SpecError, StorageError
from pipeline.input.shards import shard_stem
from pipeline.job.load import parse_spec
from pipeline.job.spec import JobSpec
from pipeline.job.validation import YamlLoader, yaml_error
from pipeline.output.folder import OutputFolder
from pipeline.output.scorerecord import prepare_scores
from pipeline.redaction import redact_url
from pipeline.worker.actor import ScoreActor
from pipeline.worker.hooks import NO_HOOKS, Hooks

logger = logging.getLogger(__name__)

__all__ = ["ScoreSummary", "score_output", "score_spec"]

TAKEN = ("score", "compute")
"""The sections `score` takes from a job file; the rest is the output's recorded job."""


@dataclass
class ScoreSummary:
    """The outcome of one `score_output` call."""

    shards_committed: int = 0
    shards_scored_before: int = 0
    shards_scored: int = 0
    rows: int = 0
    scored: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def score_spec(output: str, job: str | None = None, overrides: Sequence[str] = (),
               storage_options: Mapping[str, Any] | None = None) -> JobSpec:
    """The job `score` runs: OUT/job.json's spec with the `score` and `compute` sections of `job`
    (when given) and `overrides`, its output at `output`. PipelineError when OUT holds no job,
    SpecError for a bad job file or setting."""
    folder = OutputFolder(output, storage_options)
    record = folder.read_record()
    if record is None or not isinstance(record.get("spec"), Mapping):
        raise PipelineError(f"output {redact_url(output)}: no job.json with a job spec; "
                            "allowed: an output folder written by `sdedit-batch run`")
    data = copy.deepcopy(dict(record["spec"]))
    for section in ("model", "input"):  # recorded redacted; scoring reads neither
        data.get(section, {}).pop("storage_options", None)
    data["output"] = {**data.get("output", {}), "path": output,
                      "storage_options": dict(storage_options or {})}
    if job is not None:
        given = _job_file(job)
        for section in TAKEN:
            if section in given:
                data[section] = given[section]
    return parse_spec(data, source=job or f"{output}/job.json", overrides=overrides)


def _job_file(path: str) -> Mapping[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=YamlLoader)  # a SafeLoader subclass
    except OSError as exc:
        raise SpecError([f"cannot read job file: {exc.strerror or exc}"], source=path) from exc
    except yaml.YAMLError as exc:
        raise SpecError([yaml_error(exc)], source=path) from exc
    if not isinstance(data, Mapping) or not set(TAKEN) & set(data):
        raise SpecError(["no score: section; allowed: a job file with a score: section (and "
                         "optionally compute:)"], source=path)
    return data


def score_output(spec: JobSpec, *, address: str | None = None,
                 limit_shards: int | None = None, overwrite: bool = False,
                 progress: bool = True, hooks: Hooks = NO_HOOKS) -> ScoreSummary:
    """Score every committed shard of `spec.output.path` that has no sidecar.

    Raises:
        PreflightError: no scorer, a scorer model missing, ssim without guides.
        ResumeConflictError: other score settings than the output's (without `overwrite`).
        StorageError: the output location failed during the run.
    """
    started = time.perf_counter()
    problems, notes = scorer_problems(spec)
    if not spec.score.enabled:
        problems.insert(0, "score.metrics: none given; allowed: a list of ssim, clip_score, "
                           "aesthetic, embedding (--metrics or a job file's score: section)")
    if "ssim" in spec.score.metrics and not spec.output.include_guide:
        problems.append("score.metrics: ssim compares each output to its guide, which this "
                        "output does not hold (output.include_guide: false); allowed: the "
                        "other scorers")
    if problems:
        raise PreflightError(problems, source=f"score {spec.output.path}")
    for note in notes:
        logger.info("%s", note)
    folder = OutputFolder.of(spec)
    with folder.lease(f"score {spec.name}") as lease:  # one writer per output, as `run`
        prepare_scores(folder, spec.score.settings(), overwrite)
        done, scored = folder.done_stems(), folder.scored_stems()
        summary = ScoreSummary(shards_committed=len(done),
                               shards_scored_before=len(done & scored))
        pending = [folder.shard_urls(stem).tar for stem in sorted(done - scored)]
        if limit_shards is not None:
            pending = pending[:limit_shards]
        if pending:
            with ray_session(address):
                work = PoolWork(f"score {spec.name}", spec.compute, ScoreActor,
                                lambda threads, counter: (spec, threads, counter, hooks),
                                spec.score.clip_model, _committed(summary),
                                lambda url, error, attempts: _gave_up(summary, url, error),
                                lambda: lease.lost)
                try:
                    ActorPool(work, pending, progress).run()
                except PoolStoppedError as stop:  # another run took the output's lease
                    raise StorageError(stop.cause) from None
    summary.seconds = time.perf_counter() - started
    return summary


def _committed(summary: ScoreSummary) -> Any:
    def committed(url: str, stats: dict[str, Any]) -> int:
        summary.shards_scored += 0 if stats.get("skipped") else 1
        summary.rows += int(stats.get("rows", 0))
        summary.scored += int(stats.get("scored", 0))
        return int(stats.get("scored", 0))
    return committed


def _gave_up(summary: ScoreSummary, url: str, error: str) -> None:
    summary.failed[shard_stem(url)] = error
