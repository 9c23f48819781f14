"""The Ray driver: plan pending shards, run them on a pool of actors, retry, report.

driver: spec -> input shards -> drop shards with a done marker -> actor pool.
The pool starts up to `compute.actors.max` actors while shards are pending (pending GPU actors are
what makes a Ray autoscaler add nodes) and kills each actor as soon as the queue has no more work
for it, so an autoscaler can remove idle nodes. A shard whose attempt fails (unreadable tar, lost
actor) is queued again, up to `compute.shard_retries` times, then reported in `failed/{stem}.json`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.errors import ModelSettingsError, PipelineError
from pipeline.jobrecord import prepare_output, record_compute, resolved_compute
from pipeline.layout import failed_url
from pipeline.preflight import check_model
from pipeline.progress import RunProgress
from pipeline.redaction import SecretFilter
from pipeline.shards import expand_shards, plan_pending, shard_stem
from pipeline.spec import JobSpec
from pipeline.status import keys_in_several_shards
from pipeline.storage import describe_error, put_bytes_atomic, url_fs, with_retries
from pipeline.worker import SLOTS, ShardWorker
from sdedit.models import ModelSourceError

logger = logging.getLogger(__name__)

RETRY_BASE_DELAY = 1.0
"""Seconds before the first retry of a failed shard; doubles per attempt (a storage outage
should not use up every retry at once)."""
RETRY_MAX_DELAY = 30.0


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retrying a shard whose `attempt`-th attempt (1-based) failed."""
    return min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** max(0, attempt - 1))


@dataclass
class RunSummary:
    """The outcome of one `run_job` call."""

    shards_total: int = 0
    shards_already_done: int = 0
    shards_done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    outputs_ok: int = 0
    outputs_error: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    """Error rows of the shards done by this run, by `error_kind`."""
    keys_in_several_shards: int | None = None
    """Keys that occur in more than one input shard, over every manifest of the job (None:
    the manifests could not be read)."""
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.outputs_ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


