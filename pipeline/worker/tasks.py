"""The worker's sample -> tasks stage: what each decoded sample is to be made with.

The checks that need the loaded model happen here, so a sample that cannot be edited is its error
rows and never fails a batch; prompt cuts are settled on the device's turn, where the text
encoders run."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from pipeline.input.reader import Sample
from pipeline.input.rows import RowSettings, SettingError, row_settings
from pipeline.job.spec import JobSpec
from pipeline.worker.attempt import Attempt
from pipeline.worker.batching import Task, output_key, output_seed
from pipeline.worker.notices import cut_notes, describe_cuts
from sdedit import DiffusionModel, PromptCut, count_steps, prompt_cuts

__all__ = ["TaskStage"]

KNOWN_TEXTS = 4096
"""Distinct prompts whose cuts a worker remembers (a job's prompts repeat across rows)."""


class TaskStage:
    """Samples -> tasks for one worker (its job and loaded model)."""

    def __init__(self, spec: JobSpec, model: DiffusionModel) -> None:
        self.spec, self.model = spec, model
        self.conditional = model.conditional
        self.negative_prompts = model.text is not None and model.text.spec.negative_prompts
        self.known: dict[str, tuple[PromptCut, ...]] = {}

    def tasks(self, samples: Iterator[Sample], a: Attempt) -> Iterator[Task]:
        """One task per output of each editable sample, in input order; a sample that cannot be
        edited is its error rows here (one with an error but no kind is a bug, and fails the
        attempt)."""
        sd = self.spec.sdedit
        while True:
            with a.timings.measure("wait_input"):
                sample = next(samples, None)
            if sample is None:
                return
            position = a.stats.samples
            a.stats.samples += 1
            settings: RowSettings | None = None
            notes: list[str] = []
            if sample.error is None:
                sample.error = self.size_problem(sample)
                sample.error_kind = "size" if sample.error else None
            if sample.error is None:
                try:
                    settings = row_settings(
                        sample.key, sample.carried, t0=sd.t0, prompt=sd.prompt,
                        negative_prompt=sd.negative_prompt, conditional=self.conditional,
                        check_t0=self.t0_problem, negative_prompts=self.negative_prompts,
                        notes=notes)
                except SettingError as exc:
                    sample.error, sample.error_kind = str(exc), "setting"
            if sample.error is not None or settings is None:
                for index in range(sd.samples_per_input):
                    a.error_row(sample, position, index, sample.error_kind, sample.error or "")
                a.gauge.add(-1)
                continue
            steps = self.steps(settings.t0)
            for index in range(sd.samples_per_input):
                yield Task(sample, a.stats.input_shard, index,
                           output_seed(sd.seed, sample.key, index),
                           output_key(sample.key, index, sd.samples_per_input), settings, steps,
                           position, list(notes))

    def settle(self, tasks: Sequence[Task]) -> None:
        """Record in each task what the text encoders take of its prompts (`prompt_truncated` and
        a row warning per cut). Call it on the device's turn, once per task."""
        if self.model.text is None:
            return
        wanted = list(dict.fromkeys(text for task in tasks for text in (
            task.settings.prompt, task.settings.negative_prompt) if text))
        missing = [text for text in wanted if text not in self.known]
        if missing:
            if len(self.known) + len(missing) > KNOWN_TEXTS:
                self.known.clear()
                missing = wanted
            self.known.update(zip(missing, prompt_cuts(self.model, missing), strict=True))
        for task in tasks:
            cut = self.known.get(task.settings.prompt or "", ())
            negative_cut = self.known.get(task.settings.negative_prompt or "", ())
            if cut or negative_cut:
                task.settings = replace(task.settings, prompt_truncated=describe_cuts(cut),
                                        negative_prompt_truncated=describe_cuts(negative_cut))
                task.notes += cut_notes("prompt", cut) + cut_notes("negative prompt",
                                                                  negative_cut)

    def size_problem(self, sample: Sample) -> str | None:
        """Why the guide's size cannot be taken by the model, or None."""
        assert sample.guide is not None
        h, w = sample.guide.shape[:2]
        f = self.model.downsample_factor
        if h % f or w % f:
            return (f"image size {w}x{h} cannot be taken by model {self.spec.model.source}; "
                    f"allowed: width and height multiples of {f}")
        return None

    def steps(self, t0: float) -> int | None:
        """Network evaluations per round of an output started at t0 (None: t0 is invalid); the
        sampler's default at this t0 when `sdedit.steps` is unset."""
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
