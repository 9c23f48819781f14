"""The Ray driver: plan pending shards, run them on a pool of actors, retry, report.

driver: spec -> input shards -> drop shards with a done marker -> actor pool
(`pipeline.worker.actor`).
The pool starts up to `compute.actors.max` actors while shards are pending (pending GPU actors are
what makes a Ray autoscaler add nodes), gives an actor shards only once it has started (loaded
its model), and ends each actor as soon as the queue has no more work for it (its worker closed
first), so an autoscaler can remove idle nodes. `pipeline.driver.schedule.Schedule` decides what
runs
next: a shard whose attempt fails (unreadable tar, lost actor, past its deadline) is queued
again, up to `compute.shard_retries` times, then reported in `failed/{stem}.json`; actors that
fail while starting stop the job after a few in a row, with the cause.

Storage failures of the driver's own writes (`job.json`, `failed/` records) stop the run with a
`RunStoppedError` (exit 2) that names the location, the cause, and the shards done, failed and
not done; they never surface as a traceback. A local Ray's leftovers from an earlier driver
that was killed are ended first (`pipeline.driver.localray`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.driver import localray
from pipeline.driver.preflight import ModelCheck, check_model
from pipeline.driver.progress import RunProgress
from pipeline.driver.schedule import Schedule
from pipeline.errors import ModelSettingsError, PipelineError, RunStoppedError
from pipeline.input.shards import expand_shards, shard_stem
from pipeline.job.memory import precision_record, weights_request
from pipeline.job.spec import JobSpec
from pipeline.output.folder import OutputFolder
from pipeline.output.jobrecord import (
    prepare_output,
    record_compute,
    resolved_compute,
    resumable_record,
)
from pipeline.output.status import MarkerTotals, bounded_repeated_keys
from pipeline.worker.actor import Counter, ShardActor
from pipeline.worker.hooks import NO_HOOKS, Hooks
from pipeline.worker.shard import SLOTS
from sdedit import ModelSourceError

logger = logging.getLogger(__name__)

CLOSE_GRACE_S = 10.0
"""Seconds an ending actor gets to close its worker before it is killed."""


@dataclass(kw_only=True)
class RunSummary(MarkerTotals):
    """The outcome of one `run_job` call (the totals are of the shards done by this run)."""

    shards_total: int = 0
    shards_already_done: int = 0
    shards_done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    keys_in_several_shards: int | None = None
    """Keys that occur in more than one input shard, over every manifest of the job (None:
    not counted: too many rows to count in passing, or the manifests could not be read)."""
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.outputs_ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def uses_gpu(spec: JobSpec) -> bool:
    """Whether actors run on GPUs: compute.device cuda, or auto on a cluster with GPUs."""
    device = spec.compute.device
    return device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def actor_options(spec: JobSpec) -> tuple[dict[str, Any], int]:
    """Ray options of one actor and its torch thread count, from compute.* and the cluster."""
    compute = spec.compute
    cluster = ray.cluster_resources()
    use_gpu = uses_gpu(spec)
    # OpenMP threads that spin while they wait collapse when another process shares the cores
    # (quickstart with one core busy: 674 s with spinning, 77 s passive, 56 s on an idle
    # machine); waiting passively costs ~15% on an idle one. An explicit setting wins.
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    options: dict[str, Any] = {"max_restarts": 0, "max_concurrency": SLOTS,
                               "runtime_env": {"env_vars": env}}
    if use_gpu:
        cpus = compute.cpus_per_actor or 1
        options.update(num_gpus=compute.gpus_per_actor, num_cpus=cpus)
        return options, max(1, int(cpus))
    total = int(cluster.get("CPU", 1))
    cpus = compute.cpus_per_actor or max(1, total // max(1, compute.actors.max))
    options.update(num_gpus=0, num_cpus=cpus)
    return options, max(1, math.floor(cpus))


def run_job(spec: JobSpec, *, address: str | None = None, limit_shards: int | None = None,
            overwrite: bool = False, progress: bool = True,
            hooks: Hooks = NO_HOOKS, announce: Callable[[str], None] | None = None
            ) -> RunSummary:
    """Run (or resume) a job; returns the summary. Starts a local Ray unless `address` is set.

    The model source is checked (`pipeline.driver.preflight.check_model`) before Ray starts and
    before OUT/job.json is written, except with a Ray Client address (ray://): this driver
    then runs on another machine than the actors, which read the model. `hooks` (tests and
    benchmarks only) go to every actor. `announce` gets the memory plan's lines (the CLI
    prints them; default: the log).

    Raises:
        PipelineError: no input shards, model missing or not loadable, unwritable output,
        changed spec, actors that keep failing to start.
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
    previous = prepare_output(spec, overwrite, precision)
    folder = OutputFolder.of(spec)
    pending, done = folder.plan(shards)
    summary = RunSummary(shards_total=len(shards), shards_already_done=len(done))
    if limit_shards is not None:
        pending = pending[:limit_shards]
    if not pending:
        logger.info("nothing to do: all %d shards are done", len(shards))
        return summary
    own_ray = not ray.is_initialized()
    record = None
    if own_ray:
        _quiet_token_notice()
        if not address:
            localray.reap()
        # "local": a new Ray on this machine, never a cluster that happens to run here
        context = ray.init(address=address or "local", include_dashboard=False,
                           log_to_driver=logger.isEnabledFor(logging.INFO),
                           logging_level=logging.WARNING)
        if not address:
            record = localray.record(context.address_info["session_dir"])
    try:
        pool = _Pool(spec, folder, pending, summary, progress, hooks)
        try:
            record_compute(spec, resolved_compute(spec, uses_gpu(spec), pool.threads,
                                                  precision.get("resolved")),
                           previous, len(done), precision)
        except PipelineError as exc:
            raise RunStoppedError(_stopped(str(exc), summary, pending)) from exc
        pool.run()
    finally:
        if own_ray:
            ray.shutdown()
            localray.forget(record)
    summary.keys_in_several_shards = bounded_repeated_keys(folder)
    summary.seconds = time.perf_counter() - started
    return summary