@ray.remote(num_cpus=0)
class _Counter:
    """Images finished so far per shard, reported by the actors as they write them; a failed
    attempt's count is dropped (its images are made again)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, shard: str, n: int) -> None:
        self.counts[shard] = self.counts.get(shard, 0) + n

    def drop(self, shard: str) -> None:
        self.counts.pop(shard, None)

    def total(self) -> int:
        return sum(self.counts.values())


class _ShardActor:
    """One ShardWorker in a Ray actor: loads the model once, then processes whole shards.

    A model that cannot be loaded is not an actor crash: the error is kept and raised by every
    `process` call, so the driver sees it as the task's exception (`RayTaskError.cause`) and
    stops the job instead of retrying shards.
    """

    def __init__(self, spec: JobSpec, threads: int, counter: Any) -> None:
        logging.basicConfig(level=logging.INFO)
        for handler in logging.getLogger().handlers:
            handler.addFilter(SecretFilter())
        self.counter = counter
        self.load_error: ModelSourceError | ModelSettingsError | None = None
        try:
            self.worker = ShardWorker(spec, threads=threads)
        except (ModelSourceError, ModelSettingsError) as exc:
            self.load_error = exc

    def process(self, url: str) -> dict[str, Any]:
        """Process one shard (two may run at once: the actor's two slots)."""
        if self.load_error is not None:
            raise self.load_error
        report = _Batched(lambda n: self.counter.add.remote(url, n))
        stats = self.worker.process(url, progress=report)
        report.flush()
        return dataclasses.asdict(stats)


class _Batched:
    """Image counts sent to the counter at most every 0.5 s (not one remote call per image)."""

    def __init__(self, send: Any) -> None:
        self.send, self.count, self.last = send, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.count += n
        if time.monotonic() - self.last > 0.5:
            self.flush()

    def flush(self) -> None:
        if self.count:
            self.send(self.count)
        self.count, self.last = 0, time.monotonic()


def uses_gpu(spec: JobSpec) -> bool:
    """Whether actors run on GPUs: compute.device cuda, or auto on a cluster with GPUs."""
    device = spec.compute.device
    return device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def actor_options(spec: JobSpec) -> tuple[dict[str, Any], int]:
    """Ray options of one actor and its torch thread count, from compute.* and the cluster."""
    compute = spec.compute
    cluster = ray.cluster_resources()
    use_gpu = uses_gpu(spec)
    env = {k: v for k, v in os.environ.items() if k.startswith("SDEDIT_BATCH_")}
    # OpenMP threads that spin while they wait collapse when another process shares the cores
    # (quickstart with one core busy: 674 s with spinning, 77 s passive, 56 s on an idle
    # machine); waiting passively costs ~15% on an idle one. An explicit setting wins.
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
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
            overwrite: bool = False, progress: bool = True) -> RunSummary:
    """Run (or resume) a job; returns the summary. Starts a local Ray unless `address` is set.

    The model source is checked (`pipeline.preflight.check_model`) before Ray starts and
    before OUT/job.json is written, except with a Ray Client address (ray://): this driver
    then runs on another machine than the actors, which read the model.

    Raises:
        PipelineError: no input shards, model missing or not loadable, unwritable output,
        changed spec.
    """
    started = time.perf_counter()
    shards = expand_shards(list(spec.input.shards), spec.input.storage_options)
    if not (address or "").startswith("ray://"):
        for note in check_model(spec):
            logger.info("%s", note)
    previous = prepare_output(spec, overwrite)
    pending, done = plan_pending(shards, spec.output.path, spec.output.storage_options)
    summary = RunSummary(shards_total=len(shards), shards_already_done=len(done))
    if limit_shards is not None:
        pending = pending[:limit_shards]
    if not pending:
        logger.info("nothing to do: all %d shards are done", len(shards))
        return summary
    own_ray = not ray.is_initialized()
    if own_ray:
        # "local": a new Ray on this machine, never a cluster that happens to run here
        ray.init(address=address or "local", include_dashboard=False,
                 log_to_driver=logger.isEnabledFor(logging.INFO), logging_level=logging.WARNING)
    try:
        pool = _Pool(spec, pending, summary, progress)
        record_compute(spec, resolved_compute(spec, uses_gpu(spec), pool.threads), previous,
                       len(done))
        pool.run()
    finally:
        if own_ray:
            ray.shutdown()
    summary.keys_in_several_shards = _keys_in_several_shards(spec)
    summary.seconds = time.perf_counter() - started
    return summary


def _keys_in_several_shards(spec: JobSpec) -> int | None:
    """`pipeline.status.keys_in_several_shards` of the job's output; None when unreadable."""
    try:
        return keys_in_several_shards(spec.output.path, spec.output.storage_options)
    except Exception as exc:  # a summary figure: never fails a run that succeeded
        logger.warning("cannot count keys repeated across shards: %s", describe_error(exc))
        return None


