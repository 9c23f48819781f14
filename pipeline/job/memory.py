"""A job's weights precision and memory plan, resolved once: the same for validate, run and
actors.

For `auto` weights a resume keeps the precision OUT/job.json recorded; a plan that cannot fit is
refused, naming what would. See docs/performance.md, "the memory plan"."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.job.spec import JobSpec
from sdedit import (
    DTYPES,
    GIB,
    MemoryPlan,
    ModelLayout,
    Precision,
    compute_dtype_problem,
    family_named,
    plan_memory,
    resolve_precision,
)

__all__ = ["JobPlan", "compute_problems", "device_gib", "job_plan", "plan_problems",
           "precision_of", "precision_record", "weights_request"]

LEGACY = "fp32"
"""What `auto` means for a job.json that records no precision."""


def weights_request(spec: JobSpec, record: Mapping[str, Any] | None) -> str | Precision:
    """What to load: `model.weights_dtype` when it names a precision; for `auto`, the parts
    `record` (OUT/job.json) holds, fp32 for a record without them, or "auto" (the family's) when
    `record` is None."""
    name = spec.model.weights_dtype
    if name != "auto" or record is None:
        return name
    recorded = record.get("precision")
    if not isinstance(recorded, Mapping):
        return LEGACY
    parts = recorded.get("parts")
    if isinstance(parts, Mapping) and parts:
        return Precision.from_parts(parts, "auto")
    return str(recorded.get("request") or "auto")


def precision_of(request: str | Precision, layout: ModelLayout) -> Precision:
    """The resolved precision of a request for the model `layout` describes."""
    if isinstance(request, Precision):
        return request
    return resolve_precision(request, family=family_named(layout.family),
                             process=layout.process, vae_config=layout.configs.get("vae"))


def precision_record(spec: JobSpec, request: str | Precision, precision: Precision | None,
                     layout: ModelLayout | None, plan: JobPlan | None = None) -> dict[str, Any]:
    """job.json's "precision": the job's setting, the request it means here, what it resolved to
    and each part's precision (None when the driver cannot read the configs), and the memory
    plan."""
    name = request.requested if isinstance(request, Precision) else request
    if precision is None or layout is None:
        return {"weights_dtype": spec.model.weights_dtype, "request": name, "resolved": None,
                "parts": None}
    record: dict[str, Any] = {"weights_dtype": spec.model.weights_dtype, "request": name,
                              "resolved": precision.net,
                              "parts": precision.parts(layout.part_names())}
    if plan is not None:
        offload = plan.offload(spec, spec.compute.gpu_memory_gb)
        record["plan"] = {"size": list(plan.plan.size), "offload": offload,
                          "memory_gb": round(plan.plan.peak(offload) / GIB, 2)}
    return record


@dataclass
class JobPlan:
    """A job's memory plan and what it was made for."""

    plan: MemoryPlan
    precision: Precision
    size_source: str
    layout: ModelLayout

    def again(self, spec: JobSpec, weights: str | None = None,
              batch_size: int | None = None) -> JobPlan:
        """The plan with other weights or another batch size (what would fit)."""
        if batch_size is not None:
            compute = dataclasses.replace(spec.compute, batch_size=batch_size)
            spec = dataclasses.replace(spec, compute=compute)
        precision = self.precision if weights is None else precision_of(weights, self.layout)
        return job_plan(spec, self.layout, precision, self.plan.size, self.size_source)

    def offload(self, spec: JobSpec, gib: float | None) -> str:
        """compute.offload resolved: the job's, or for auto the one that fits `gib` (none when
        nothing fits or no size is known)."""
        if spec.compute.offload != "auto":
            return spec.compute.offload
        if gib is None:
            return "none"
        return self.plan.offload_for(gib) or "none"

    def lines(self, spec: JobSpec) -> list[str]:
        offload = self.offload(spec, spec.compute.gpu_memory_gb)
        return [*self.plan.lines(offload), f"  guide size: {self.size_source}"]


def job_plan(spec: JobSpec, layout: ModelLayout, precision: Precision,
             size: tuple[int, int], size_source: str) -> JobPlan:
    """The memory plan of `spec` on `layout` at `precision` for guides of `size`."""
    text = layout.text
    scale = spec.sdedit.guidance_scale
    if text is not None and scale is None:  # the family's default (Z-Image-Turbo's is 1: no CFG)
        scale = text.default_guidance
    guided = text is not None and text.guidance == "cfg" and scale != 1.0
    autocast = None
    if not precision.low and spec.compute.dtype in ("bf16", "fp16"):
        autocast = DTYPES[spec.compute.dtype]
    plan = plan_memory(layout, precision, batch_size=spec.compute.batch_size, size=size,
                       guided=guided, autocast=autocast)
    return JobPlan(plan, precision, size_source, layout)


def plan_problems(spec: JobSpec, job: JobPlan, gib: float | None, what: str) -> list[str]:
    """The plan against `gib` GB (`what` names it): one line naming the estimate and each
    alternative that would fit (offload, fp8 weights, the largest batch size), or none."""
    if gib is None:
        return []
    chosen = job.offload(spec, gib)
    if job.plan.peak(chosen) <= gib * GIB:
        return []
    fixes = []
    if spec.compute.offload != "text" and job.plan.peak("text") <= gib * GIB:
        fixes.append(f"compute.offload text (about {job.plan.peak('text') / GIB:.1f} GB)")
    if job.precision.net != "fp8":
        fp8 = job.again(spec, weights="fp8")
        offload = fp8.plan.offload_for(gib)
        if offload is not None:
            fixes.append(f"model.weights_dtype fp8 (about {fp8.plan.peak(offload) / GIB:.1f} "
                         f"GB with offload {offload})")
    batch = spec.compute.batch_size // 2
    while batch >= 1:
        smaller = job.again(spec, batch_size=batch)
        offload = smaller.plan.offload_for(gib)
        if offload is not None:
            fixes.append(f"compute.batch_size {batch} (about "
                         f"{smaller.plan.peak(offload) / GIB:.1f} GB with offload {offload})")
            break
        batch //= 2
    fixes.append("a GPU with more memory")
    weights = sum(b for _, b in job.plan.weights.values()) / GIB
    return [f"compute.gpu_memory_gb: memory per actor about "
            f"{job.plan.peak(chosen) / GIB:.1f} GB (offload {chosen}; weights {weights:.1f} GB "
            f"at {job.precision.label()}) exceeds {what}; would fit: " + ", or ".join(fixes)]


def compute_problems(spec: JobSpec, precision: Precision) -> list[str]:
    """compute.dtype and model.lora beside these weights (`sdedit.compute_dtype_problem`)."""
    problems = []
    problem = compute_dtype_problem(precision, spec.compute.dtype)
    if problem:
        problems.append(f"compute.dtype: {problem}")
    if precision.net == "fp8" and spec.model.lora:
        problems.append("model.lora: fp8 weights take no LoRA (a LoRA fused into float8 "
                        "weights is mostly lost to rounding); allowed: model.weights_dtype "
                        "fp32, bf16 or fp16 with LoRAs")
    return problems


def device_gib(device: torch.device) -> float | None:
    """The memory a CUDA device reports, in GB (2^30 bytes); None for other devices."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB
