"""Weights precision: the dtype each part of a model is stored and computed in, resolved once.

`model.weights_dtype` is one of auto | fp32 | bf16 | fp16 | fp8:

    auto   the family's published precision (`Family.weights_precision`; a family that
           declares none: bf16 for flow-matching models, fp32 otherwise): bf16 for Flux and
           SD3, fp16 for SD 1.x/2.x and SDXL, fp32 for pixel models. The same on every device.
    fp32   every part float32 (the network may still run under autocast: `compute.dtype`).
    bf16, fp16
           every part stored and run in that dtype (no float32 copy, no autocast); a VAE whose
           config says `force_upcast` (diffusers' default for AutoencoderKL) stays float32 with
           fp16 weights, as diffusers' pipelines upcast it.
    fp8    the network's linear layers stored as float8 e4m3, the rest of it, the VAE and the
           text encoders bf16. On a CUDA device with FP8 tensor cores (compute capability 8.9+:
           L4, L40S, H100, H200) and torchao installed, the linear layers run W8A8 (torchao's
           float8 dynamic activation + weight quantization, per-row scales); elsewhere each layer
           is cast up to bf16 when it runs (diffusers' layerwise casting), so memory still halves.

Sampler arithmetic stays float32 in every case: the network's input is cast to its compute
dtype and its output back to float32 (`sdedit.accel.NetRunner`), the VAE's likewise
(`sdedit.latent.LatentCodec`). `apply_precision` is the one place a loaded model's parts get
their dtypes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from sdedit.processes import FlowProcess

logger = logging.getLogger(__name__)

__all__ = [
    "COMPUTE_DTYPES",
    "WEIGHTS_DTYPES",
    "Precision",
    "apply_precision",
    "cast_module",
    "compute_dtype_problem",
    "layerwise_fp8",
    "loading",
    "published_precision",
    "resolve_precision",
    "role_dtype",
    "weight_bytes",
]

WEIGHTS_DTYPES = ("auto", "fp32", "bf16", "fp16", "fp8")
"""The names `model.weights_dtype` takes."""
STORAGE: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                   "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                          "fp16": torch.float16, "fp8": torch.bfloat16}
"""Weights precision -> the dtype its network computes in (fp8 computes in bf16)."""
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
"""Kept at the compute dtype under fp8: only linear layers are stored as float8."""


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a model's parts.

    Attributes:
        net: the network's weights: "fp32", "bf16", "fp16" or "fp8".
        vae: the VAE's ("fp32", "bf16" or "fp16"; unused by pixel models).
        text: the text encoders' (likewise).
        requested: what was asked ("auto", "fp32", ...), for messages.
    """

    net: str = "fp32"
    vae: str = "fp32"
    text: str = "fp32"
    requested: str = "fp32"

    @property
    def compute(self) -> torch.dtype:
        """The dtype the network computes in (bf16 for fp8 weights)."""
        return COMPUTE_DTYPES[self.net]

    @property
    def low(self) -> bool:
        """True when the network's weights are not float32 (it then runs without autocast)."""
        return self.net != "fp32"

    def parts(self, names: Iterable[str]) -> dict[str, str]:
        """Component folder name -> precision, for the record (job.json, model_identity):
        the network ("unet", "transformer"), "vae" and the text encoders ("text_encoder*")."""
        out = {}
        for name in names:
            if name == "vae":
                out[name] = self.vae
            elif name.startswith("text_encoder"):
                out[name] = self.text
            elif name in ("unet", "transformer", "net"):
                out[name] = self.net
        return out

    def label(self) -> str:
        """"fp8 (vae bf16, text encoders bf16)", or "fp32"."""
        if self.net == self.vae == self.text:
            return self.net
        return f"{self.net} (vae {self.vae}, text encoders {self.text})"

    @classmethod
    def from_parts(cls, parts: Mapping[str, str], requested: str) -> Precision:
        """The inverse of `parts` (a record written by `parts`)."""
        net = next((v for k, v in parts.items() if k in ("unet", "transformer", "net")), "fp32")
        text = next((v for k, v in parts.items() if k.startswith("text_encoder")), net)
        return cls(net, parts.get("vae", net), text, requested)


_LOADING: ContextVar[Precision | None] = ContextVar("sdedit_loading_precision", default=None)


@contextlib.contextmanager
def loading(precision: Precision) -> Iterator[None]:
    """While a family loads its parts (`sdedit.models.load_model`), `role_dtype` answers with
    this precision, so `families.base.component` reads each part straight into its dtype (no
    float32 copy of bf16 files on the host)."""
    token = _LOADING.set(precision)
    try:
        yield
    finally:
        _LOADING.reset(token)


def role_dtype(name: str) -> torch.dtype:
    """The dtype a component folder `name` is loaded in: float32 outside `loading`; inside it,
    the text encoders' ("text_encoder*"), the VAE's ("vae") or the network's (any other
    folder; fp8 networks load as bf16 and get their float8 storage in `apply_precision`)."""
    precision = _LOADING.get()
    if precision is None:
        return torch.float32
    part = precision.parts([name]).get(name, precision.net if not name.startswith(
        "tokenizer") else "fp32")
    return COMPUTE_DTYPES[part]