class _TokenNotice(logging.Filter):
    """Drops Ray's notice that a new local Ray uses token authentication (Ray 2.60's default,
    nothing to act on: the token is made and used on this machine). Every other line of that
    module passes: the warning that authentication is disabled, errors of a missing token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            "Token authentication is enabled for this Ray cluster.")


def _quiet_token_notice() -> None:
    """Install `_TokenNotice` on Ray's authentication logger (once)."""
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenNotice) for f in notices.filters):
        notices.addFilter(_TokenNotice())


def _stopped(cause: str, summary: RunSummary, not_started: list[str]) -> str:
    """The message of a run stopped by a storage failure: the cause, then the shards done,
    failed and not done (never started, or interrupted), the first of these by name."""
    shown = ", ".join(shard_stem(url) for url in not_started[:5])
    more = f" and {len(not_started) - 5} more" if len(not_started) > 5 else ""
    return (f"{cause}; the run stopped: {summary.shards_done} shard(s) done now, "
            f"{len(summary.failed)} failed, {len(not_started)} not done"
            + (f" ({shown}{more})" if not_started else "")
            + "; run the same command again to resume once the output location works")


class _Pool:
    """The actor pool and its scheduling loop: up to `SLOTS` shards per ready actor."""

    def __init__(self, spec: JobSpec, folder: OutputFolder, pending: list[str],
                 summary: RunSummary, progress: bool, hooks: Hooks) -> None:
        self.spec, self.folder, self.summary, self.hooks = spec, folder, summary, hooks
        compute = spec.compute
        self.schedule = Schedule(pending, compute.shard_retries, compute.shard_timeout_s)
        self.inflight: dict[Any, tuple[Any, str, float]] = {}  # ref -> (actor, url, started)
        self.slots: dict[Any, int] = {}  # ready actor -> shards it holds
        self.starting: dict[Any, Any] = {}  # ready() ref -> actor not yet started
        self.ending: dict[Any, tuple[Any, float]] = {}  # close() ref -> (actor, kill after)
        self.counter = ray.remote(num_cpus=0)(Counter).remote()
        options, self.threads = actor_options(spec)
        self.actor_cls = ray.remote(ShardActor).options(**options)
        self.progress = RunProgress(len(pending), spec.name, progress)
        self.had_failed = folder.failed_stems()
        """Stems with a failed/ record from an earlier run (removed when they commit)."""
        self.stop: str | None = None

    def _start_actor(self) -> None:
        actor = self.actor_cls.remote(self.spec, self.threads, self.counter, self.hooks)
        self.starting[actor.ready.remote()] = actor
        self.progress.actors_started(1)

    def _end_actor(self, actor: Any) -> None:
        """Close its worker, then kill it (at once if closing takes too long)."""
        self.slots.pop(actor, None)
        self.ending[actor.close.remote()] = (actor, time.monotonic() + CLOSE_GRACE_S)

    def _dispatch(self) -> None:
        """Start the actors the work needs, fill ready actors' free slots, and end actors that
        hold nothing when nothing is left to give them (releasing their resources lets an
        autoscaler remove the node)."""
        needed = -(-(len(self.schedule) + len(self.inflight)) // SLOTS)
        while len(self.schedule) and \
                len(self.slots) + len(self.starting) < min(self.spec.compute.actors.max, needed):
            self._start_actor()
        for actor in list(self.slots):
            while self.slots[actor] < SLOTS and (url := self.schedule.next_shard()) is not None:
                self.inflight[actor.process.remote(url)] = (actor, url, time.monotonic())
                self.slots[actor] += 1
            if not len(self.schedule) and self.slots[actor] == 0:
                self._end_actor(actor)

    def run(self) -> None:
        logger.info("starting up to %d actors for %d shards", self.spec.compute.actors.max,
                    len(self.schedule))
        try:
            while (self.inflight or len(self.schedule)) and self.stop is None:
                self._dispatch()
                refs = [*self.inflight, *self.starting, *self.ending]
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.5) if refs else ([], [])
                if not refs:
                    time.sleep(0.2)
                for ref in ready:
                    self._returned(ref)
                self._enforce_deadlines()
                now = time.monotonic()
                for ref, (actor, kill_after) in list(self.ending.items()):
                    if now > kill_after:  # closing hangs: end it anyway
                        del self.ending[ref]
                        ray.kill(actor)
                self.progress.images(ray.get(self.counter.total.remote()))
        finally:
            self._shutdown()
        if self.stop is not None:
            not_started = self.schedule.not_started() + [u for _, u, _ in self.inflight.values()]
            raise RunStoppedError(_stopped(self.stop, self.summary, not_started))

    def _returned(self, ref: Any) -> None:
        if ref in self.starting:
            self._started(ref, self.starting.pop(ref))
        elif ref in self.ending:
            ray.kill(self.ending.pop(ref)[0])
        elif ref in self.inflight:
            self._finish(ref)

    def _started(self, ref: Any, actor: Any) -> None:
        """An actor's `ready` returned: it takes shards, or its start failed."""
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            ray.kill(actor)
            if isinstance(exc.cause, ModelSettingsError):
                raise ModelSettingsError(str(exc.cause)) from exc
            if isinstance(exc.cause, ModelSourceError):
                raise PipelineError(f"cannot load model {self.spec.model.source}: "
                                    f"{exc.cause}") from exc
            self._start_failed(f"{type(exc.cause).__name__}: {exc.cause}", exc)
        except ray.exceptions.RayActorError as exc:
            self._start_failed(f"the actor died while starting: {_last_line(exc)}", exc)
        else:
            self.schedule.actor_started()
            self.slots[actor] = 0
            self.progress.actor_ready(1)

    def _start_failed(self, cause: str, exc: BaseException) -> None:
        logger.warning("an actor failed to start (%d in a row): %s",
                       self.schedule.start_failures + 1, cause)
        if self.schedule.actor_start_failed():
            raise PipelineError(f"actors failed to start {self.schedule.start_failures} times "
                                f"in a row; the last: {cause}") from exc

    def _finish(self, ref: Any) -> None:
        actor, url, _ = self.inflight.pop(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.slots.pop(actor, None)  # _dispatch starts a replacement if work is left
            self._failed(url, f"actor died: {_last_line(exc)}")
            return
        except ray.exceptions.RayTaskError as exc:
            self._failed(url, _last_line(exc))
        else:
            self._succeeded(url, stats)
        if actor in self.slots:
            self.slots[actor] -= 1

    def _enforce_deadlines(self) -> None:
        """End every actor holding an attempt past its deadline: that attempt failed, the
        other one it held starts again without losing an attempt."""
        overdue = {actor for actor, _, started in self.inflight.values()
                   if self.schedule.overdue(started)}
        for actor in overdue:
            self.slots.pop(actor, None)
            ray.kill(actor)
            for ref, (owner, url, started) in list(self.inflight.items()):
                if owner is not actor:
                    continue
                del self.inflight[ref]
                if self.schedule.overdue(started):
                    self._failed(url, f"no result within {self.schedule.deadline_s():.0f} s "
                                      "(compute.shard_timeout_s): the attempt was ended")
                else:
                    self.counter.drop.remote(url)
                    self.schedule.requeue(url)

    def _succeeded(self, url: str, stats: dict[str, Any]) -> None:
        self.summary.shards_done += 1
        self.summary.add(stats)
        self.schedule.committed(url, float(stats.get("seconds", 0.0)))
        self.counter.done.remote(url)
        self.progress.shard_done(stats["outputs_ok"] + stats["outputs_error"])
        stem = shard_stem(url)
        if stem in self.had_failed and self.folder.clear_failure(stem):
            self.had_failed.discard(stem)

    def _failed(self, url: str, error: str) -> None:
        self.counter.drop.remote(url)  # its images will be made again
        delay = self.schedule.failed(url)
        attempts, retries = self.schedule.attempts[url], self.spec.compute.shard_retries
        if delay is not None:
            logger.warning("shard %s failed (attempt %d of %d), retrying in %.0f s: %s",
                           shard_stem(url), attempts, retries + 1, delay, error)
            return
        logger.error("shard %s failed after %d attempts: %s", shard_stem(url), attempts, error)
        self.summary.failed[url] = error
        self.progress.shard_failed()
        record = {"stem": shard_stem(url), "input_shard": url, "attempts": attempts,
                  "error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.folder.record_failure(shard_stem(url), record)
        except PipelineError as exc:
            self.stop = str(exc)

    def _shutdown(self) -> None:
        """Close and end every actor (killing those that do not close in time)."""
        for actor in list(self.slots):
            if actor not in {owner for owner, _, _ in self.inflight.values()}:
                self._end_actor(actor)
        for actor in [*self.slots, *self.starting.values(),
                      *(owner for owner, _, _ in self.inflight.values())]:
            ray.kill(actor)
        if self.ending:
            ray.wait(list(self.ending), num_returns=len(self.ending), timeout=CLOSE_GRACE_S)
            for actor, _ in self.ending.values():
                ray.kill(actor)
        self.progress.close()


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
