"""An actor's model: the job's precision and offload, its memory plan checked against the device
before any weights are read (a job that cannot fit fails the actor's start rather than looping on
out-of-memory splits), then loaded."""

from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline.errors import ModelSettingsError
from pipeline.job.memory import (
    compute_problems,
    device_gib,
    job_plan,
    plan_problems,
    precision_of,
    weights_request,
)
from pipeline.job.spec import JobSpec
from pipeline.output.folder import OutputFolder
from pipeline.worker.hooks import Hooks
from sdedit import (
    DiffusionModel,
    apply_loras,
    inspect_model_dir,
    load_model,
    model_directory,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

__all__ = ["load_job_model"]


def load_job_model(spec: JobSpec, device: torch.device, hooks: Hooks) -> DiffusionModel:
    """The job's model on `device`.

    Raises:
        ModelSettingsError: the weights' precision or the memory plan refuses the job.
        ModelSourceError: the model cannot be read or loaded."""
    options = dict(spec.model.storage_options) or None
    record = _record(spec)
    layout = inspect_model_dir(model_directory(spec.model.source, options), spec.model.source)
    precision = precision_of(weights_request(spec, record), layout)
    problems = compute_problems(spec, precision)
    offload = "none" if spec.compute.offload == "auto" else spec.compute.offload
    gib = hooks.device_memory_gb if hooks.device_memory_gb is not None else device_gib(device)
    if gib is not None and not problems:
        planned = ((record or {}).get("precision") or {}).get("plan") or {}
        size = tuple(planned.get("size") or layout.sample_size)
        plan = job_plan(spec, layout, precision, (int(size[0]), int(size[1])), "planned")
        offload = plan.offload(spec, gib)
        problems += plan_problems(spec, plan, gib, f"this device's {gib:.1f} GB")
        logger.info("memory plan: about %.1f GB per actor with offload %s, on a %.1f GB device",
                    plan.plan.peak(offload) / 2**30, offload, gib)
    if problems:
        raise ModelSettingsError(f"model {spec.model.source} cannot run this job: "
                                 + "; ".join(problems))
    model = load_model(spec.model.source, device=device,
                       dtype=resolve_dtype(spec.compute.dtype, device), weights_dtype=precision,
                       offload=offload, storage_options=options)
    apply_loras(model, spec.model.lora, storage_options=options)
    if spec.compute.compile:
        model.accelerate(compile_regional=True)
    return model


def _record(spec: JobSpec) -> dict[str, Any] | None:
    """OUT/job.json, or None (none yet: a worker without a run, as tests make)."""
    try:
        return OutputFolder.of(spec).read_record()
    except Exception:
        return None
