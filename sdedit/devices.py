"""Device and precision names, resolved in one place: "auto" | "cpu" | "cuda[:N]" and
"auto" | "fp32" | "bf16" | "fp16"."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "dtype_name", "resolve_device", "resolve_dtype"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}
"""Precision names -> the network's compute dtype (sampling stays float32)."""


def dtype_name(dtype: torch.dtype) -> str:
    """The precision name of a compute dtype, the inverse of DTYPES (ValueError for others)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not a compute dtype; allowed: {', '.join(DTYPES)}")


def resolve_device(name: str) -> torch.device:
    """"auto" = "cuda" if available, else "cpu"; others as torch reads them. ValueError for an
    unknown name or CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device={name!r} is unknown; allowed: auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: no CUDA device is available here; allowed: auto, cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" = float32 (the paper's) everywhere; fp16 on a CPU runs float32 with a warning
    (no fp16 convolutions there). ValueError for an unknown name."""
    if name == "auto":
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is unknown; allowed: auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "fp16":
        logger.warning("dtype fp16 on the CPU: running fp32 (no fp16 convolutions on CPUs)")
        return torch.float32
    return DTYPES[name]
