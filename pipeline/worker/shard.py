"""ShardWorker: read -> batch -> edit -> encode (-> score) -> write -> commit, pipelined.

One worker holds one model and edits whole shards, two at once. No sample fails its shard: one
that cannot be edited is error rows; any other exception fails the attempt, leaving nothing
behind. See docs/performance.md, "the pipelined actor"."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pipeline.errors import ModelSettingsError
from pipeline.input.reader import read_shard
from pipeline.input.shards import shard_stem
from pipeline.job.modelcheck import loaded_model_problems
from pipeline.job.spec import JobSpec
from pipeline.output.folder import OutputFolder
from pipeline.stages import DeviceTurns, Gauge, OrderedSink
from pipeline.storage import absolute_url
from pipeline.worker.attempt import Attempt
from pipeline.worker.batching import Prepared, Task, by_size, prepare
from pipeline.worker.encode import Done, Encoded, encode_output
from pipeline.worker.hooks import NO_HOOKS, Hooks
from pipeline.worker.loading import load_job_model
from pipeline.worker.notices import ActorWarnings
from pipeline.worker.oom import EditFailure, split_on_oom
from pipeline.worker.records import Records, ShardStats, worker_columns
from pipeline.worker.scoring import ScoreStage
from pipeline.worker.tasks import TaskStage
from sdedit import (
    DiffusionModel,
    EditInputError,
    edit,
    noise_for,
    resolve_device,
    warm_up,
)

logger = logging.getLogger(__name__)

__all__ = ["SLOTS", "ShardStats", "ShardWorker"]

SLOTS = 2
"""Shards an actor holds at once: one computing, the other reading ahead or committing (a shard
is in flight until committed)."""


class ShardWorker:
    """Edits whole input shards with one loaded model (None: the job's, loaded here).

    `threads` are torch's intra-op threads, `host_threads` those decoding and encoding (default
    `compute.host_threads`, else max(2, threads)); `hooks` come from tests and benchmarks only."""

    def __init__(self, spec: JobSpec, model: DiffusionModel | None = None,
                 worker_id: str | None = None, threads: int | None = None,
                 host_threads: int | None = None, hooks: Hooks = NO_HOOKS) -> None:
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.warnings = ActorWarnings.shared()  # from the start: model loading's count too
        self.spec, self.hooks = spec, hooks
        self.output = OutputFolder.of(spec)
        hooks.starting()
        fake_gpu = hooks.fake_gpu and spec.compute.device == "cuda"
        device = resolve_device("cpu" if fake_gpu else spec.compute.device)
        self.model = model or load_job_model(spec, device, hooks)
        hooks.install(self.model)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.conditional = self.model.conditional
        problems = loaded_model_problems(spec, self.model)
        if problems:  # the same check validate and run made on the config files
            raise ModelSettingsError(f"model {spec.model.source} cannot run this job: "
                                     + "; ".join(problems))
        self.stage = TaskStage(spec, self.model)
        self.columns = worker_columns(spec, self.model, self.worker_id)
        self.records = Records(spec, self.columns, self.stage.steps, self.conditional,
                               spec.fingerprint())
        self.scoring = ScoreStage(spec, self.model.device) if spec.score.enabled else None
        """The score stage (`score:` section), on the edit's device."""
        if self.scoring is not None:
            hooks.install_scorer(self.scoring.scorer)
        self.host_threads = host_threads or spec.compute.host_threads or max(2, threads or 1)
        self.host = ThreadPoolExecutor(self.host_threads, thread_name_prefix="sdedit-host")
        noise_threads = self.model.accel.noise_threads
        self.noise_pool = None if noise_threads == 0 else ThreadPoolExecutor(
            noise_threads, thread_name_prefix="sdedit-noise")
        """One pool draws every batch's noise ahead (`sdedit.noise_for`)."""
        self.turns = DeviceTurns()
        self.slots = threading.BoundedSemaphore(SLOTS)
        """Held by each `process` call: the two-shard bound, whoever calls."""
        self.closed = False
        self.in_flight = Gauge()
        batch = spec.compute.batch_size
        self.depth = self.window = 2 * batch
        self.max_in_flight = SLOTS * (self.depth + 2 * batch + 2 * batch + self.window)
        """Decoded images alive at most, over two shards."""
        warm_up(self.model, batch)  # the first shard pays no allocator / kernel-selection cost

    def process(self, url: str, progress: Callable[[int], None] | None = None) -> ShardStats:
        """Edit every sample of the shard at `url` and commit its outputs; a committed shard is
        skipped (`skipped=True`). At most `SLOTS` calls run at once, the others wait.

        Raises:
            ShardError: the tar is unreadable or truncated (the runner retries the shard); any other
                error aborts the shard, nothing of it committed.
        """
        if self.closed:
            raise RuntimeError("ShardWorker.process after close()")
        with self.slots:
            return self._process(url, progress)

    def _process(self, url: str, progress: Callable[[int], None] | None) -> ShardStats:
        start = time.perf_counter()
        stem = shard_stem(url)
        if self.output.is_done(stem):
            logger.info("shard %s already committed; skipping", stem)
            return ShardStats(stem=stem, input_shard=url, worker=self.worker_id, skipped=True)
        scores = None if self.scoring is None else self.scoring.metadata
        a = Attempt(url, stem, self.output.shard_writer(stem, scores),
                    ShardStats(stem=stem, input_shard=absolute_url(url), worker=self.worker_id),
                    Gauge(parent=self.in_flight), progress, self.records)
        a.sink = OrderedSink(self.host, lambda item: self._write(item, a), self.window)
        self.turns.arrive(a.token)
        try:
            try:
                self._compute(a)
            finally:
                self.turns.leave(a.token)
            with a.timings.measure("wait_encode"):
                a.sink.finish()
            if self.scoring is not None:
                self.scoring.flush(a)
            a.stats.seconds = time.perf_counter() - start
            a.stats.timings = {k: round(v, 4) for k, v in sorted(a.timings.seconds.items())}
            a.stats.in_flight_max = self.in_flight.peak
            a.stats.actor_warnings = self.warnings.take()  # those since the last commit
            with a.timings.measure("commit"):
                a.writer.commit(self.records.marker(a.stats, a.writer.urls))
        except BaseException:
            a.sink.cancel()
            a.writer.abort()
            a.gauge.close()  # nothing of this shard stays counted, not even late decodes
            raise
        return a.stats

    def close(self) -> None:
        """End the worker's threads; call once no shard is in process. Idempotent."""
        self.closed = True
        self.host.shutdown(wait=True, cancel_futures=True)
        if self.noise_pool is not None:
            self.noise_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _compute(self, a: Attempt) -> None:
        """Read, batch and edit the shard, outputs to the sink; the reader is closed after."""
        inp = self.spec.input
        self.hooks.before_read(a.stem)
        samples = read_shard(a.url, inp.storage_options, inp.image, inp.mask, pool=self.host,
                             depth=self.depth, gauge=a.gauge, max_pixels=inp.max_pixels,
                             timings=a.timings)
        batches = by_size(self.stage.tasks(samples, a), self.spec.compute.batch_size)
        try:
            self._loop(batches, a)
        finally:
            batches.close()
            samples.close()  # type: ignore[attr-defined]

    def _loop(self, batches: Iterator[list[Task]], a: Attempt) -> None:
        """Edit batch after batch, the next one prepared in the host pool meanwhile."""
        encode = a.timings.timed("encode", self._encode)
        prepare = a.timings.timed("prepare", self._prepare)
        ahead: Future[Prepared] | None = None  # the next batch, made ready in the host pool
        try:
            for batch in itertools.chain(batches, [None]):  # lazily: one batch ahead, no more
                following = None if batch is None else self.host.submit(prepare, batch)
                if ahead is not None:
                    with a.timings.measure("wait_prepare"):
                        prepared = ahead.result()
                    with self.turns.turn(a.token) as waited, a.timings.measure("device"):
                        a.timings.add("wait_device", waited)
                        done = self._edit(prepared, a)
                    for item in done:
                        a.sink.submit(encode, item)
                    self.hooks.after_batch(a.stem, a.stats.outputs_ok + a.stats.outputs_error
                                           + len(a.sink.pending))
                ahead = following
        except BaseException:
            if ahead is not None and not ahead.cancel():  # the batch made ready: its noise too
                with contextlib.suppress(BaseException):
                    noise = ahead.result().noise
                    if noise is not None:
                        noise.close()
            raise

    def _prepare(self, batch: list[Task]) -> Prepared:
        """A batch's tensors and its noise, drawn ahead (host pool, during the batch before)."""
        h, w = batch[0].sample.guide.shape[:2]  # type: ignore[union-attr]
        return prepare(batch, noise_for(self.model, [task.seed for task in batch], h, w,
                                        pool=self.noise_pool))

    def _edit(self, prepared: Prepared, a: Attempt) -> list[Done]:
        """Edit one batch on the device, split in halves when out of memory: float outputs on the
        CPU, or error rows for outputs the engine refuses or that run out of memory alone."""
        self.stage.settle(prepared.tasks)  # on the device's turn, where the encoders run
        done: list[Done] = []
        indices = list(range(len(prepared.tasks)))
        started = time.perf_counter()
        try:
            for part, result in split_on_oom(indices, lambda rows: self._run(prepared, rows)):
                if isinstance(result, EditFailure):
                    for row in part:
                        task = prepared.tasks[row]
                        a.error_row(task.sample, task.position, task.index, result.kind,
                                    result.message, batch_size=len(part), task=task)
                        self._release(task, a)
                else:
                    seconds = (time.perf_counter() - started) / len(part)
                    done += [Done(prepared.tasks[row], edited, seconds, len(part))
                             for row, edited in zip(part, result, strict=True)]
                started = time.perf_counter()
        finally:
            if prepared.noise is not None:  # unused when the batch was split
                prepared.noise.close()
        return done

    def _run(self, prepared: Prepared, rows: Sequence[int]) -> torch.Tensor | EditFailure:
        """float32 (len(rows), 3, H, W) CPU outputs of these rows of a prepared batch, or the
        engine's refusal; raises torch.OutOfMemoryError for `split_on_oom`."""
        sd = self.spec.sdedit
        whole = len(rows) == len(prepared.tasks)
        index = torch.tensor(list(rows))
        images = prepared.images if whole else prepared.images[index]
        masks = prepared.masks if whole or prepared.masks is None else prepared.masks[index]
        tasks = [prepared.tasks[r] for r in rows]
        texts = {} if not self.conditional else {
            "prompts": [task.settings.prompt or "" for task in tasks],
            "negative_prompts": [task.settings.negative_prompt or "" for task in tasks],
            "guidance_scale": self.columns["guidance_scale"]}
        try:
            out = edit(self.model, images, t0=[task.settings.t0 for task in tasks],
                       seeds=[task.seed for task in tasks], sampler=sd.sampler, steps=sd.steps,
                       masks=masks, repeats=sd.repeats, eta=sd.eta,
                       noise=prepared.noise if whole else None, **texts)
        except EditInputError as exc:  # only the engine's refusal; anything else fails
            return EditFailure("edit", str(exc))
        return out.cpu()  # converted to 8 bits per output, in the host pool (`Done.pixels`)

    def _encode(self, done: Done) -> Encoded:
        """The output encoded and its scorer inputs; host pool."""
        encoded = encode_output(done, self.spec.output, self.records.metadata)
        if self.scoring is not None and encoded.sample is not None:
            encoded.score_input = self.scoring.prepare(encoded)
        return encoded

    def _write(self, item: Encoded, a: Attempt) -> None:
        """One encoded output to the tar (processing order), its row to the manifest."""
        task = item.done.task
        if item.sample is None:
            a.error_row(task.sample, task.position, task.index, "encode", item.error or "",
                        batch_size=item.done.batch_size, task=task)
        else:
            self.hooks.before_write(a.stem)
            row = a.ok_row(item)
            if self.scoring is None:
                a.writer.add_row(row, task.position)
            else:  # the row goes to the writer with its scores
                self.scoring.add(a, row, task.position, item.score_input)
        self._release(task, a)
        if a.progress is not None:
            a.progress(1)

    def _release(self, task: Task, a: Attempt) -> None:
        """The last output of a sample is done: its decoded image is no longer in flight."""
        if task.index == self.spec.sdedit.samples_per_input - 1:
            a.gauge.add(-1)
