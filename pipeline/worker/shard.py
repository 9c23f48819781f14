"""ShardWorker: read -> decode -> batch -> edit -> encode -> write -> commit, pipelined.

One ShardWorker holds one loaded model and edits whole input shards; a Ray actor
(pipeline/driver/runner.py) wraps it, tests call it directly. Two shards may be processed at once
(from two threads; a semaphore holds a third call back): the second reads and decodes while the
first computes, and computes while the first encodes its last outputs and commits
(`stages.DeviceTurns`). Within a shard, decoding (host pool), the device, and encoding (host
pool) overlap; outputs are written to the tar in the order of the serial loop, so tars and
pixels are what the serial loop wrote; manifest rows are written in input order (sample by
sample, then output index), whatever the order they were made in.

No sample fails its shard: one that cannot be edited (decode, size, its per-row settings:
`rows.py`) is error rows before batching; a batch that runs out of device memory is split in
halves (`oom.split_on_oom`), and a sample that still does alone is a "device" row; the engine's
refusal of a sample's inputs (`sdedit.EditInputError`, and only that) is an "edit" row; an
output the format cannot hold is an "encode" row (`outputs.py`). Any other exception fails the
attempt, which the runner retries: a bug is never committed as error rows. Every row is
assembled by `records.Records.row`.

An aborted attempt leaves nothing behind: the reader is closed (its thread ends), pending
encodes are dropped, the partial tar is removed and the shard's images in flight are taken off
the worker's gauge at once (`Gauge.close`). `close()` ends the worker's threads.

Memory per shard is bounded, in decoded images: `depth` read ahead + `2 * batch` waiting in
size buckets + `batch` prepared ahead + `batch` on the device + `window` being encoded
(depth = window = 2 * batch), so at most 2 * 8 * batch for an actor's two shards (see
`ShardWorker.max_in_flight`).
"""

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
from typing import Any

import torch

from pipeline.errors import ModelSettingsError
from pipeline.input.reader import Sample, read_shard
from pipeline.input.rows import RowSettings, SettingError, row_settings
from pipeline.input.shards import shard_stem
from pipeline.job.modelcheck import loaded_model_problems
from pipeline.job.spec import JobSpec
from pipeline.output.layout import done_url
from pipeline.output.writer import ShardOutput
from pipeline.stages import DeviceTurns, Gauge, OrderedSink, Timings
from pipeline.storage import absolute_url, url_fs, with_retries
from pipeline.worker.batching import Job, Prepared, by_size, output_key, output_seed, prepare
from pipeline.worker.encode import Done, Encoded, encode_output
from pipeline.worker.hooks import Hooks
from pipeline.worker.oom import EditFailure, split_on_oom
from pipeline.worker.records import Records, ShardStats, worker_columns
from sdedit import (
    DiffusionModel,
    EditInputError,
    apply_loras,
    count_steps,
    edit,
    load_model,
    noise_for,
    resolve_device,
    resolve_dtype,
    warm_up,
)

logger = logging.getLogger(__name__)

__all__ = ["SLOTS", "ShardStats", "ShardWorker"]

SLOTS = 2
"""Shards an actor holds at once (concurrent `ShardWorker.process` calls): one computing, the
other reading ahead or committing. A shard counts as in flight until it is committed."""


