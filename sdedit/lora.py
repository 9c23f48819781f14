"""LoRA adapters (Hu et al., 2021) on a loaded model: read with diffusers' LoRA loaders,
injected with peft, scaled and fused into the weights.

A LoRA is a file of low-rank weight updates W' = W + scale * (alpha / r) * B A for some layers
of the denoising network and the text encoders. Its keys name the part they adapt ("unet.",
"text_encoder.", "text_encoder_2." as diffusers saves them; kohya / A1111 files are converted
by diffusers' `lora_state_dict`). A model family that takes LoRAs says which parts there are
(`lora_targets`: the SD and SDXL families); others refuse them.

Loading (`apply_loras`): the denoiser's part goes through diffusers' own loader
(`ModelMixin.load_lora_adapter`, what `load_lora_weights` calls); a text encoder's part through
diffusers' key conversion and peft's `inject_adapter_in_model` / `set_peft_model_state_dict`,
which is what diffusers' text-encoder loader does through transformers' PEFT integration (that
integration demands a newer peft than the registry offers for transformers 5.24: peft 0.22+;
peft 0.21.2 is installed). Each LoRA's scale is set on every adapted layer as diffusers'
`set_adapters` does, then all are merged into the base weights (`merge`, as `fuse_lora`) and
the peft layers removed: inference runs the plain network, with no per-layer LoRA cost
(benchmarks/lora_fuse.py measures fused against unfused).

Before any of that, and in `sdedit-batch validate` on the configs alone (`lora_fit` on a
network built on the meta device), every key is checked against the model: the layer it
names exists and its shapes fit. A LoRA that does not fit is refused naming its keys; nothing
is silently dropped (diffusers only logs unexpected keys).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdedit.sources import ModelSourceError, copy_url, files_identity, local_path, source_kind

if TYPE_CHECKING:
    from sdedit.families.base import ModelLayout
    from sdedit.models import DiffusionModel

logger = logging.getLogger(__name__)

__all__ = ["Lora", "LoraTargets", "apply_loras", "lora_file", "lora_fit", "lora_kind",
           "lora_mismatches", "lora_targets", "meta_model"]

WEIGHT_EXTS = (".safetensors", ".bin")
PREFERRED = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
"""The file names diffusers' `save_lora_weights` writes; preferred in a folder of several."""
_KEY = re.compile(r"^(?P<layer>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                  r"lora_magnitude_vector)(?:\.(?P<param>weight|bias))?$")
SHOWN = 8
"""Mismatched keys listed in a refusal (then "and N more")."""


@dataclass(frozen=True)
class Lora:
    """One LoRA to apply.

    Attributes:
        source: a local .safetensors / .bin file or a folder holding one, a hub id (org/name,
            or org/name/path/file.safetensors for one file of a repository), or an fsspec URL
            to such a file or folder.
        scale: the weight of its update (diffusers' `set_adapters` weight; 1.0 = as trained).
    """

    source: str
    scale: float = 1.0


@dataclass(frozen=True)
class LoraTargets:
    """The parts of a model a LoRA may adapt.

    Attributes:
        loader: the diffusers LoRA loader mixin of the family (its `lora_state_dict` reads
            and converts the files), e.g. "StableDiffusionXLLoraLoaderMixin".
        modules: key prefix -> module ("unet" -> the UNet, "text_encoder" -> a CLIP encoder).
    """

    loader: str
    modules: Mapping[str, torch.nn.Module]


def meta_model(cls: type, folder: Path) -> torch.nn.Module:
    """`cls` (a diffusers ModelMixin or a transformers PreTrainedModel class) built from the
    config.json in `folder` on the meta device: its layers and shapes, no weights read and no
    memory used."""
    from diffusers import ModelMixin

    with torch.device("meta"):
        if issubclass(cls, ModelMixin):
            return cls.from_config(cls.load_config(folder))
        return cls(cls.config_class.from_pretrained(folder))


def lora_targets(family: Any, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                 text: Any = None) -> LoraTargets:
    """The family's `lora_targets` (loaded modules, or meta modules from `layout`), or
    ModelSourceError when the family takes no LoRA."""
    from sdedit.families import FAMILIES

    get = getattr(family, "lora_targets", None)
    if get is None:
        takes = ", ".join(f.name for f in FAMILIES if hasattr(f, "lora_targets"))
        raise ModelSourceError(f"a {family.name} model takes no LoRA; allowed: a model of the "
                               f"{takes} families")
    return get(layout, net, text)


def _pick(names: Sequence[str], where: str) -> str:
    """The LoRA weights file among the file names of a folder (diffusers' choice, made strict:
    pytorch_lora_weights.*, else the only .safetensors, else the only .bin)."""
    usable = [n for n in names if n.endswith(WEIGHT_EXTS)
              and not any(s in n for s in ("scheduler", "optimizer", "checkpoint"))]
    for name in PREFERRED:
        if name in usable:
            return name
    for ext in WEIGHT_EXTS:
        found = sorted(n for n in usable if n.endswith(ext))
        if len(found) == 1:
            return found[0]
        if found:
            raise ModelSourceError(f"LoRA {where}: several weight files ({', '.join(found)}); "
                                   "allowed: name one of them as the source")
    raise ModelSourceError(f"LoRA {where}: no .safetensors or .bin weights file; allowed: a "
                           "LoRA file, or a folder holding one (pytorch_lora_weights.safetensors)")


def lora_kind(source: str) -> str:
    """What a LoRA source names: "local" (an existing path), "url", "hub" (org/name, or
    org/name/path/file.safetensors: one file of a hub repository) or "missing"."""
    kind = source_kind(source)
    parts = source.split("/")
    if kind == "missing" and len(parts) > 2 and source.endswith(WEIGHT_EXTS) \
            and not source.startswith((".", "/", "~")):
        return "hub"
    return kind


def lora_file(source: str, cache_dir: str | Path | None = None,
              storage_options: Mapping[str, Any] | None = None) -> Path:
    """The local weights file of a LoRA source (see `Lora.source`); URLs are copied into the
    model cache once, hub files come through the hub cache.

    Raises:
        ModelSourceError naming the source and what is wrong.
    """
    kind = lora_kind(source)
    if kind == "local":
        path = local_path(source)
        if path.is_file():
            return path
        return path / _pick([p.name for p in path.iterdir() if p.is_file()], source)
    if kind == "url":
        folder = copy_url(source, cache_dir, dict(storage_options or {}))
        return folder / _pick([p.name for p in folder.iterdir() if p.is_file()], source)
    if kind == "hub":
        parts = source.split("/")
        return _from_hub("/".join(parts[:2]), "/".join(parts[2:]) or None, source)
    raise ModelSourceError(f"LoRA {source!r} not found; allowed: a local LoRA file or folder, a "
                           "hub id (org/name or org/name/file.safetensors) or an fsspec URL")


