"""What a shard's results record: each manifest row, each output's metadata, the commit marker.

`Records` assembles all of them in one place for a worker; `ShardStats` is what an attempt counts
as it goes, carried by the marker and added up by `run`'s summary and `status`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.input.reader import Sample
from pipeline.input.rows import RowSettings
from pipeline.job.spec import JobSpec
from pipeline.output.layout import ShardUrls
from pipeline.output.manifest import manifest_row
from pipeline.output.writer import model_location, now
from pipeline.storage import absolute_url
from pipeline.worker.batching import Task, output_key, output_seed
from pipeline.worker.encode import Encoded
from sdedit import DiffusionModel, dtype_name, guidance_scale

__all__ = ["Records", "ShardStats", "worker_columns"]


def worker_columns(spec: JobSpec, model: DiffusionModel, worker_id: str) -> dict[str, Any]:
    """Manifest columns that are the same for every row of a worker."""
    sd = spec.sdedit
    return {"sampler": sd.sampler, "repeats": sd.repeats, "eta": sd.eta,
            "model": model_location(spec.model.source),
            "model_identity": model.identity or None, "dtype": dtype_name(model.dtype),
            "worker": worker_id, "guidance_scale": guidance_scale(model, sd.guidance_scale)}


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
    row_warnings: dict[str, int] = field(default_factory=dict)
    """Manifest rows by warning kind."""
    actor_warnings: dict[str, int] = field(default_factory=dict)
    """Python warnings the actor showed since its last commit, by kind."""

    def count_error(self, kind: str) -> None:
        """One more error row of `kind`."""
        self.outputs_error += 1
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    def count_notes(self, notes: list[str]) -> None:
        """One more row with each of these warnings."""
        for kind in notes:
            self.row_warnings[kind] = self.row_warnings.get(kind, 0) + 1


class Records:
    """Rows, metadata and markers of one worker's shards.

    `columns`: the manifest columns the same for every row of the worker; `steps`: network
    evaluations per round of an output started at a t0 (None: invalid t0); `conditional`: whether
    the model takes prompts."""

    def __init__(self, spec: JobSpec, columns: dict[str, Any],
                 steps: Callable[[float], int | None], conditional: bool,
                 fingerprint: str) -> None:
        self.spec, self.columns, self.steps = spec, columns, steps
        self.conditional, self.fingerprint = conditional, fingerprint

    def job_settings(self) -> RowSettings:
        """The job's own settings, for rows whose sample's settings were never read."""
        sd = self.spec.sdedit
        return RowSettings(sd.t0, sd.prompt if self.conditional else None,
                           sd.negative_prompt if self.conditional else None)

    def row(self, input_shard: str, sample: Sample, index: int, settings: RowSettings, *,
            batch_size: int | None, encoded: Encoded | None = None,
            output_shard: str | None = None, error: str | None = None,
            error_kind: str | None = None) -> dict[str, Any]:
        """The manifest row of output `index` of `sample`: ok when `encoded` is given (with
        `output_shard`), else an error row."""
        sd = self.spec.sdedit
        if encoded is not None:
            h, w = encoded.size
        else:
            h, w = sample.guide.shape[:2] if sample.guide is not None else (None, None)
        return manifest_row(
            key=sample.key, output_key=output_key(sample.key, index, sd.samples_per_input),
            sample_index=index, input_shard=input_shard, output_shard=output_shard,
            status="ok" if encoded is not None else "error", error=error,
            error_kind=error_kind, seed=output_seed(sd.seed, sample.key, index),
            t0=settings.t0, steps=self.steps(settings.t0), width=w, height=h,
            faithfulness_l2=None if encoded is None else encoded.metadata["faithfulness_l2"],
            seconds=None if encoded is None else encoded.done.seconds,
            batch_size=batch_size, created_at=now(), prompt=settings.prompt,
            negative_prompt=settings.negative_prompt, prompt_truncated=settings.prompt_truncated,
            negative_prompt_truncated=settings.negative_prompt_truncated, **self.columns)

    def metadata(self, task: Task, l2: float) -> dict[str, Any]:
        """The output's `{key}.json`: enough to make it again with `sdedit.edit`, and no timings
        (tar bytes are deterministic)."""
        data = {"key": task.sample.key, "output_key": task.output_key, "sample_index": task.index,
                "seed": task.seed, "t0": task.settings.t0, "steps": task.steps,
                **{k: self.columns[k] for k in ("sampler", "repeats", "eta", "model",
                                                "model_identity")},
                "input_shard": task.input_shard, "faithfulness_l2": round(l2, 6)}
        if self.conditional:
            data.update(prompt=task.settings.prompt, negative_prompt=task.settings.negative_prompt,
                        guidance_scale=self.columns["guidance_scale"])
            data.update({name: getattr(task.settings, name) for name in (
                "prompt_truncated", "negative_prompt_truncated")
                if getattr(task.settings, name) is not None})  # only when cut: tars unchanged
        return data

    def marker(self, stats: ShardStats, urls: ShardUrls) -> dict[str, Any]:
        """The done marker: the shard's counts, where its results are, and what made them."""
        return {"stem": stats.stem, "input_shard": stats.input_shard,
                "output_shard": absolute_url(urls.tar),
                "manifest": absolute_url(urls.manifest),
                "samples": stats.samples, "outputs_ok": stats.outputs_ok,
                "outputs_error": stats.outputs_error,
                "errors_by_kind": dict(sorted(stats.errors_by_kind.items())),
                "seconds": round(stats.seconds, 3),
                "row_warnings": dict(sorted(stats.row_warnings.items())),
                "actor_warnings": dict(sorted(stats.actor_warnings.items())),
                "timings": stats.timings, "in_flight_max": stats.in_flight_max,
                "worker": stats.worker, "fingerprint": self.fingerprint,
                "created_at": now().isoformat()}
