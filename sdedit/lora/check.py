"""Checking a LoRA against a model, loaded or built from its configs on the meta device: every
key the loader's conversion drops or that does not fit (layer, shapes, ranks) is named."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdedit.families import FAMILIES, Family, ModelLayout, family_named
from sdedit.lora.coverage import dropped_keys, raw_state
from sdedit.lora.files import lora_file
from sdedit.sources import ModelSourceError

logger = logging.getLogger(__name__)

__all__ = ["SHOWN", "Lora", "LoraTargets", "checked_lora", "lora_fit", "lora_mismatches",
           "lora_targets", "part_keys", "read_lora", "refusal", "unapplied"]
_KEY = re.compile(r"^(?P<layer>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                  r"lora_magnitude_vector)(?:\.(?P<param>weight|bias))?$")
SHOWN = 8
"""Mismatched keys listed in a refusal (then "and N more")."""


@dataclass(frozen=True)
class Lora:
    """One LoRA to apply: `source` a local file or folder, hub id (org/name or
    org/name/file.safetensors) or fsspec URL; `scale` its weight (1.0 = as trained)."""

    source: str
    scale: float = 1.0


@dataclass(frozen=True)
class LoraTargets:
    """The parts of a model a LoRA may adapt: the family's diffusers loader mixin, and key
    prefix -> module ("unet" -> the UNet)."""

    loader: str
    modules: Mapping[str, torch.nn.Module]


def lora_targets(family: Family, layout: ModelLayout | None,
                 net: torch.nn.Module | None = None, text: Any = None) -> LoraTargets:
    """What a LoRA may adapt in a model of `family` (loaded, or built from `layout` on the meta
    device); ModelSourceError when it takes no LoRA."""
    if family.lora_loader is None:
        takes = ", ".join(f.name for f in FAMILIES if f.lora_loader is not None)
        raise ModelSourceError(f"a {family.name} model takes no LoRA; allowed: a model of the "
                               f"{takes} families")
    return LoraTargets(family.lora_loader, family.lora_modules(layout, net, text))


def _loader(targets: LoraTargets) -> tuple[Any, dict[str, Any]]:
    """The family's diffusers loader class and the options its `lora_state_dict` needs."""
    import inspect

    import diffusers.loaders

    loader = getattr(diffusers.loaders, targets.loader)
    unet = targets.modules.get("unet")
    options: dict[str, Any] = {"unet_config": unet.config} if unet is not None else {}
    if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:
        options["return_alphas"] = True                     # Flux's loader (Chroma's too)
    return loader, options


