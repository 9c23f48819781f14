"""What every model family provides (`Family`), and the loading helpers they share.

A family recognises its directory layout, reads what the model is from its JSON files alone
(`ModelLayout`), so that a job is checked before any weights load, and then loads its parts
(`Loaded`). The families: docs/models.md#the-families.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sdedit.conditioning import Conditioning, NetCall, PromptEncoder, TextSpec
from sdedit.latent import LatentCodec
from sdedit.precision import role_dtype
from sdedit.processes import NoiseProcess, VEProcess, VPProcess, flow_from_config
from sdedit.schedules import VESchedule, VPSchedule
from sdedit.sources import ModelSourceError
from sdedit.weights import check_weights_file

__all__ = ["Family", "Loaded", "ModelLayout", "component", "meta_model", "read_json",
           "scheduler_process", "transformer_lora_modules", "unet_call", "weight_files"]

VP_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "GaussianDDPMScheduler", "PNDMScheduler",
                 "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                 "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                 "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DEISMultistepScheduler"}
"""Scheduler classes whose config is a discrete VP schedule (betas); only the betas are used."""
VE_SCHEDULERS = {"ScoreSdeVeScheduler"}
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler"}


@dataclass(frozen=True)
class ModelLayout:
    """What a model directory holds, from its JSON files only: `sample_size` (H, W) pixels,
    image sides multiples of `downsample_factor`, `patch` latent cells per token along a side,
    `text` None for unconditional models, `configs` by part ("index", "unet", "vae", ...)."""

    family: str
    directory: Path
    process: NoiseProcess
    sample_size: tuple[int, int]
    in_channels: int
    downsample_factor: int
    text: TextSpec | None = None
    patch: int = 1
    configs: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    paths: Mapping[str, Path] = field(default_factory=dict)

    @property
    def latent(self) -> bool:
        """True when the chain runs on VAE latents."""
        return "vae" in self.configs

    def part_names(self) -> list[str]:
        """The component folders with weights ("unet" for a pixel model's root layout)."""
        index = self.configs.get("index") or {}
        named = [k for k, v in index.items() if not k.startswith("_") and
                 isinstance(v, (list, tuple)) and len(v) == 2 and v[1] is not None]
        return list(dict.fromkeys([*named, *self.configs]))


@dataclass
class Loaded:
    """A family's loaded parts on the CPU, in eval mode; `files` are those the parts were built
    from (their content is the model's identity)."""

    net: torch.nn.Module
    call: NetCall
    codec: LatentCodec | None = None
    text: PromptEncoder | None = None
    files: list[Path] = field(default_factory=list)


class Family(Protocol):
    """One model family: its layout, its parts, its LoRA support."""

    name: str
    lora_loader: str | None
    """The diffusers LoRA loader mixin that reads this family's LoRA files; None: no LoRA."""

    weights_precision: str | None
    """What `weights_dtype: auto` resolves to: its published precision ("bf16", "fp16",
    "fp32"); None = bf16 for a flow-matching family, else fp32."""

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        """Whether `directory` (with its model_index.json, {} if none) is of this family."""

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        """Read and check the layout without weights; ModelSourceError naming what is wrong."""

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        """Load the parts (ModelSourceError naming the part that cannot be loaded)."""

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """LoRA key prefix -> the module it adapts ("unet" -> the UNet), of the loaded `net`
        and `text` or else built from `layout` on the meta device; {} without LoRA."""

    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        """The codec of this family's VAE (ValueError for a family without one)."""

    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, Conditioning | None]:
        """The network call and zero conditioning of `rows` rows at (H, W) pixels, as `edit`
        makes them: what the memory plan traces."""


def meta_model(cls: type, folder: Path) -> torch.nn.Module:
    """`cls` (diffusers or transformers) built from `folder`'s config.json on the meta device:
    layers and shapes, no weights read."""
    from diffusers import ModelMixin

    with torch.device("meta"):
        if issubclass(cls, ModelMixin):
            return cls.from_config(cls.load_config(folder))
        return cls(cls.config_class.from_pretrained(folder))


def transformer_lora_modules(cls: type, layout: ModelLayout | None,
                             net: torch.nn.Module | None) -> dict[str, torch.nn.Module]:
    """The LoRA part "transformer" alone: the loaded `net`, or `cls` built from the layout's
    transformer/ config on the meta device (for families whose loader adapts nothing else)."""
    if net is not None:
        return {"transformer": net}
    assert layout is not None
    return {"transformer": meta_model(cls, layout.directory / "transformer")}


