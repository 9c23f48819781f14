"""Which tensors of a LoRA file diffusers' key conversion drops (it only logs them).

Every tensor is traced through the conversion: each is replaced by a probe filled with its own
number, so the numbers found in the output are the tensors kept, whatever was renamed, split or
joined (docs/open-models.md#lora-for-the-flow-families).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["dropped_keys", "raw_state"]

_STEM = re.compile(r"\.(?:lora[._]|alpha$)")
_DOWN = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")


def raw_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a LoRA file as stored (safetensors, or a weights-only torch file)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _stem(key: str) -> str:
    """The layer a key belongs to: "x.lora_down.weight", "x.lora_A.weight", "x.alpha" -> "x"."""
    return _STEM.split(key, maxsplit=1)[0]


def dropped_keys(raw: Mapping[str, torch.Tensor],
                 convert: Callable[[dict[str, torch.Tensor]], Mapping[str, Any]]) -> list[str]:
    """The keys of `raw` that `convert` (state dict -> converted state dict) drops, in file
    order: non-zero LoRA tensors absent from its output, and their layers' alphas."""
    probe: dict[str, torch.Tensor] = {}
    number: dict[str, int] = {}
    for i, (key, value) in enumerate(raw.items(), start=1):
        if key.endswith(".alpha") or not value.is_floating_point() or value.numel() == 0:
            probe[key] = value
            continue
        number[key] = i
        probe[key] = torch.full(tuple(value.shape), float(i))
    for key, value in raw.items():
        if key.endswith(".alpha"):
            down = next((raw[_stem(key) + s] for s in _DOWN if _stem(key) + s in raw), None)
            if down is not None and down.ndim >= 1:
                probe[key] = torch.tensor(float(down.shape[0]), dtype=value.dtype)
    seen: set[float] = set()
    for value in convert(probe).values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            low, high = value.min(), value.max()
            values = low.view(1) if bool(low == high) else torch.unique(value)
            seen.update(float(v) for v in values.tolist())
    kept = {_stem(key) for key, i in number.items() if float(i) in seen}
    dropped = [key for key, i in number.items()
               if float(i) not in seen and bool(raw[key].any())]
    lost = {_stem(key) for key in dropped}
    return [key for key in raw
            if key in dropped or (key.endswith(".alpha") and _stem(key) in lost - kept)]
