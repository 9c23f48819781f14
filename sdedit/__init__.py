"""SDEdit: guided image synthesis and editing with stochastic differential equations.

The method of Meng et al., 2021 (arXiv 2108.01073) as plain functions over a denoiser:

    from sdedit import load_model, edit
    model = load_model("google/ddpm-ema-bedroom-256")
    out = edit(model, images, t0=0.5, seeds=[1, 2, 3])

Latent, text-conditioned models (a StableDiffusionPipeline directory or hub id) take prompts:

    model = load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", "cuda")
    out = edit(model, images, t0=0.5, seeds=[1, 2], prompts=["a bedroom", "a church"])

This module is the engine's public face: `pipeline` imports the engine through it alone (a test
holds that). The package imports neither Ray nor click, and fsspec only to copy a URL source.
"""

from sdedit.accel import Acceleration, PrefetchNoise, default_noise_threads
from sdedit.checks import MAX_GUIDANCE, settings_problems
from sdedit.conditioning import PromptCut, TextSpec
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
from sdedit.families import ModelLayout, inspect_model_dir
from sdedit.lora import Lora, apply_loras, lora_fit, lora_kind
from sdedit.models import DiffusionModel, load_model
from sdedit.processes import NoiseProcess, VPProcess
from sdedit.schedules import VPSchedule
from sdedit.sources import (
    ModelSourceError,
    Resolved,
    cached_snapshot,
    files_identity,
    hub_download_hint,
    hub_repo_files,
    local_path,
    resolve,
    source_kind,
    transformers_allow_patterns,
)

__all__ = [
    "DTYPES", "MAX_GUIDANCE", "QUOTE_CHARS", "SAMPLERS", "Acceleration", "DiffusionModel",
    "EditInputError", "Lora", "ModelLayout", "ModelSourceError", "NoiseProcess", "NoiseSource",
    "PrefetchNoise", "PromptCut", "Resolved", "SeedNoise", "TextSpec", "VPProcess", "VPSchedule",
    "apply_loras", "cached_snapshot", "count_steps", "default_noise_threads", "dtype_name",
    "edit", "files_identity", "guidance_scale", "hub_download_hint", "hub_repo_files",
    "inspect_model_dir", "load_model", "local_path", "lora_fit", "lora_kind", "noise_for",
    "prompt_cuts", "quoted", "resolve", "resolve_device", "resolve_dtype", "settings_problems",
    "source_kind", "transformers_allow_patterns", "warm_up",
]
__version__ = "0.1.0"