def _from_hub(repo: str, filename: str | None, source: str) -> Path:
    """One LoRA file of a hub repository, downloaded into the hub cache (or found there when
    the hub cannot be reached)."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    try:
        if filename is None:
            filename = _pick([f for f in HfApi().list_repo_files(repo) if "/" not in f], source)
        return Path(hf_hub_download(repo, filename))
    except ModelSourceError:
        raise
    except Exception as exc:  # offline: the cache may hold it
        for name in [filename] if filename else list(PREFERRED):
            cached = try_to_load_from_cache(repo, name)
            if isinstance(cached, str):
                return Path(cached)
        raise ModelSourceError(
            f"LoRA {source!r}: could not get it from the Hugging Face hub or its cache "
            f"({type(exc).__name__}); allowed: a reachable or cached hub LoRA, a local file or "
            "an fsspec URL") from exc


def read_lora(path: Path, targets: LoraTargets, source: str
              ) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """(state dict, network alphas, adapter metadata) of a LoRA file, read and converted to
    diffusers' key format by the family's diffusers loader (`lora_state_dict`)."""
    import diffusers.loaders

    loader = getattr(diffusers.loaders, targets.loader)
    unet = targets.modules.get("unet")
    options = {"unet_config": unet.config} if unet is not None else {}
    try:
        state, alphas, metadata = loader.lora_state_dict(
            str(path.parent), weight_name=path.name, return_lora_metadata=True, **options)
    except Exception as exc:
        raise ModelSourceError(f"LoRA {source!r}: cannot read {path.name}: "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    return state, alphas, metadata


def _part(state: Mapping[str, torch.Tensor], prefix: str, module: torch.nn.Module
          ) -> dict[str, torch.Tensor]:
    """The keys of `state` for the part `prefix`, in peft's format for that module, converted
    as diffusers' loaders convert them (`load_lora_adapter` for a diffusers network,
    `_load_lora_into_text_encoder` for a transformers text encoder)."""
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
    """One line per key of a LoRA state dict (diffusers' format, from `read_lora`) that does
    not fit the model: a part the model does not have, a layer it does not have, shapes that
    do not fit the layer, or A / B ranks that disagree. Empty when the LoRA fits."""
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
        for key, value in _part(state, prefix, module).items():
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


def _refusal(source: str, problems: list[str], family: str) -> str:
    shown = "; ".join(problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return (f"LoRA {source!r} does not fit this {family} model: {len(problems)} key(s) do "
            f"not match: {shown}{more}")


def lora_fit(layout: ModelLayout, lora: Lora, cache_dir: str | Path | None = None,
             storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Whether a LoRA fits a model, from the model's configs alone (its network built on the
    meta device, no weights read): [] when it does, else one line naming the keys that do not
    match (or why the LoRA cannot be read)."""
    from sdedit.families import family_named

    try:
        targets = lora_targets(family_named(layout.family), layout)
        path = lora_file(lora.source, cache_dir, storage_options)
        state, _, _ = read_lora(path, targets, lora.source)
    except ModelSourceError as exc:
        return [str(exc)]
    problems = lora_mismatches(state, targets, layout.family)
    return [_refusal(lora.source, problems, layout.family)] if problems else []


def _inject_text(module: torch.nn.Module, part: dict[str, torch.Tensor], prefix: str,
                 alphas: Mapping[str, float] | None, metadata: Mapping[str, Any] | None,
                 name: str) -> None:
    """A text encoder's LoRA layers with peft, configured as diffusers'
    `_load_lora_into_text_encoder` configures them (adapter metadata, else ranks and alphas
    from the keys)."""
    from diffusers.utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if metadata:
        options = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items()
                   if k.startswith(f"{prefix}.")}
    else:
        rank = {k: int(v.shape[1]) for k, v in part.items()
                if k.endswith("lora_B.weight") and v.ndim > 1}
        mine = {k.removeprefix(f"{prefix}."): v for k, v in (alphas or {}).items()
                if k.split(".")[0] == prefix}
        options = get_peft_kwargs(rank, mine or None, part, is_unet=False)
    inject_adapter_in_model(LoraConfig(**options), module, adapter_name=name, state_dict=part)
    result = set_peft_model_state_dict(module, part, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ModelSourceError(f"LoRA keys not loaded into {prefix}: {unexpected[:SHOWN]}")


def _fuse(module: torch.nn.Module, names: list[str], scales: list[float]) -> None:
    """Set each adapter's scale on every LoRA layer (diffusers' `set_adapters`), merge them
    into the base weights (`fuse_lora`) and put the base layers back (`unload_lora`)."""
    from diffusers.utils import recurse_remove_peft_layers
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters
    from peft.tuners.tuners_utils import BaseTunerLayer

    set_weights_and_activate_adapters(module, names, scales)
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge(adapter_names=names)
    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = None


@torch.no_grad()
def apply_loras(model: DiffusionModel, loras: Sequence[Lora], *,
                cache_dir: str | Path | None = None,
                storage_options: Mapping[str, Any] | None = None) -> DiffusionModel:
    """Fuse LoRAs into a loaded model, in place (see the module docstring); its `identity`
    then names each LoRA file's content and scale: "<base> + lora sha256:<hex>*<scale>".

    Args:
        model: from `load_model`, of a family that takes LoRAs.
        loras: applied together (their updates add up); an empty sequence changes nothing.
        cache_dir, storage_options: for URL sources (as `load_model`).
    Returns:
        the model.
    Raises:
        ModelSourceError naming the LoRA and the keys that do not fit, or what is wrong.
    """
    from diffusers import ModelMixin

    from sdedit.families import family_named

    if not loras:
        return model
    targets = lora_targets(family_named(model.family), None, model.net, model.text)
    names: dict[str, list[tuple[str, float]]] = {prefix: [] for prefix in targets.modules}
    identities = []
    for i, lora in enumerate(loras):
        path = lora_file(lora.source, cache_dir, storage_options)
        state, alphas, metadata = read_lora(path, targets, lora.source)
        problems = lora_mismatches(state, targets, model.family)
        if problems:
            raise ModelSourceError(_refusal(lora.source, problems, model.family))
        name = f"lora_{i}"
        for prefix, module in targets.modules.items():
            part = _part(state, prefix, module)
            if not part:
                continue
            try:
                if isinstance(module, ModelMixin):
                    module.load_lora_adapter(state, prefix=prefix, network_alphas=alphas,
                                             adapter_name=name, metadata=metadata)
                else:
                    _inject_text(module, part, prefix, alphas, metadata, name)
            except ModelSourceError as exc:
                raise ModelSourceError(f"LoRA {lora.source!r}: {exc}") from exc
            except Exception as exc:
                raise ModelSourceError(f"LoRA {lora.source!r}: cannot load its {prefix} part: "
                                       f"{type(exc).__name__}: {str(exc)[:300]}") from exc
            names[prefix].append((name, float(lora.scale)))
        identities.append(f"{files_identity(path.parent, [path])}*{lora.scale:g}")
        logger.info("LoRA %s (%s) applied at scale %g", lora.source, path.name, lora.scale)
    for prefix, module in targets.modules.items():
        if names[prefix]:
            _fuse(module, [n for n, _ in names[prefix]], [s for _, s in names[prefix]])
            module.requires_grad_(False).eval()
    model.identity = " + lora ".join([model.identity or "unidentified", *identities])
    return model.accelerate()  # a new runner: the network's layers changed