def published_precision(family: Any, process: Any) -> str:
    """A family's published precision: its `weights_precision` (`Family` declares it), or,
    where that is None, bf16 for flow-matching models and fp32 for the others."""
    declared = family.weights_precision
    if declared:
        return str(declared)
    return "bf16" if isinstance(process, FlowProcess) else "fp32"


def resolve_precision(name: str, *, family: Any, process: Any,
                      vae_config: Mapping[str, Any] | None) -> Precision:
    """The precision of each part for `model.weights_dtype` `name` (see the module docstring).

    Args:
        family: the model's family object (`sdedit.families`).
        process: its noise process.
        vae_config: its VAE's config (`force_upcast`), or None for pixel models.
    Raises:
        ValueError: an unknown name.
    """
    if name not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype={name!r} is unknown; allowed: "
                         f"{', '.join(WEIGHTS_DTYPES)}")
    resolved = published_precision(family, process) if name == "auto" else name
    half = "bf16" if resolved == "fp8" else resolved
    vae = half
    if half == "fp16" and vae_config is not None and vae_config.get("force_upcast", True):
        vae = "fp32"  # diffusers' pipelines upcast such a VAE: it overflows in fp16
    return Precision(net=resolved, vae=vae, text=half, requested=name)


def compute_dtype_problem(precision: Precision, dtype: str) -> str | None:
    """Why `compute.dtype` `dtype` ("auto", "fp32", "bf16", "fp16") cannot go with these
    weights, or None. With fp32 weights compute.dtype is the network's autocast dtype (any
    value); with low-precision weights the network computes in their dtype (bf16 for fp8), so
    only "auto" or that dtype make sense."""
    if not precision.low or dtype == "auto":
        return None
    own = "bf16" if precision.net == "fp8" else precision.net
    if dtype == own:
        return None
    return (f"compute.dtype {dtype} with {precision.net} weights (model.weights_dtype "
            f"{precision.requested}): a network with {precision.net} weights computes in "
            f"{own}; allowed: auto or {own}, or model.weights_dtype fp32 to run fp32 weights "
            f"under {dtype} autocast")


def cast_module(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """Cast `module` to precision `name` ("fp32", "bf16", "fp16") in place, keeping the
    submodules its class lists in `_keep_in_fp32_modules` float32 for fp16 (T5's "wo", as
    transformers' from_pretrained does)."""
    dtype = STORAGE[name]
    torch.nn.Module.to(module, dtype=dtype)  # not diffusers' override: it only warns
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype == torch.float16 and keep:
        for sub_name, sub in module.named_modules():
            if any(part in sub_name.split(".") for part in keep):
                torch.nn.Module.to(sub, dtype=torch.float32)
    return module


def apply_precision(net: torch.nn.Module, vae: torch.nn.Module | None,
                    encoders: Iterable[torch.nn.Module], precision: Precision,
                    device: torch.device) -> str:
    """Give a loaded model's parts their precision, in place, before they move to `device`
    (so no float32 copy ever reaches it). Returns how the network runs, for the log and the
    record: "fp32", "bf16", "fp16", "fp8 W8A8 (torchao ...)" or "fp8 storage, bf16 compute
    (layerwise casting)".

    Raises:
        ValueError: fp8 on a device that cannot store float8 tensors.
    """
    if vae is not None:
        cast_module(vae, precision.vae)
    for encoder in encoders:
        cast_module(encoder, precision.text)
    if precision.net != "fp8":
        cast_module(net, precision.net)
        return precision.net
    cast_module(net, "bf16")
    reason = w8a8_unavailable(device)
    if reason is None:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        net.to(device)
        quantize_(net, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                   filter_fn=lambda m, _: isinstance(m, torch.nn.Linear))
        path = "fp8 W8A8 (torchao float8 dynamic activation + weight, per-row scales)"
    else:
        layerwise_fp8(net)
        path = f"fp8 storage, bf16 compute (layerwise casting: {reason})"
    logger.info("network weights: %s", path)
    return path


def w8a8_unavailable(device: torch.device) -> str | None:
    """Why the W8A8 fast path cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return f"no FP8 matrix units on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (compute capability "
                f"{capability[0]}.{capability[1]}) has no FP8 tensor cores; 8.9+ has")
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao for W8A8)"
    return None


def layerwise_fp8(net: torch.nn.Module) -> None:
    """float8 e4m3 storage of the linear layers, each cast to bf16 while it runs."""
    from diffusers import ModelMixin
    from diffusers.hooks import apply_layerwise_casting

    if isinstance(net, ModelMixin):  # its own skip patterns (norms, embeddings) respected
        net.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                     compute_dtype=torch.bfloat16,
                                     skip_modules_classes=CONVOLUTIONS)
    else:
        apply_layerwise_casting(net, torch.float8_e4m3fn, torch.bfloat16,
                                skip_modules_classes=CONVOLUTIONS)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers as stored (after `apply_precision`; a meta or
    fake module is enough: only shapes and dtypes are read)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