class ShardWorker:
    """Edits whole input shards with one loaded model.

    Args:
        spec: the validated job.
        model: a loaded model (or None to load `spec.model.source` on the resolved device,
            with `spec.model.lora` fused in).
        worker_id: recorded in manifests and markers (default host:pid).
        threads: torch intra-op threads (CPU actors get their CPU share).
        host_threads: threads decoding and encoding (default `compute.host_threads`, else
            max(2, threads)).
        hooks: test hooks (`pipeline.worker.hooks.Hooks`), from a test or a benchmark only.
    """

    def __init__(self, spec: JobSpec, model: DiffusionModel | None = None,
                 worker_id: str | None = None, threads: int | None = None,
                 host_threads: int | None = None, hooks: Hooks | None = None) -> None:
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.spec = spec
        self.hooks = hooks
        if hooks is not None:
            hooks.starting()
        fake_gpu = self.hooks is not None and self.hooks.fake_gpu and spec.compute.device == "cuda"
        device = resolve_device("cpu" if fake_gpu else spec.compute.device)
        if model is None:
            model = load_model(spec.model.source, device=device,
                               dtype=resolve_dtype(spec.compute.dtype, device),
                               storage_options=dict(spec.model.storage_options) or None)
            apply_loras(model, spec.model.lora,
                        storage_options=dict(spec.model.storage_options) or None)
        self.model = model
        if self.hooks is not None:
            self.hooks.install(self.model)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.fingerprint = spec.fingerprint()
        self.conditional = self.model.conditional
        problems = loaded_model_problems(spec, self.model)
        if problems:  # the same check validate and run made on the config files
            raise ModelSettingsError(f"model {spec.model.source} cannot run this job: "
                                     + "; ".join(problems))
        self.negative_prompts = self.model.text is not None and \
            self.model.text.spec.negative_prompts
        self.columns = worker_columns(spec, self.model, self.worker_id)
        self.records = Records(spec, self.columns, self._steps, self.conditional,
                               self.fingerprint)
        self.host_threads = host_threads or spec.compute.host_threads or max(2, threads or 1)
        self.host = ThreadPoolExecutor(self.host_threads, thread_name_prefix="sdedit-host")
        noise_threads = self.model.accel.noise_threads
        self.noise_pool = None if noise_threads == 0 else ThreadPoolExecutor(
            noise_threads, thread_name_prefix="sdedit-noise")
        """One pool draws every batch's noise ahead (`sdedit.edit.noise_for`)."""
        self.turns = DeviceTurns()
        self.slots = threading.BoundedSemaphore(SLOTS)
        """Held by each `process` call: the two-shard bound, whoever calls."""
        self.closed = False
        self.in_flight = Gauge()
        batch = spec.compute.batch_size
        self.depth = self.window = 2 * batch
        self.max_in_flight = SLOTS * (self.depth + 2 * batch + 2 * batch + self.window)
        """The bound on decoded images alive in this worker (two shards)."""
        warm_up(self.model, batch)  # the first shard pays no allocator / kernel-selection cost

    def process(self, url: str, progress: Callable[[int], None] | None = None) -> ShardStats:
        """Edit every sample of the shard at `url` and commit its outputs.

        A shard whose marker already exists is not redone (`skipped=True`). Safe to call from
        several threads: at most `SLOTS` calls run at once, the others wait. No sample fails
        the shard: each one that cannot be edited is an error row (see `_batches`,
        `split_on_oom`).
        Raises:
            ShardError: the tar is unreadable or truncated (the runner retries the shard);
            any other error (writing, a bug): the shard is aborted, nothing of it is committed.
        """
        if self.closed:
            raise RuntimeError("ShardWorker.process after close()")
        with self.slots:
            return self._process(url, progress)

    def _process(self, url: str, progress: Callable[[int], None] | None) -> ShardStats:
        start = time.perf_counter()
        stem = shard_stem(url)
        if self._committed(stem):
            logger.info("shard %s already committed; skipping", stem)
            return ShardStats(stem=stem, input_shard=url, worker=self.worker_id, skipped=True)
        writer = ShardOutput(self.spec.output.path, stem, self.spec.output.storage_options)
        stats = ShardStats(stem=stem, input_shard=absolute_url(url), worker=self.worker_id)
        timings = Timings()
        gauge = Gauge(parent=self.in_flight)  # this shard's decoded images alive
        sink: OrderedSink[Encoded] = OrderedSink(
            self.host, lambda item: self._write(item, writer, stats, timings, progress, gauge),
            self.window)
        token = object()
        self.turns.arrive(token)
        try:
            try:
                self._compute(url, stem, writer, stats, timings, sink, token, gauge)
            finally:
                self.turns.leave(token)
            with timings.measure("wait_encode"):
                sink.finish()
            stats.seconds = time.perf_counter() - start
            stats.timings = {k: round(v, 4) for k, v in sorted(timings.seconds.items())}
            stats.in_flight_max = self.in_flight.peak
            with timings.measure("commit"):
                writer.commit(self.records.marker(stats, writer.urls))
        except BaseException:
            sink.cancel()
            writer.abort()
            gauge.close()  # nothing of this shard stays counted, not even late decodes
            raise
        return stats

    def close(self) -> None:
        """End the worker's threads (host pool, noise pool); call once no shard is in process.
        Idempotent."""
        self.closed = True
        self.host.shutdown(wait=True, cancel_futures=True)
        if self.noise_pool is not None:
            self.noise_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _compute(self, url: str, stem: str, writer: ShardOutput, stats: ShardStats,
                 timings: Timings, sink: OrderedSink[Any], token: object,
                 gauge: Gauge) -> None:
        """Read, batch and edit the shard; each output goes to the sink to be encoded. The
        reader is closed when this returns or raises (its thread ends)."""
        inp = self.spec.input
        if self.hooks is not None:
            self.hooks.before_read(stem)
        samples = read_shard(url, inp.storage_options, inp.image, inp.mask, pool=self.host,
                             depth=self.depth, gauge=gauge, max_pixels=inp.max_pixels,
                             timings=timings)
        batches = self._batches(samples, writer, stats, timings, gauge)
        try:
            self._loop(batches, stem, writer, stats, timings, sink, token, gauge)
        finally:
            batches.close()
            samples.close()  # type: ignore[attr-defined]

    def _loop(self, batches: Iterator[list[Job]], stem: str, writer: ShardOutput,
              stats: ShardStats, timings: Timings, sink: OrderedSink[Any], token: object,
              gauge: Gauge) -> None:
        """Edit batch after batch, the next one prepared in the host pool meanwhile."""
        encode = timings.timed("encode", self._encode)
        prepare = timings.timed("prepare", self._prepare)
        ahead: Future[Prepared] | None = None  # the next batch, made ready in the host pool
        try:
            for batch in itertools.chain(batches, [None]):  # lazily: one batch ahead, no more
                following = None if batch is None else self.host.submit(prepare, batch)
                if ahead is not None:
                    with timings.measure("wait_prepare"):
                        prepared = ahead.result()
                    with self.turns.turn(token) as waited, timings.measure("device"):
                        timings.add("wait_device", waited)
                        done = self._edit(prepared, writer, stats, gauge)
                    for item in done:
                        sink.submit(encode, item)
                    if self.hooks is not None:
                        self.hooks.after_batch(stem, stats.outputs_ok + stats.outputs_error
                                               + len(sink.pending))
                ahead = following
        except BaseException:
            if ahead is not None and not ahead.cancel():  # the batch made ready: its noise too
                with contextlib.suppress(BaseException):
                    close = getattr(ahead.result().noise, "close", None)
                    if close is not None:
                        close()
            raise

    def _committed(self, stem: str) -> bool:
        url = done_url(self.spec.output.path, stem)
        fs, path = url_fs(url, self.spec.output.storage_options)
        return bool(with_retries(lambda: fs.exists(path), what="check done marker", url=url))

    def _batches(self, samples: Iterator[Sample], writer: ShardOutput, stats: ShardStats,
                 timings: Timings, gauge: Gauge) -> Iterator[list[Job]]:
        """Jobs of editable samples, batched by image size (`batching.by_size`); a sample that
        cannot be edited (decode, size, its per-row settings) is error rows here, before
        batching, so it never fails a batch."""
        return by_size(self._jobs(samples, writer, stats, timings, gauge),
                       self.spec.compute.batch_size)

    def _jobs(self, samples: Iterator[Sample], writer: ShardOutput, stats: ShardStats,
              timings: Timings, gauge: Gauge) -> Iterator[Job]:
        """One job per output of each editable sample, in input order; a sample that cannot
        be edited is its error rows here. A sample with an error but no kind is a bug of the
        reader: the row builder refuses it and the attempt fails."""
        sd = self.spec.sdedit
        while True:
            with timings.measure("wait_input"):
                sample = next(samples, None)
            if sample is None:
                return
            position = stats.samples
            stats.samples += 1
            settings: RowSettings | None = None
            if sample.error is None:
                sample.error = self._size_problem(sample)
                sample.error_kind = "size" if sample.error else None
            if sample.error is None:
                try:
                    settings = row_settings(
                        sample.key, sample.carried, t0=sd.t0, prompt=sd.prompt,
                        negative_prompt=sd.negative_prompt, conditional=self.conditional,
                        check_t0=self._t0_problem, negative_prompts=self.negative_prompts)
                except SettingError as exc:
                    sample.error, sample.error_kind = str(exc), "setting"
            if sample.error is not None or settings is None:
                for index in range(sd.samples_per_input):
                    self._error_row(writer, stats, sample, position, index,
                                    sample.error_kind, sample.error or "")
                gauge.add(-1)
                continue
            steps = self._steps(settings.t0)
            for index in range(sd.samples_per_input):
                yield Job(sample, stats.input_shard, index,
                          output_seed(sd.seed, sample.key, index),
                          output_key(sample.key, index, sd.samples_per_input), settings, steps,
                          position)

    def _size_problem(self, sample: Sample) -> str | None:
        assert sample.guide is not None
        h, w = sample.guide.shape[:2]
        f = self.model.downsample_factor
        if h % f or w % f:
            return (f"image size {w}x{h} cannot be taken by model {self.spec.model.source}; "
                    f"allowed: width and height multiples of {f}")
        return None

    def _prepare(self, batch: list[Job]) -> Prepared:
        """A batch's tensors, and its noise already being drawn (runs in the host pool while
        the device works on the batch before)."""
        h, w = batch[0].sample.guide.shape[:2]  # type: ignore[union-attr]
        return prepare(batch, noise_for(self.model, [job.seed for job in batch], h, w,
                                        pool=self.noise_pool))

    def _edit(self, prepared: Prepared, writer: ShardOutput, stats: ShardStats,
              gauge: Gauge) -> list[Done]:
        """Edit one batch on the device (split in halves when it runs out of memory); float
        outputs on the CPU, or error rows for the outputs the engine refuses (a problem of
        these inputs, not of the shard) or that run out of memory alone."""
        done: list[Done] = []
        indices = list(range(len(prepared.jobs)))
        started = time.perf_counter()
        try:
            for part, result in split_on_oom(indices, lambda rows: self._run(prepared, rows)):
                if isinstance(result, EditFailure):
                    for row in part:
                        job = prepared.jobs[row]
                        self._error_row(writer, stats, job.sample, job.position, job.index,
                                        result.kind, result.message, batch_size=len(part),
                                        job=job)
                        self._release(job, gauge)
                else:
                    seconds = (time.perf_counter() - started) / len(part)
                    done += [Done(prepared.jobs[row], edited, seconds, len(part))
                             for row, edited in zip(part, result, strict=True)]
                started = time.perf_counter()
        finally:
            close = getattr(prepared.noise, "close", None)  # unused when the batch was split
            if close is not None:
                close()
        return done

    def _run(self, prepared: Prepared, rows: Sequence[int]) -> torch.Tensor | EditFailure:
        """float32 (len(rows), 3, H, W) outputs on the CPU of these rows of a prepared batch
        (all of them: with its noise drawn ahead), or the engine's refusal of the inputs.

        Raises:
            torch.OutOfMemoryError: the device ran out of memory (see `split_on_oom`).
        """
        sd = self.spec.sdedit
        whole = len(rows) == len(prepared.jobs)
        index = torch.tensor(list(rows))
        images = prepared.images if whole else prepared.images[index]
        masks = prepared.masks if whole or prepared.masks is None else prepared.masks[index]
        jobs = [prepared.jobs[r] for r in rows]
        texts = {} if not self.conditional else {
            "prompts": [job.settings.prompt or "" for job in jobs],
            "negative_prompts": [job.settings.negative_prompt or "" for job in jobs],
            "guidance_scale": self.columns["guidance_scale"]}
        try:
            out = edit(self.model, images, t0=[job.settings.t0 for job in jobs],
                       seeds=[job.seed for job in jobs], sampler=sd.sampler, steps=sd.steps,
                       masks=masks, repeats=sd.repeats, eta=sd.eta,
                       noise=prepared.noise if whole else None, **texts)
        except EditInputError as exc:  # only the engine's refusal; anything else fails
            return EditFailure("edit", str(exc))
        return out.cpu()  # converted to 8 bits per output, in the host pool (`Done.pixels`)

    def _encode(self, done: Done) -> Encoded:
        """The output encoded (`outputs.encode_output`); runs in the host pool."""
        return encode_output(done, self.spec.output, self.records.metadata)

    def _write(self, item: Encoded, writer: ShardOutput, stats: ShardStats, timings: Timings,
               progress: Callable[[int], None] | None, gauge: Gauge) -> None:
        """Append one encoded output to the tar (in processing order) and its manifest row
        (put in input order at commit)."""
        job = item.done.job
        if item.sample is None:
            self._error_row(writer, stats, job.sample, job.position, job.index, "encode",
                            item.error or "", batch_size=item.done.batch_size, job=job)
        else:
            if self.hooks is not None:
                self.hooks.before_write(writer.stem)
            with timings.measure("write"):
                writer.add_sample(item.sample)
            writer.add_row(self.records.row(
                stats.input_shard, job.sample, job.index, job.settings,
                batch_size=item.done.batch_size, encoded=item,
                output_shard=absolute_url(writer.urls.tar)), job.position)
            stats.outputs_ok += 1
        self._release(job, gauge)
        if progress is not None:
            progress(1)

    def _release(self, job: Job, gauge: Gauge) -> None:
        """The last output of a sample is done: its decoded image is no longer in flight."""
        if job.index == self.spec.sdedit.samples_per_input - 1:
            gauge.add(-1)

    def _steps(self, t0: float) -> int | None:
        """Network evaluations per round of an output started at t0 (None: t0 is invalid)."""
        return None if self._t0_problem(t0) else count_steps(
            self.model, self.spec.sdedit.sampler, t0, self.spec.sdedit.steps)

    def _t0_problem(self, t0: float) -> str | None:
        """Why a row's t0 in (0, 1] cannot be used with this model, sampler and steps."""
        sd = self.spec.sdedit
        try:
            count_steps(self.model, sd.sampler, t0, sd.steps)
        except ValueError as exc:
            return str(exc)
        return None

    def _error_row(self, writer: ShardOutput, stats: ShardStats, sample: Sample,
                   position: int, index: int, kind: str | None, error: str,
                   batch_size: int | None = None, job: Job | None = None) -> None:
        """One error row (`kind`: one of `pipeline.output.manifest.ERROR_KINDS`) of the sample at
        `position` in the shard, with the row's own settings when they were read (`job`),
        else the job's."""
        settings = job.settings if job is not None else self.records.job_settings()
        row = self.records.row(stats.input_shard, sample, index, settings,
                               batch_size=batch_size, error=error, error_kind=kind)
        writer.add_row(row, position)
        stats.count_error(row["error_kind"])
        logger.warning("sample %s: %s", row["output_key"], error)