def read_lora(path: Path, targets: LoraTargets, source: str
              ) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """(state dict, network alphas, adapter metadata) of a LoRA file in diffusers' key format,
    as the family's loader reads it."""
    loader, options = _loader(targets)
    try:
        out = loader.lora_state_dict(str(path.parent), weight_name=path.name,
                                     return_lora_metadata=True, **options)
    except Exception as exc:
        raise ModelSourceError(f"LoRA {source!r}: cannot read {path.name}: "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    state, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    return state, alphas or None, metadata


def unapplied(path: Path, targets: LoraTargets, source: str) -> list[str]:
    """One line per tensor of the file that the loader's conversion drops (`coverage`)."""
    loader, options = _loader(targets)

    def convert(state: dict[str, torch.Tensor]) -> Mapping[str, Any]:
        out = loader.lora_state_dict(state, **options)
        return out[0] if isinstance(out, tuple) else out

    try:
        dropped = dropped_keys(raw_state(path), convert)
    except Exception as exc:
        raise ModelSourceError(f"LoRA {source!r}: cannot read {path.name}: "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    return [f"{key}: diffusers' {targets.loader} drops it in conversion (not applied)"
            for key in dropped]


def checked_lora(path: Path, targets: LoraTargets, source: str, family: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """`read_lora` after every key is checked: ModelSourceError naming the keys dropped in
    conversion or that do not fit the model."""
    state, alphas, metadata = read_lora(path, targets, source)
    problems = unapplied(path, targets, source) + lora_mismatches(state, targets, family)
    if problems:
        raise ModelSourceError(refusal(source, problems, family))
    return state, alphas, metadata


def part_keys(state: Mapping[str, torch.Tensor], prefix: str, module: torch.nn.Module
          ) -> dict[str, torch.Tensor]:
    """The keys of `state` for part `prefix` in peft's format, converted as diffusers' loaders
    convert them for that module."""
    from diffusers import ModelMixin
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    part = {k.removeprefix(f"{prefix}."): v for k, v in state.items()
            if k.startswith(f"{prefix}.")}
    if not part:
        return part
    if isinstance(module, ModelMixin):
        return part if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(part)
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(module, "text_model"):  # CLIPTextModel is flattened in transformers 5
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    return part


def _layer_problem(layer: torch.nn.Module, part: str, param: str | None,
                   shape: tuple[int, ...]) -> str | None:
    """Why a LoRA tensor of `shape` does not fit `layer`, or None."""
    base = getattr(layer, "base_layer", layer)
    if part == "lora_magnitude_vector":
        return None
    if isinstance(base, torch.nn.Linear):
        size_in, size_out, kernel = base.in_features, base.out_features, ()
    elif isinstance(base, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        size_in, size_out = base.in_channels, base.out_channels
        kernel = tuple(base.kernel_size)
    elif isinstance(base, torch.nn.Embedding):
        size_in, size_out, kernel = base.num_embeddings, base.embedding_dim, ()
    else:
        return f"the layer is a {type(base).__name__}, which LoRA cannot adapt"
    if param == "bias":
        return None if shape == (size_out,) else \
            f"bias shape {shape} does not fit the layer's {size_out} outputs"
    if part in ("lora_A", "lora_embedding_A"):
        if len(shape) < 2 or shape[1] != size_in or (kernel and tuple(shape[2:]) != kernel):
            return f"shape {shape} does not fit the layer's {size_in} inputs" + \
                (f" and kernel {kernel}" if kernel else "")
    elif len(shape) < 2 or shape[0] != size_out:
        return f"shape {shape} does not fit the layer's {size_out} outputs"
    return None


def lora_mismatches(state: Mapping[str, torch.Tensor], targets: LoraTargets,
                    family: str) -> list[str]:
    """One line per key of a `read_lora` state dict that does not fit the model (part, layer,
    shapes or A / B ranks); empty when the LoRA fits."""
    if not state:
        return ["the file holds no LoRA weights"]
    problems = []
    parts = ", ".join(targets.modules)
    claimed = {k for k in state if k.split(".", 1)[0] in targets.modules}
    problems += [f"{key}: names no part of this {family} model (LoRA parts: {parts})"
                 for key in state if key not in claimed]
    for prefix, module in targets.modules.items():
        layers = dict(module.named_modules())
        ranks: dict[str, set[int]] = {}
        for key, value in part_keys(state, prefix, module).items():
            match = _KEY.match(key)
            where = f"{prefix}.{key}"
            if match is None:
                problems.append(f"{where}: not a LoRA weight (lora_A / lora_B)")
                continue
            layer = layers.get(match["layer"])
            if layer is None:
                problems.append(f"{where}: this {family} model's {prefix} has no layer "
                                f"{match['layer']}")
                continue
            shape = tuple(int(s) for s in value.shape)
            problem = _layer_problem(layer, match["part"], match["param"], shape)
            if problem is not None:
                problems.append(f"{where}: {problem}")
            elif match["param"] != "bias" and len(shape) >= 2 and match["part"] != \
                    "lora_magnitude_vector":
                rank = shape[0] if match["part"].endswith("A") else shape[1]
                ranks.setdefault(f"{prefix}.{match['layer']}", set()).add(rank)
        problems += [f"{layer}: lora_A and lora_B ranks differ ({sorted(r)})"
                     for layer, r in ranks.items() if len(r) > 1]
    return problems


def refusal(source: str, problems: list[str], family: str) -> str:
    shown = "; ".join(problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return (f"LoRA {source!r} does not fit this {family} model: {len(problems)} key(s) do "
            f"not match: {shown}{more}")


def lora_fit(layout: ModelLayout, lora: Lora, cache_dir: str | Path | None = None,
             storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Whether a LoRA fits a model, from its configs alone (no weights read): [] when it does,
    else one line naming the keys that do not, or why the LoRA cannot be read."""
    try:
        targets = lora_targets(family_named(layout.family), layout)
        path = lora_file(lora.source, cache_dir, storage_options)
        checked_lora(path, targets, lora.source, layout.family)
    except ModelSourceError as exc:
        return [str(exc)]
    return []
