"""Weights precision: the dtype each part of a model is stored and computed in, resolved once.

`apply_precision` is the one place a loaded model's parts get their dtypes; sampler arithmetic
stays float32 whatever they are (inputs cast in, outputs cast back). What auto, fp32, bf16, fp16
and fp8 mean per part: docs/models.md#weights-precision.
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
    """The resolved precision of a model's parts: `net` "fp32", "bf16", "fp16" or "fp8"; `vae`
    and `text` the same but fp8; `requested` what was asked ("auto", ...), for messages."""

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
        """Component folder name -> precision, for the record (job.json, model_identity)."""
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
        """The inverse of `parts`."""
        net = next((v for k, v in parts.items() if k in ("unet", "transformer", "net")), "fp32")
        text = next((v for k, v in parts.items() if k.startswith("text_encoder")), net)
        return cls(net, parts.get("vae", net), text, requested)


_LOADING: ContextVar[Precision | None] = ContextVar("sdedit_loading_precision", default=None)


@contextlib.contextmanager
def loading(precision: Precision) -> Iterator[None]:
    """While a family loads its parts, `role_dtype` answers with this precision, so each part
    is read straight into its dtype (no float32 copy on the host)."""
    token = _LOADING.set(precision)
    try:
        yield
    finally:
        _LOADING.reset(token)


def role_dtype(name: str) -> torch.dtype:
    """The dtype component folder `name` is loaded in: float32 outside `loading`, else its
    part's compute dtype (fp8 networks load as bf16; `apply_precision` makes them float8)."""
    precision = _LOADING.get()
    if precision is None:
        return torch.float32
    part = precision.parts([name]).get(name, precision.net if not name.startswith(
        "tokenizer") else "fp32")
    return COMPUTE_DTYPES[part]


def published_precision(family: Any, process: Any) -> str:
    """A family's `weights_precision`, or if None bf16 for flow-matching models, else fp32."""
    declared = family.weights_precision
    if declared:
        return str(declared)
    return "bf16" if isinstance(process, FlowProcess) else "fp32"


def resolve_precision(name: str, *, family: Any, process: Any,
                      vae_config: Mapping[str, Any] | None) -> Precision:
    """The precision of each part for `weights_dtype` `name` (ValueError for an unknown one);
    `vae_config` None for pixel models."""
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
    """Why `compute.dtype` `dtype` cannot go with these weights, or None: low-precision weights
    compute in their own dtype, so only "auto" or that dtype fit them."""
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
    """Cast `module` to "fp32", "bf16" or "fp16" in place; for fp16 its class's
    `_keep_in_fp32_modules` stay float32, as transformers does."""
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
    """Give a loaded model's parts their precision in place, before they move to `device` (so
    no float32 copy reaches it); returns how the network runs ("fp32", ..., "fp8 W8A8 (...)")."""
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
    """Bytes of `module`'s parameters and buffers as stored (a meta or fake module will do)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