class _Pool:
    """The actor pool and its scheduling loop: up to `SLOTS` shards per actor."""

    def __init__(self, spec: JobSpec, pending: list[str], summary: RunSummary,
                 progress: bool) -> None:
        self.spec = spec
        self.queue = collections.deque(pending)
        self.summary = summary
        self.attempts: collections.Counter[str] = collections.Counter()
        self.inflight: dict[Any, tuple[Any, str]] = {}  # task ref -> (actor, shard url)
        self.slots: dict[Any, int] = {}  # live actor -> shards it holds
        self.not_before: dict[str, float] = {}  # url -> monotonic time its retry may start
        self.counter = _Counter.remote()  # type: ignore[attr-defined]
        options, self.threads = actor_options(spec)
        self.actor_cls = ray.remote(_ShardActor).options(**options)
        self.progress = RunProgress(len(pending), spec.name, progress)

    def _start_actor(self) -> None:
        self.slots[self.actor_cls.remote(self.spec, self.threads, self.counter)] = 0

    def _ready(self) -> str | None:
        """The first queued shard whose retry delay has passed, taken off the queue."""
        now = time.monotonic()
        for url in self.queue:
            if self.not_before.get(url, 0.0) <= now:
                self.queue.remove(url)
                return url
        return None

    def _dispatch(self) -> None:
        """Start the actors the work needs (replacing lost ones), fill their free slots, and
        end actors that hold nothing when nothing is left to give them (releasing their
        resources lets an autoscaler remove the node)."""
        needed = -(-(len(self.queue) + len(self.inflight)) // SLOTS)
        while self.queue and len(self.slots) < min(self.spec.compute.actors.max, needed):
            self._start_actor()
        for actor in list(self.slots):
            while self.slots[actor] < SLOTS and (url := self._ready()) is not None:
                self.inflight[actor.process.remote(url)] = (actor, url)
                self.slots[actor] += 1
            if not self.queue and self.slots[actor] == 0:
                del self.slots[actor]
                ray.kill(actor)

    def run(self) -> None:
        logger.info("starting up to %d actors for %d shards", self.spec.compute.actors.max,
                    len(self.queue))
        try:
            while self.inflight or self.queue:
                self._dispatch()
                if not self.inflight:
                    time.sleep(0.2)
                    continue
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
                for ref in ready:
                    self._finish(ref)
                self.progress.images(ray.get(self.counter.total.remote()))
        finally:
            for actor in self.slots:
                ray.kill(actor)
            self.progress.close()

    def _finish(self, ref: Any) -> None:
        actor, url = self.inflight.pop(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.slots.pop(actor, None)  # _dispatch starts a replacement if work is left
            self._failed(url, f"actor died: {_last_line(exc)}")
            return
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ModelSettingsError):
                raise ModelSettingsError(str(exc.cause)) from exc
            if isinstance(exc.cause, ModelSourceError):
                raise PipelineError(f"cannot load model {self.spec.model.source}: "
                                    f"{exc.cause}") from exc
            self._failed(url, _last_line(exc))
        else:
            self._succeeded(url, stats)
        if actor in self.slots:
            self.slots[actor] -= 1

    def _succeeded(self, url: str, stats: dict[str, Any]) -> None:
        s = self.summary
        s.shards_done += 1
        s.samples += stats["samples"]
        s.outputs_ok += stats["outputs_ok"]
        s.outputs_error += stats["outputs_error"]
        for kind, count in stats.get("errors_by_kind", {}).items():
            s.errors_by_kind[kind] = s.errors_by_kind.get(kind, 0) + count
        self.progress.shard_done(stats["outputs_ok"] + stats["outputs_error"])
        marker = self._failed_url(url)
        fs, path = url_fs(marker, self.spec.output.storage_options)
        try:  # best effort: `status` ignores a failed marker whose shard is done
            if with_retries(lambda: fs.exists(path), what="check failed marker", url=marker):
                with_retries(lambda: fs.rm_file(path), what="remove failed marker", url=marker)
        except (PipelineError, OSError) as exc:
            logger.warning("could not remove %s: %s", marker, exc)

    def _failed(self, url: str, error: str) -> None:
        self.counter.drop.remote(url)  # its images will be made again
        self.attempts[url] += 1
        retries = self.spec.compute.shard_retries
        if self.attempts[url] <= retries:
            delay = retry_delay(self.attempts[url])
            logger.warning("shard %s failed (attempt %d of %d), retrying in %.0f s: %s",
                           shard_stem(url), self.attempts[url], retries + 1, delay, error)
            self.not_before[url] = time.monotonic() + delay
            self.queue.append(url)
            return
        logger.error("shard %s failed after %d attempts: %s", shard_stem(url),
                     self.attempts[url], error)
        self.summary.failed[url] = error
        record = {"stem": shard_stem(url), "input_shard": url, "attempts": self.attempts[url],
                  "error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        put_bytes_atomic(self._failed_url(url), json.dumps(record, indent=1).encode(),
                         self.spec.output.storage_options)
        self.progress.shard_failed()

    def _failed_url(self, url: str) -> str:
        return failed_url(self.spec.output.path, shard_stem(url))


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
