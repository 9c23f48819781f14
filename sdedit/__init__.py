"""SDEdit: guided image synthesis and editing with stochastic differential equations.

The method of Meng et al., 2021 (arXiv 2108.01073) as plain functions over a denoiser:

    from sdedit import load_model, edit
    model = load_model("google/ddpm-ema-bedroom-256")
    out = edit(model, images, t0=0.5, seeds=[1, 2, 3])

Latent, text-conditioned models (a StableDiffusionPipeline directory or hub id) take prompts:

    model = load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", "cuda")
    out = edit(model, images, t0=0.5, seeds=[1, 2], prompts=["a bedroom", "a church"])

This is the engine's public face: `pipeline` imports the engine through it alone
(docs/architecture.md).
"""

from sdedit.accel import Acceleration, PrefetchNoise, default_noise_threads
from sdedit.checks import MAX_GUIDANCE, settings_problems
from sdedit.conditioning import Conditioning, PromptCut, PromptEncoder, TextSpec
from sdedit.devices import DTYPES, dtype_name, resolve_device, resolve_dtype
from sdedit.edit import (
    SAMPLERS,
    NoiseSource,
    SeedNoise,
    count_steps,
    edit,
    guidance_scale,
    noise_for,
    prompt_cuts,
    warm_up,
)
from sdedit.errors import QUOTE_CHARS, EditInputError, quoted
from sdedit.families import ModelLayout, family_named, inspect_model_dir
from sdedit.families.flux import flux_call, image_ids
from sdedit.families.sdxl import sdxl_call
from sdedit.latent import codec_from_vae
from sdedit.lora import Lora, apply_loras, lora_fit, lora_kind
from sdedit.memplan import GIB, GPU_CLASSES, RUNTIME_BYTES, MemoryPlan, plan_memory
from sdedit.models import DiffusionModel, load_model
from sdedit.precision import (
    WEIGHTS_DTYPES,
    Precision,
    apply_precision,
    compute_dtype_problem,
    resolve_precision,
)
from sdedit.processes import DynamicShift, FlowProcess, NoiseProcess, VPProcess
from sdedit.prompts import MAX_CACHE_BYTES, OFFLOADS
from sdedit.schedules import VPSchedule
from sdedit.sources import (
    ModelSourceError,
    Resolved,
    cached_snapshot,
    files_identity,
    hub_download_hint,
    hub_repo_files,
    local_path,
    model_directory,
    resolve,
    source_kind,
    transformers_allow_patterns,
)

__all__ = [
    "DTYPES", "GIB", "GPU_CLASSES", "MAX_CACHE_BYTES", "MAX_GUIDANCE", "OFFLOADS",
    "OFFLOAD_SETTINGS", "QUOTE_CHARS", "RUNTIME_BYTES", "SAMPLERS", "WEIGHTS_DTYPES",
    "Acceleration", "Conditioning", "DiffusionModel", "DynamicShift", "EditInputError",
    "FlowProcess", "Lora", "MemoryPlan", "ModelLayout", "ModelSourceError", "NoiseProcess",
    "NoiseSource", "Precision", "PrefetchNoise", "PromptCut", "PromptEncoder", "Resolved",
    "SeedNoise", "TextSpec", "VPProcess", "VPSchedule", "apply_loras", "apply_precision",
    "cached_snapshot", "codec_from_vae", "compute_dtype_problem", "count_steps",
    "default_noise_threads", "dtype_name", "edit", "family_named", "files_identity", "flux_call",
    "guidance_scale", "hub_download_hint", "hub_repo_files", "image_ids", "inspect_model_dir",
    "load_model", "local_path", "lora_fit", "lora_kind", "model_directory", "noise_for",
    "plan_memory", "prompt_cuts", "quoted", "resolve", "resolve_device", "resolve_dtype",
    "resolve_precision", "sdxl_call", "settings_problems", "source_kind",
    "transformers_allow_patterns", "warm_up",
]
OFFLOAD_SETTINGS = ("auto", *OFFLOADS)
"""`compute.offload`: auto (from the memory plan) or one of OFFLOADS."""
__version__ = "0.2.0"
