"""The job settings a model decides, checked by one function wherever a job can be refused.

A sampler the model's noise process does not run, a t0 or step count its schedule cannot start
from, prompts, negative prompts or a guidance scale it does not take: `job_model_problems`
names each one. It runs on the model's layout read from its config files (no weights) by
`sdedit-batch validate` and by `run` before Ray starts (`pipeline.driver.preflight`), and on the
loaded
model by every actor before its first shard (`pipeline.worker.shard`), so all three give the same
verdict with the same words (`sdedit.checks.settings_problems`).
"""

from __future__ import annotations

from pipeline.job.spec import JobSpec
from sdedit import DiffusionModel, ModelLayout, NoiseProcess, TextSpec, settings_problems

__all__ = ["job_model_problems", "layout_problems", "loaded_model_problems"]


def job_model_problems(spec: JobSpec, process: NoiseProcess, text: TextSpec | None, *,
                       family: str, tokens: int) -> list[str]:
    """One line per job setting (`sdedit.*`) the model cannot run: "sdedit.sampler: ...".

    Args:
        process, text: the model's noise process and text spec.
        family: the model family's name, for messages.
        tokens: the network tokens of the model's sample size (resolution-dependent shifts).
    """
    sd = spec.sdedit
    problems = settings_problems(
        process, text, source=spec.model.source, family=family, tokens=tokens,
        sampler=sd.sampler, t0=sd.t0, steps=sd.steps, prompt=sd.prompt,
        negative_prompt=sd.negative_prompt, guidance_scale=sd.guidance_scale)
    return [f"sdedit.{name}: {message}" for name, message in problems]


def layout_problems(spec: JobSpec, layout: ModelLayout) -> list[str]:
    """`job_model_problems` from a layout read without weights."""
    f = layout.downsample_factor
    tokens = (layout.sample_size[0] // f) * (layout.sample_size[1] // f)
    return job_model_problems(spec, layout.process, layout.text, family=layout.family,
                              tokens=tokens)


def loaded_model_problems(spec: JobSpec, model: DiffusionModel) -> list[str]:
    """`job_model_problems` of a loaded model (what an actor checks before its first shard)."""
    _, h, w = model.state_shape(*model.sample_size)
    tokens = (h // model.patch) * (w // model.patch)
    return job_model_problems(spec, model.process, None if model.text is None else
                              model.text.spec, family=model.family, tokens=tokens)