def unet_call(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
              cond: Conditioning | None) -> torch.Tensor:
    """A diffusers UNet2DModel (`net(x, t).sample`) or a UNet2DConditionModel with prompt
    embeddings only (`encoder_hidden_states`)."""
    if cond is None:
        return module(x, t).sample
    return module(x, t, encoder_hidden_states=cond.rows["encoder_hidden_states"]).sample


def read_json(path: Path, source: str) -> dict[str, Any]:
    """A JSON object file of a model directory; ModelSourceError when missing or invalid."""
    if not path.exists():
        raise ModelSourceError(f"model source {source!r}: missing {path.name} ({path})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"model source {source!r}: {path.name} is not valid JSON: {exc}") \
            from exc
    if not isinstance(data, dict):
        raise ModelSourceError(f"model source {source!r}: {path.name} is not a JSON object")
    return data


def scheduler_process(scheduler: Mapping[str, Any], source: str) -> NoiseProcess:
    """The noise process a scheduler config describes (VP, VE or flow); options that change the
    schedule are applied or refused, never ignored."""
    name = scheduler.get("_class_name", "")
    try:
        if name in VE_SCHEDULERS or (not name and "sigma_max" in scheduler):
            return VEProcess(VESchedule.from_config(scheduler))
        if name in FLOW_SCHEDULERS:
            return flow_from_config(scheduler)
        if name in VP_SCHEDULERS or (not name and "beta_start" in scheduler):
            prediction = scheduler.get("prediction_type", "epsilon")
            if prediction not in ("epsilon", "sample", "v_prediction"):
                raise ValueError(f"prediction_type {prediction!r} is not supported; allowed: "
                                 "epsilon, sample, v_prediction")
            return VPProcess(VPSchedule.from_config(scheduler), prediction)
    except ValueError as exc:
        raise ModelSourceError(f"model source {source!r}: scheduler {name}: {exc}") from exc
    raise ModelSourceError(
        f"model source {source!r}: scheduler {name or '(no _class_name)'!r} is not supported; "
        f"allowed: VP ({', '.join(sorted(VP_SCHEDULERS))}), VE (ScoreSdeVeScheduler) or "
        "flow matching (FlowMatchEulerDiscreteScheduler)")


def component(cls: Any, directory: Path, name: str, source: str) -> Any:
    """`cls.from_pretrained(directory / name)`, eval, no grad, in its part's dtype
    (`role_dtype`); ModelSourceError naming the part when it cannot be loaded."""
    options: dict[str, Any] = {}
    dtype = torch.float32
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        # meta-device initialisation needs accelerate; without it, say so once (not per part)
        options["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
        dtype = role_dtype(name)
        # transformers 5 names it dtype, diffusers torch_dtype
        options["dtype" if cls.__module__.startswith("transformers") else "torch_dtype"] = dtype
    try:
        part = cls.from_pretrained(directory / name, **options)
    except Exception as exc:
        raise ModelSourceError(
            f"model source {source!r}: cannot load {name}/ as {cls.__name__}: "
            f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if isinstance(part, torch.nn.Module):
        if dtype == torch.float32:
            part = part.float()  # whatever the files hold
        part = part.eval().requires_grad_(False)
    return part


def weight_files(folder: Path) -> list[Path]:
    """The full-precision weight files from_pretrained reads in `folder` (safetensors first)."""
    for ext in ("safetensors", "bin"):
        for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
            single = folder / f"{stem}.{ext}"
            if single.exists():
                return [single]
            if (folder / f"{stem}.{ext}.index.json").exists():
                index = folder / f"{stem}.{ext}.index.json"
                return [*sorted(folder.glob(f"{stem}-*-of-*.{ext}")), index]
    return []


def require_weights(directory: Path, names: tuple[str, ...], source: str, supported: str) -> None:
    """ModelSourceError when a component folder of `names` holds no weights."""
    for name in names:
        files = weight_files(directory / name)
        if not files:
            raise ModelSourceError(f"model source {source!r}: no weights in {name}/ "
                                   f"({directory / name}); supported: {supported}")
        for file in files:
            if file.suffix != ".json":  # a sharded checkpoint's index is no weights file
                check_weights_file(file, source)


def component_files(directory: Path, weighted: tuple[str, ...],
                    texts: tuple[str, ...] = ()) -> list[Path]:
    """The files a pipeline's parts are built from: each weighted folder's config.json and
    weights, and every file of each text folder (tokenizers)."""
    files = [directory / name / "config.json" for name in weighted]
    files += [f for name in weighted for f in weight_files(directory / name)]
    files += [f for name in texts for f in sorted((directory / name).iterdir()) if f.is_file()]
    return files
