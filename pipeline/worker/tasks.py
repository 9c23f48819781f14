"""The sample -> tasks stage of the worker: one `Task` per output of each editable sample.

A sample that cannot be edited (decode, size, its per-row settings) becomes its error rows here,
so it never fails a batch; the model decides which image sizes and t0 it takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pipeline.input.reader import Sample
from pipeline.input.rows import RowSettings, SettingError, row_settings
from pipeline.job.spec import JobSpec
from pipeline.worker.attempt import Attempt
from pipeline.worker.batching import Task, output_key, output_seed
from sdedit import DiffusionModel, count_steps

__all__ = ["ErrorRow", "RowTasks"]

ErrorRow = Callable[[Attempt, Sample, int, int, "str | None", str], None]
"""Records one error row: (attempt, sample, position, output index, kind, message)."""


class RowTasks:
    """Turns a shard's samples into tasks for one loaded model and job."""

    def __init__(self, spec: JobSpec, model: DiffusionModel) -> None:
        self.spec, self.model = spec, model
        self.conditional = model.conditional
        self.negative_prompts = model.text is not None and model.text.spec.negative_prompts

    def tasks(self, samples: Iterator[Sample], a: Attempt, error_row: ErrorRow
              ) -> Iterator[Task]:
        """One task per output of each editable sample, in input order; a sample that cannot
        be edited is its error rows (`error_row`). A sample with an error but no kind is a bug
        of the reader: the row builder refuses it and the attempt fails."""
        sd = self.spec.sdedit
        while True:
            with a.timings.measure("wait_input"):
                sample = next(samples, None)
            if sample is None:
                return
            position = a.stats.samples
            a.stats.samples += 1
            settings: RowSettings | None = None
            if sample.error is None:
                sample.error = self.size_problem(sample)
                sample.error_kind = "size" if sample.error else None
            if sample.error is None:
                try:
                    settings = row_settings(
                        sample.key, sample.carried, t0=sd.t0, prompt=sd.prompt,
                        negative_prompt=sd.negative_prompt, conditional=self.conditional,
                        check_t0=self.t0_problem, negative_prompts=self.negative_prompts)
                except SettingError as exc:
                    sample.error, sample.error_kind = str(exc), "setting"
            if sample.error is not None or settings is None:
                for index in range(sd.samples_per_input):
                    error_row(a, sample, position, index, sample.error_kind, sample.error or "")
                a.gauge.add(-1)
                continue
            steps = self.steps(settings.t0)
            for index in range(sd.samples_per_input):
                yield Task(sample, a.stats.input_shard, index,
                           output_seed(sd.seed, sample.key, index),
                           output_key(sample.key, index, sd.samples_per_input), settings, steps,
                           position)

    def size_problem(self, sample: Sample) -> str | None:
        """Why the model cannot take the sample's image size, or None."""
        assert sample.guide is not None
        h, w = sample.guide.shape[:2]
        f = self.model.downsample_factor
        if h % f or w % f:
            return (f"image size {w}x{h} cannot be taken by model {self.spec.model.source}; "
                    f"allowed: width and height multiples of {f}")
        return None

    def steps(self, t0: float) -> int | None:
        """Network evaluations per round of an output started at t0 (None: t0 is invalid)."""
        return None if self.t0_problem(t0) else count_steps(
            self.model, self.spec.sdedit.sampler, t0, self.spec.sdedit.steps)

    def t0_problem(self, t0: float) -> str | None:
        """Why a row's t0 in (0, 1] cannot be used with this model, sampler and steps."""
        sd = self.spec.sdedit
        try:
            count_steps(self.model, sd.sampler, t0, sd.steps)
        except ValueError as exc:
            return str(exc)
        return None
