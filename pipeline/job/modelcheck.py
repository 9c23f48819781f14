"""The job settings a model decides, checked by one function wherever a job can be refused.

`job_model_problems` names each sampler, t0, step count, prompt or guidance scale the model
cannot take. `validate` and `run` (before Ray) call it on the layout read from config files, each
actor on its loaded model, so all three give the same verdict in the same words."""

from __future__ import annotations

from pipeline.job.spec import JobSpec
from sdedit import DiffusionModel, ModelLayout, NoiseProcess, TextSpec, settings_problems

__all__ = ["job_model_problems", "layout_problems", "loaded_model_problems"]


def job_model_problems(spec: JobSpec, process: NoiseProcess, text: TextSpec | None, *,
                       family: str, tokens: int) -> list[str]:
    """One line per `sdedit.*` setting the model cannot run; `tokens` is the network tokens of
    the model's sample size (for resolution-dependent shifts), `family` names it in messages."""
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
