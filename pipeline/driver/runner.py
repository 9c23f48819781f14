"""The Ray driver of `run`: plan the pending shards, run them on the actor pool, report.

spec -> the output's lease -> input shards -> drop shards committed whole -> actor pool of
`ShardActor`s; a shard that fails its last attempt is recorded in `failed/{stem}.json`. A storage
failure of the driver's own writes stops the run with `RunStoppedError`, never a traceback. See
docs/architecture.md, "data flow"."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.driver.pool import ActorPool, PoolStoppedError, PoolWork, ray_session, uses_gpu
from pipeline.driver.preflight import ModelCheck, check_model
from pipeline.errors import PipelineError, RunStoppedError
from pipeline.input.shards import expand_shards, shard_stem
from pipeline.job.memory import precision_record, weights_request
from pipeline.job.spec import JobSpec
from pipeline.output.folder import OutputFolder, Plan
from pipeline.output.jobrecord import (
    prepare_output,
    record_compute,
    resolved_compute,
    resumable_record,
)
from pipeline.output.scorerecord import prepare_scores
from pipeline.output.status import MarkerTotals, bounded_repeated_keys
from pipeline.worker.actor import ShardActor
from pipeline.worker.hooks import NO_HOOKS, Hooks

logger = logging.getLogger(__name__)

__all__ = ["RunSummary", "run_job"]


@dataclass(kw_only=True)
class RunSummary(MarkerTotals):
    """The outcome of one `run_job` call (the totals are of the shards done by this run)."""

    shards_total: int = 0
    shards_already_done: int = 0
    shards_done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    """Shards whose commit was damaged or missing files: made again by this run."""
    keys_in_several_shards: int | None = None
    """Keys found in more than one input shard of the job (None: not counted or unreadable)."""
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.outputs_ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_job(spec: JobSpec, *, address: str | None = None, limit_shards: int | None = None,
            overwrite: bool = False, progress: bool = True,
            hooks: Hooks = NO_HOOKS, announce: Callable[[str], None] | None = None
            ) -> RunSummary:
    """Run (or resume) a job and return its summary; a local Ray unless `address` is given.

    The model is checked before Ray starts and before OUT/job.json is written, except with a
    `ray://` address (the actors read the model elsewhere). `announce` gets the memory plan's
    lines.

    Raises:
        PipelineError: no input shards, a bad model, unwritable output, changed spec, actors that
            keep failing to start.
        RunStoppedError: the output location failed during the run (exit code 2).
    """
    started = time.perf_counter()
    shards = expand_shards(list(spec.input.shards), spec.input.storage_options)
    check, record = ModelCheck(), resumable_record(spec, overwrite)
    if not (address or "").startswith("ray://"):
        notes, check = check_model(spec, record=record, shards=shards)
        for note in notes:
            (announce if announce is not None and check.plan is not None and
             note in check.plan.lines(spec) else logger.info)(note)
    precision = precision_record(spec, weights_request(spec, record), check.precision,
                                 check.layout, check.plan)
    folder = OutputFolder.of(spec)
    folder.check_writable()
    with folder.lease(spec.name) as lease:  # released at the end, on errors and Ctrl-C too
        folder.remove_stale_temps()
        previous = prepare_output(spec, overwrite, precision)
        if spec.score.enabled:
            prepare_scores(folder, spec.score.settings(), overwrite)
        plan = _plan(folder, shards)
        summary = RunSummary(shards_total=len(shards), shards_already_done=len(plan.done),
                             damaged=dict(plan.damaged))
        pending = plan.pending[:limit_shards] if limit_shards is not None else plan.pending
        if not pending:
            logger.info("nothing to do: all %d shards are done", len(shards))
            return summary
        try:
            with ray_session(address):
                run = _Run(spec, folder, summary, hooks, lambda: lease.lost)
                pool = ActorPool(run.work(), pending, progress)
                try:
                    record_compute(spec, resolved_compute(spec, uses_gpu(spec.compute),
                                                          pool.threads,
                                                          precision.get("resolved")),
                                   previous, len(plan.done), precision)
                except PipelineError as exc:
                    raise RunStoppedError(_stopped(str(exc), summary, pending)) from exc
                try:
                    pool.run()
                except PoolStoppedError as stop:
                    raise RunStoppedError(_stopped(stop.cause, summary, stop.not_done)) from None
        finally:
            folder.remove_stale_temps()  # of this run's actors that were ended mid-shard
        summary.keys_in_several_shards = bounded_repeated_keys(folder)
    summary.seconds = time.perf_counter() - started
    return summary


def _plan(folder: OutputFolder, shards: list[str]) -> Plan:
    """The folder's plan; damaged commits are warned about and uncommitted, to be made again."""
    plan = folder.plan(shards)
    logger.info("planned: %d done, %d pending (%d commit marker(s) read where the listings "
                "could not vouch for their files)", len(plan.done), len(plan.pending),
                plan.markers_read)
    if plan.damaged:
        shown = "; ".join(f"{shard_stem(url)}: {why}" for url, why in
                          list(plan.damaged.items())[:5])
        logger.warning("%d committed shard(s) are damaged and are made again: %s%s",
                       len(plan.damaged), shown, " ..." if len(plan.damaged) > 5 else "")
        folder.uncommit([shard_stem(url) for url in plan.damaged])
    return plan


def _stopped(cause: str, summary: RunSummary, not_started: list[str]) -> str:
    """The message of a run stopped by a storage failure: the cause, then the shards done, failed
    and not done, the first of these by name."""
    shown = ", ".join(shard_stem(url) for url in not_started[:5])
    more = f" and {len(not_started) - 5} more" if len(not_started) > 5 else ""
    return (f"{cause}; the run stopped: {summary.shards_done} shard(s) done now, "
            f"{len(summary.failed)} failed, {len(not_started)} not done"
            + (f" ({shown}{more})" if not_started else "")
            + "; run the same command again to resume once the output location works")


class _Run:
    """What a run's pool does with a shard: count it, clear or record its failure."""

    def __init__(self, spec: JobSpec, folder: OutputFolder, summary: RunSummary,
                 hooks: Hooks, lease_lost: Callable[[], str | None]) -> None:
        self.spec, self.folder, self.summary, self.hooks = spec, folder, summary, hooks
        self.lease_lost = lease_lost
        self.had_failed = folder.failed_stems()
        """Stems with a failed/ record from an earlier run (removed when they commit)."""

    def work(self) -> PoolWork:
        return PoolWork(self.spec.name, self.spec.compute, ShardActor,
                        lambda threads, counter: (self.spec, threads, counter, self.hooks),
                        self.spec.model.source, self.committed, self.gave_up, self.lease_lost)

    def committed(self, url: str, stats: dict[str, Any]) -> int:
        self.summary.shards_done += 1
        self.summary.add(stats)
        stem = shard_stem(url)
        if stem in self.had_failed and self.folder.clear_failure(stem):
            self.had_failed.discard(stem)
        return int(stats["outputs_ok"] + stats["outputs_error"])

    def gave_up(self, url: str, error: str, attempts: int) -> str | None:
        self.summary.failed[url] = error
        record = {"stem": shard_stem(url), "input_shard": url, "attempts": attempts,
                  "error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.folder.record_failure(shard_stem(url), record)
        except PipelineError as exc:
            return str(exc)
        return None
