"""The actor pool `run` and `score` share: a Ray session, actor options, and the loop that keeps
actors busy, retries failed attempts and ends idle actors (so an autoscaler can remove nodes).

The two commands differ only in their `PoolWork`; `Schedule` decides what runs next. See
docs/cluster.md."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.driver import localray
from pipeline.driver.progress import RunProgress
from pipeline.driver.schedule import Schedule
from pipeline.errors import ModelSettingsError, PipelineError, ScorerModelError
from pipeline.input.shards import shard_stem
from pipeline.job.spec import ComputeSpec
from pipeline.worker.actor import Counter
from pipeline.worker.shard import SLOTS
from sdedit import ModelSourceError

logger = logging.getLogger(__name__)

__all__ = ["CLOSE_GRACE_S", "ActorPool", "PoolStoppedError", "PoolWork", "actor_options",
           "ray_session", "uses_gpu"]

CLOSE_GRACE_S = 10.0
"""Seconds an ending actor gets to close its worker before it is killed."""


def uses_gpu(compute: ComputeSpec) -> bool:
    """Whether actors run on GPUs: compute.device cuda, or auto on a cluster with GPUs."""
    device = compute.device
    return device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def actor_options(compute: ComputeSpec) -> tuple[dict[str, Any], int]:
    """Ray options of one actor and its torch thread count, from compute.* and the cluster."""
    cluster = ray.cluster_resources()
    use_gpu = uses_gpu(compute)
    # OpenMP threads that spin while they wait collapse when another process shares the cores
    # (docs/performance.md); an explicit setting wins.
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


class _TokenNotice(logging.Filter):
    """Drops Ray's notice that a new local Ray uses token authentication (nothing to act on: the
    token is made and used here); every other line of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            "Token authentication is enabled for this Ray cluster.")


def _quiet_token_notice() -> None:
    """Install `_TokenNotice` on Ray's authentication logger (once)."""
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenNotice) for f in notices.filters):
        notices.addFilter(_TokenNotice())


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for one command: the one already connected, a new local Ray (after `localray.reap`),
    or the cluster at `address`; a Ray started here is shut down after."""
    if ray.is_initialized():
        yield
        return
    _quiet_token_notice()
    if not address:
        localray.reap()
    # "local": a new Ray on this machine, never a cluster that happens to run here
    context = ray.init(address=address or "local", include_dashboard=False,
                       log_to_driver=logger.isEnabledFor(logging.INFO),
                       logging_level=logging.WARNING)
    record = localray.record(context.address_info["session_dir"]) if not address else None
    try:
        yield
    finally:
        ray.shutdown()
        localray.forget(record)


@dataclass
class PoolWork:
    """What a pool runs: its actors and what a finished or failed shard means.

    Attributes:
        actor: the actor class (`pipeline.worker.actor`), before `ray.remote`.
        make_args: its constructor arguments, from (torch threads, the image counter).
        source: named when an actor cannot load its model.
        committed: (url, the actor's stats) of a finished attempt -> the images it counts for.
        gave_up: (url, error, attempts) of a last failed attempt -> why the job must stop, or None.
        stop_reason: asked between steps: why the job must stop now, or None."""

    name: str
    compute: ComputeSpec
    actor: type
    make_args: Callable[[int, Any], tuple[Any, ...]]
    source: str
    committed: Callable[[str, dict[str, Any]], int]
    gave_up: Callable[[str, str, int], str | None]
    stop_reason: Callable[[], str | None] = lambda: None


class PoolStoppedError(PipelineError):
    """The pool stopped before its shards were done: `cause`, and the shards not done."""

    def __init__(self, cause: str, not_done: list[str]) -> None:
        super().__init__(cause)
        self.cause, self.not_done = cause, not_done


class ActorPool:
    """The actor pool and its scheduling loop: up to `SLOTS` shards per ready actor."""

    def __init__(self, work: PoolWork, pending: list[str], progress: bool) -> None:
        self.work = work
        compute = work.compute
        self.schedule = Schedule(pending, compute.shard_retries, compute.shard_timeout_s)
        self.inflight: dict[Any, tuple[Any, str, float]] = {}  # ref -> (actor, url, started)
        self.slots: dict[Any, int] = {}  # ready actor -> shards it holds
        self.starting: dict[Any, Any] = {}  # ready() ref -> actor not yet started
        self.ending: dict[Any, tuple[Any, float]] = {}  # close() ref -> (actor, kill after)
        self.counter = ray.remote(num_cpus=0)(Counter).remote()
        options, self.threads = actor_options(compute)
        self.actor_cls = ray.remote(work.actor).options(**options)
        self.progress = RunProgress(len(pending), work.name, progress)
        self.stop: str | None = None

    def _start_actor(self) -> None:
        actor = self.actor_cls.remote(*self.work.make_args(self.threads, self.counter))
        self.starting[actor.ready.remote()] = actor
        self.progress.actors_started(1)

    def _end_actor(self, actor: Any) -> None:
        """Close its worker, then kill it (at once if closing takes too long)."""
        self.slots.pop(actor, None)
        self.ending[actor.close.remote()] = (actor, time.monotonic() + CLOSE_GRACE_S)

    def _dispatch(self) -> None:
        """Start the actors the work needs, fill free slots, end actors with nothing left."""
        needed = -(-(len(self.schedule) + len(self.inflight)) // SLOTS)
        while len(self.schedule) and \
                len(self.slots) + len(self.starting) < min(self.work.compute.actors.max, needed):
            self._start_actor()
        for actor in list(self.slots):
            while self.slots[actor] < SLOTS and (url := self.schedule.next_shard()) is not None:
                self.inflight[actor.process.remote(url)] = (actor, url, time.monotonic())
                self.slots[actor] += 1
            if not len(self.schedule) and self.slots[actor] == 0:
                self._end_actor(actor)

    def run(self) -> None:
        """Run every shard; raises `PoolStoppedError` when `gave_up` asked to stop."""
        logger.info("starting up to %d actors for %d shards", self.work.compute.actors.max,
                    len(self.schedule))
        try:
            while (self.inflight or len(self.schedule)) and self.stop is None:
                if (reason := self.work.stop_reason()) is not None:
                    self.stop = reason
                    break
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
            not_done = self.schedule.not_started() + [u for _, u, _ in self.inflight.values()]
            raise PoolStoppedError(self.stop, not_done)

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
            if isinstance(exc.cause, (ModelSettingsError, ScorerModelError)):
                raise type(exc.cause)(str(exc.cause)) from exc
            if isinstance(exc.cause, ModelSourceError):
                raise PipelineError(f"cannot load model {self.work.source}: "
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
            self.schedule.committed(url, float(stats.get("seconds", 0.0)))
            self.counter.done.remote(url)
            self.progress.shard_done(self.work.committed(url, stats))
        if actor in self.slots:
            self.slots[actor] -= 1

    def _enforce_deadlines(self) -> None:
        """End every actor holding an attempt past its deadline: that attempt failed; its other
        attempt starts again without losing one."""
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

    def _failed(self, url: str, error: str) -> None:
        self.counter.drop.remote(url)  # its images will be made again
        delay = self.schedule.failed(url)
        attempts, retries = self.schedule.attempts[url], self.work.compute.shard_retries
        if delay is not None:
            logger.warning("shard %s failed (attempt %d of %d), retrying in %.0f s: %s",
                           shard_stem(url), attempts, retries + 1, delay, error)
            return
        logger.error("shard %s failed after %d attempts: %s", shard_stem(url), attempts, error)
        self.progress.shard_failed()
        self.stop = self.work.gave_up(url, error, attempts)

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
