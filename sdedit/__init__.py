"""SDEdit: guided image synthesis and editing with stochastic differential equations.

The method of Meng et al., 2021 (arXiv 2108.01073) as plain functions over a denoiser:

    from sdedit import load_model, edit
    model = load_model("google/ddpm-ema-bedroom-256")
    out = edit(model, images, t0=0.5, seeds=[1, 2, 3])

Latent, text-conditioned models (a StableDiffusionPipeline directory or hub id) take prompts:

    model = load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", "cuda")
    out = edit(model, images, t0=0.5, seeds=[1, 2], prompts=["a bedroom", "a church"])

This package imports neither Ray, fsspec nor click at import time.
"""

from sdedit.edit import edit
from sdedit.errors import EditInputError
from sdedit.models import DiffusionModel, load_model

__all__ = ["DiffusionModel", "EditInputError", "edit", "load_model"]
__version__ = "0.1.0"
