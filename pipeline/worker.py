"""ShardWorker: read -> decode -> batch -> edit -> encode -> write -> commit, pipelined.

One ShardWorker holds one loaded model and edits whole input shards; a Ray actor
(pipeline/runner.py) wraps it, tests call it directly. Two shards may be processed at once
(from two threads): the second reads and decodes while the first computes, and computes while
the first encodes its last outputs and commits (`stages.DeviceTurns`). Within a shard, decoding
(host pool), the device, and encoding (host pool) overlap; outputs are written in the order of
the serial loop, so tars and pixels are what the serial loop wrote.

No sample fails its shard: one that cannot be edited (decode, size, its per-row settings:
`rows.py`) is error rows before batching; a batch that runs out of device memory is split in
halves (`oom.split_on_oom`), and a sample that still does alone is a "device" row; an output
the format cannot hold is an "encode" row (`outputs.py`). Every row carries the job-constant
`columns` and its own t0, prompts and `batch_size` (the samples of the call that made it).

Memory per shard is bounded, in decoded images: `depth` read ahead + `2 * batch` waiting in
size buckets + `batch` prepared ahead + `batch` on the device + `window` being encoded
(depth = window = 2 * batch), so at most 2 * 8 * batch for an actor's two shards (see
`ShardWorker.max_in_flight`).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline import testhooks
from pipeline.batching import Job, Prepared, by_size, output_key, output_seed, prepare
from pipeline.errors import ModelSettingsError
from pipeline.layout import done_url
from pipeline.manifest import manifest_row
from pipeline.modelcheck import loaded_model_problems
from pipeline.oom import EditFailure, split_on_oom
from pipeline.outputs import Done, Encoded, encode_output
from pipeline.reader import Sample, read_shard
from pipeline.rows import RowSettings, SettingError, row_settings
from pipeline.shards import shard_stem
from pipeline.spec import JobSpec
from pipeline.stages import DeviceTurns, Gauge, OrderedSink, Timings
from pipeline.storage import absolute_url, url_fs, with_retries
from pipeline.writer import ShardOutput, model_location, now
from sdedit import DiffusionModel, edit, load_model
from sdedit.devices import dtype_name, resolve_device, resolve_dtype
from sdedit.edit import count_steps, guidance_scale, noise_for

logger = logging.getLogger(__name__)

SLOTS = 2
"""Shards an actor holds at once (concurrent `ShardWorker.process` calls): one computing, the
other reading ahead or committing. A shard counts as in flight until it is committed."""

@dataclass
class ShardStats:
    """What a committed shard holds; written into its done marker."""

    stem: str
    input_shard: str
    samples: int = 0
    outputs_ok: int = 0
    outputs_error: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    in_flight_max: int = 0


class ShardWorker:
    """Edits whole input shards with one loaded model.

    Args:
        spec: the validated job.
        model: a loaded model (or None to load `spec.model.source` on the resolved device).
        worker_id: recorded in manifests and markers (default host:pid).
        threads: torch intra-op threads (CPU actors get their CPU share).
        host_threads: threads decoding and encoding (default `compute.host_threads`, else
            max(2, threads)).
    """

    def __init__(self, spec: JobSpec, model: DiffusionModel | None = None,
                 worker_id: str | None = None, threads: int | None = None,
                 host_threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.spec = spec
        self.hooks = testhooks.from_env()
        fake_gpu = self.hooks is not None and self.hooks.fake_gpu and spec.compute.device == "cuda"
        device = resolve_device("cpu" if fake_gpu else spec.compute.device)
        self.model = model or load_model(
            spec.model.source, device=device,
            dtype=resolve_dtype(spec.compute.dtype, device),
            storage_options=dict(spec.model.storage_options) or None)
        if self.hooks is not None:
            self.hooks.install(self.model)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.fingerprint = spec.fingerprint()
        sd = spec.sdedit
        self.conditional = self.model.conditional
        problems = loaded_model_problems(spec, self.model)
        if problems:  # the same check validate and run made on the config files
            raise ModelSettingsError(f"model {spec.model.source} cannot run this job: "
                                     + "; ".join(problems))
        self.columns: dict[str, Any] = {
            "sampler": sd.sampler, "repeats": sd.repeats, "eta": sd.eta,
            "model": model_location(spec.model.source),
            "model_identity": self.model.identity or None, "dtype": dtype_name(self.model.dtype),
            "worker": self.worker_id,
            "guidance_scale": guidance_scale(self.model, sd.guidance_scale)}
        """Manifest columns that are the same for every row of this worker."""
        self.host_threads = host_threads or spec.compute.host_threads or max(2, threads or 1)
        self.host = ThreadPoolExecutor(self.host_threads, thread_name_prefix="sdedit-host")
        self.turns = DeviceTurns()
        self.in_flight = Gauge()
        batch = spec.compute.batch_size
        self.depth = self.window = 2 * batch
        self.max_in_flight = SLOTS * (self.depth + 2 * batch + 2 * batch + self.window)
        """The bound on decoded images alive in this worker (two shards)."""
        self.model.warm_up(batch)  # the first shard pays no allocator / kernel-selection cost

    def process(self, url: str, progress: Callable[[int], None] | None = None) -> ShardStats:
        """Edit every sample of the shard at `url` and commit its outputs.

        A shard whose marker already exists is not redone (`skipped=True`). Safe to call from
        two threads at once (the actor's two shard slots). No sample fails the shard: each one
        that cannot be edited is an error row (see `_batches`, `split_on_oom`).
        Raises:
            ShardError: the tar is unreadable or truncated (the runner retries the shard);
            any error of writing: the shard is aborted, nothing of it is committed.
        """
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
                writer.commit(self._marker(stats, writer))
        except BaseException:
            sink.cancel()
            writer.abort()
            gauge.add(-gauge.value)  # nothing of this shard stays alive
            raise
        return stats

    def _compute(self, url: str, stem: str, writer: ShardOutput, stats: ShardStats,
                 timings: Timings, sink: OrderedSink[Any], token: object,
                 gauge: Gauge) -> None:
        """Read, batch and edit the shard; each output goes to the sink to be encoded."""
        inp = self.spec.input
        samples = read_shard(url, inp.storage_options, inp.image, inp.mask, pool=self.host,
                             depth=self.depth, gauge=gauge, max_pixels=inp.max_pixels,
                             timings=timings)
        encode = timings.timed("encode", self._encode)
        prepare = timings.timed("prepare", self._prepare)
        ahead: Future[Prepared] | None = None  # the next batch, made ready in the host pool
        batches = self._batches(samples, writer, stats, timings, gauge)
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
        sd = self.spec.sdedit
        while True:
            with timings.measure("wait_input"):
                sample = next(samples, None)
            if sample is None:
                return
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
                        check_t0=self._t0_problem)
                except SettingError as exc:
                    sample.error, sample.error_kind = str(exc), "setting"
            if sample.error is not None or settings is None:
                for index in range(sd.samples_per_input):
                    self._error_row(writer, stats, sample, index,
                                    sample.error_kind or "decode", sample.error or "")
                gauge.add(-1)
                continue
            steps = self._steps(settings.t0)
            for index in range(sd.samples_per_input):
                yield Job(sample, stats.input_shard, index,
                          output_seed(sd.seed, sample.key, index),
                          output_key(sample.key, index, sd.samples_per_input), settings, steps)

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
        return prepare(batch, noise_for(self.model, [job.seed for job in batch], h, w))

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
                        self._error_row(writer, stats, job.sample, job.index, result.kind,
                                        result.message, batch_size=len(part), job=job)
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
        except ValueError as exc:
            return EditFailure("edit", str(exc))
        return out.cpu()  # converted to 8 bits per output, in the host pool (`Done.pixels`)

    def _encode(self, done: Done) -> Encoded:
        """The output encoded (`outputs.encode_output`); runs in the host pool."""
        return encode_output(done, self.spec.output, self._metadata)

    def _metadata(self, job: Job, l2: float) -> dict[str, Any]:
        """The output's `{key}.json` (also the first fields of its manifest row): what it was
        made with, enough to make it again with `sdedit.edit`."""
        data = {"key": job.sample.key, "output_key": job.output_key, "sample_index": job.index,
                "seed": job.seed, "t0": job.settings.t0, "steps": job.steps,
                **{k: self.columns[k] for k in ("sampler", "repeats", "eta", "model",
                                                "model_identity")},
                "input_shard": job.input_shard, "faithfulness_l2": round(l2, 6)}
        if self.conditional:
            data.update(prompt=job.settings.prompt, negative_prompt=job.settings.negative_prompt,
                        guidance_scale=self.columns["guidance_scale"])
        return data

    def _write(self, item: Encoded, writer: ShardOutput, stats: ShardStats, timings: Timings,
               progress: Callable[[int], None] | None, gauge: Gauge) -> None:
        """Append one encoded output to the tar and its manifest row (in processing order)."""
        job = item.done.job
        if item.sample is None:
            self._error_row(writer, stats, job.sample, job.index, "encode", item.error or "",
                            batch_size=item.done.batch_size, job=job)
        else:
            if self.hooks is not None:
                self.hooks.before_write(writer.stem)
            with timings.measure("write"):
                writer.add_sample(item.sample)
            writer.add_row(self._row(stats, job.sample, job.index, job.settings,
                                     batch_size=item.done.batch_size, encoded=item,
                                     output_shard=absolute_url(writer.urls.tar)))
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

    def _error_row(self, writer: ShardOutput, stats: ShardStats, sample: Sample, index: int,
                   kind: str, error: str, batch_size: int | None = None,
                   job: Job | None = None) -> None:
        """One error row (`kind`: one of `pipeline.manifest.ERROR_KINDS`), with the row's own
        settings when they were read (`job`), else the job's."""
        sd = self.spec.sdedit
        settings = job.settings if job is not None else RowSettings(
            sd.t0, sd.prompt if self.conditional else None,
            sd.negative_prompt if self.conditional else None)
        row = self._row(stats, sample, index, settings, batch_size=batch_size, error=error,
                        error_kind=kind)
        writer.add_row(row)
        stats.outputs_error += 1
        stats.errors_by_kind[kind] = stats.errors_by_kind.get(kind, 0) + 1
        logger.warning("sample %s: %s", row["output_key"], error)

    def _row(self, stats: ShardStats, sample: Sample, index: int, settings: RowSettings, *,
             batch_size: int | None, encoded: Encoded | None = None,
             output_shard: str | None = None, error: str | None = None,
             error_kind: str | None = None) -> dict[str, Any]:
        """The manifest row of output `index` of `sample` (`pipeline.manifest.manifest_row`,
        the one place a row is assembled): ok when `encoded` is given, else an error row."""
        sd = self.spec.sdedit
        if encoded is not None:
            h, w = encoded.size
        else:
            h, w = sample.guide.shape[:2] if sample.guide is not None else (None, None)
        return manifest_row(
            key=sample.key, output_key=output_key(sample.key, index, sd.samples_per_input),
            sample_index=index, input_shard=stats.input_shard, output_shard=output_shard,
            status="ok" if encoded is not None else "error", error=error,
            error_kind=error_kind, seed=output_seed(sd.seed, sample.key, index),
            t0=settings.t0, steps=self._steps(settings.t0), width=w, height=h,
            faithfulness_l2=None if encoded is None else encoded.metadata["faithfulness_l2"],
            seconds=None if encoded is None else encoded.done.seconds,
            batch_size=batch_size, created_at=now(), prompt=settings.prompt,
            negative_prompt=settings.negative_prompt, **self.columns)

    def _marker(self, stats: ShardStats, writer: ShardOutput) -> dict[str, Any]:
        return {"stem": stats.stem, "input_shard": stats.input_shard,
                "output_shard": absolute_url(writer.urls.tar),
                "manifest": absolute_url(writer.urls.manifest),
                "samples": stats.samples, "outputs_ok": stats.outputs_ok,
                "outputs_error": stats.outputs_error,
                "errors_by_kind": dict(sorted(stats.errors_by_kind.items())),
                "seconds": round(stats.seconds, 3),
                "timings": stats.timings, "in_flight_max": stats.in_flight_max,
                "worker": stats.worker, "fingerprint": self.fingerprint,
                "created_at": now().isoformat()}

