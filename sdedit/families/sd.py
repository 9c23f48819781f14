"""Stable Diffusion 1.x / 2.x: latent VP models conditioned on one CLIP text encoder, as
diffusers' StableDiffusionImg2ImgPipeline runs them (docs/models.md#stable-diffusion-1x--2x).
Also the CLIP embedder the other families share.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdedit.conditioning import (
    Conditioning,
    NetCall,
    PromptEncoder,
    TextSpec,
    TokenWindow,
    count_cuts,
)
from sdedit.families.base import (
    Loaded,
    ModelLayout,
    component,
    component_files,
    meta_model,
    read_json,
    require_weights,
    scheduler_process,
    unet_call,
)
from sdedit.latent import LatentCodec, codec_from_vae
from sdedit.processes import VPProcess
from sdedit.sources import ModelSourceError

logger = logging.getLogger(__name__)

__all__ = ["FAMILY", "ClipEmbedder", "ClipPromptEncoder", "StableDiffusionFamily",
           "check_vae_fits", "is_xl_layout", "warn_cuts"]

SUPPORTED = ("the StableDiffusionPipeline layout (SD 1.x / 2.x): unet UNet2DConditionModel, vae "
             "AutoencoderKL, text_encoder CLIPTextModel, tokenizer CLIPTokenizer, scheduler")
DEFAULT_GUIDANCE = 7.5
"""Guidance scale when a job sets none (diffusers' default)."""


def warn_cuts(window: TokenWindow, texts: Sequence[str]) -> None:
    """Log once how many of `texts` the encoder of `window` cuts, for callers of `edit` (the
    pipeline records each row's cuts itself)."""
    cut = [text for text, cuts in zip(texts, count_cuts([window], texts), strict=True) if cuts]
    if cut:
        logger.warning("%d prompt(s) cut at %d tokens by %s, e.g. %r", len(cut),
                       window.max_length, window.encoder, cut[0][:80])


class ClipEmbedder:
    """One CLIP tokenizer and text encoder; each distinct text padded to the tokenizer's
    `model_max_length` L and encoded once. `name`: the encoder's folder."""

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module,
                 name: str = "text_encoder") -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.name = name

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def window(self) -> TokenWindow:
        """The tokens of a prompt this encoder reads."""
        return TokenWindow(self.name, self.tokenizer, self.max_length)

    @torch.no_grad()
    def run(self, texts: Sequence[str], hidden_states: bool = False
            ) -> tuple[list[str], Any]:
        """(the distinct texts, in first-seen order; the encoder's output for them)."""
        distinct = list(dict.fromkeys(texts))
        tokens = self.tokenizer(distinct, padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        warn_cuts(self.window(), distinct)
        device = next(self.encoder.parameters()).device
        mask = None
        if getattr(self.encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        out = self.encoder(tokens.input_ids.to(device), attention_mask=mask,
                           output_hidden_states=hidden_states)
        return distinct, out

    @staticmethod
    def rows(texts: Sequence[str], distinct: list[str], values: torch.Tensor) -> torch.Tensor:
        """`values` of the distinct texts, gathered to one row per text of `texts`."""
        where = {text: i for i, text in enumerate(distinct)}
        return values[torch.tensor([where[t] for t in texts], device=values.device)]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 (len(texts), L, D): the last hidden state of each text."""
        distinct, out = self.run(texts)
        return self.rows(texts, distinct, out[0].float())


class ClipPromptEncoder(PromptEncoder):
    """SD 1.x / 2.x prompts: the CLIP last hidden state as `encoder_hidden_states`."""

    spec = TextSpec("cfg", DEFAULT_GUIDANCE)

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module) -> None:
        self.clip = ClipEmbedder(tokenizer, encoder)

    @property
    def tokenizer(self) -> Any:
        return self.clip.tokenizer

    @property
    def encoder(self) -> torch.nn.Module:
        return self.clip.encoder

    @property
    def max_length(self) -> int:
        return self.clip.max_length

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 (len(texts), L, D) prompt embeddings."""
        return self.clip.embed(texts)

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        n = len(prompts)
        embeddings = self.embed(prompts + negatives if negatives is not None else prompts)
        cond = Conditioning({"encoder_hidden_states": embeddings[:n]})
        if negatives is None:
            return cond, None
        return cond, Conditioning({"encoder_hidden_states": embeddings[n:]})

    def windows(self) -> list[TokenWindow]:
        return [self.clip.window()]

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder]


def is_xl_layout(directory: Path, index: Mapping[str, Any]) -> bool:
    """Whether a pipeline directory is of the SDXL layout (the sdxl family's, not this one)."""
    return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index \
        or (directory / "text_encoder_2").exists()


def check_vae_fits(vae: Mapping[str, Any], channels_in: int, channels_out: int, source: str,
                   supported: str, what: str = "unet") -> None:
    """The VAE is an AutoencoderKL whose latent channels are the network's in/out channels."""
    if vae.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ModelSourceError(f"model source {source!r}: vae class {vae.get('_class_name')!r}"
                               f" is not supported; supported: {supported}")
    latent = vae.get("latent_channels", 4)
    if channels_in != latent or channels_out != latent:
        raise ModelSourceError(
            f"model source {source!r}: {what} in/out channels {channels_in}/{channels_out} do "
            f"not match the VAE's {latent} latent channels (inpainting and depth models are "
            f"not supported); supported: {supported}")


def latent_sizes(directory: Path, source: str, net: Mapping[str, Any],
                 vae: Mapping[str, Any], net_factor: int) -> dict[str, Any]:
    """sample_size, in_channels and downsample_factor of a latent model (pixels)."""
    vae_factor = 2 ** (len(vae.get("block_out_channels", (64,) * 4)) - 1)
    size = net.get("sample_size", 64)
    latent = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {"sample_size": (latent[0] * vae_factor, latent[1] * vae_factor),
            "in_channels": int(vae.get("in_channels", 3)),
            "downsample_factor": vae_factor * net_factor}


class StableDiffusionFamily:
    """SD 1.x / 2.x."""

    name = "sd"
    weights_precision = "fp16"
    lora_loader = "StableDiffusionLoraLoaderMixin"

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        config = directory / "unet" / "config.json"
        if not index or not config.exists() or is_xl_layout(directory, index):
            return False  # SDXL layouts are the sdxl family's
        try:
            return read_json(config, "").get("_class_name") == "UNet2DConditionModel"
        except ModelSourceError:
            return False

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        for part in ("unet", "vae", "text_encoder", "tokenizer"):
            if not (directory / part).is_dir():
                raise ModelSourceError(f"model source {source!r}: no {part}/ folder in "
                                       f"{directory}; supported: {SUPPORTED}")
        unet = read_json(directory / "unet" / "config.json", source)
        scheduler_path = directory / "scheduler" / "scheduler_config.json"
        scheduler = read_json(scheduler_path, source)
        process = scheduler_process(scheduler, source)
        if not isinstance(process, VPProcess):
            raise ModelSourceError(f"model source {source!r}: a latent model needs a VP "
                                   "scheduler")
        vae = read_json(directory / "vae" / "config.json", source) \
            if (directory / "vae" / "config.json").exists() else {}
        for key in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim",
                    "encoder_hid_dim_type"):
            if unet.get(key) is not None:
                raise ModelSourceError(
                    f"model source {source!r}: unet config {key}={unet.get(key)!r} is not "
                    f"supported (extra conditioning); supported: {SUPPORTED}")
        check_vae_fits(vae, unet.get("in_channels", 4), unet.get("out_channels", 4), source,
                       SUPPORTED)
        require_weights(directory, ("unet", "vae", "text_encoder"), source, SUPPORTED)
        net_factor = 2 ** (len(unet.get("down_block_types", ())) - 1)
        return ModelLayout(
            family=self.name, directory=directory, process=process,
            text=ClipPromptEncoder.spec,
            configs={"index": dict(index), "unet": unet, "vae": vae, "scheduler": scheduler,
                     "text_encoder": read_json(directory / "text_encoder" / "config.json",
                                               source)},
            paths={"scheduler": scheduler_path},
            **latent_sizes(directory, source, unet, vae, net_factor))

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        directory = layout.directory
        unet = component(UNet2DConditionModel, directory, "unet", source)
        vae = component(AutoencoderKL, directory, "vae", source)
        encoder = component(CLIPTextModel, directory, "text_encoder", source)
        tokenizer = component(CLIPTokenizer, directory, "tokenizer", source)
        files = component_files(directory, ("unet", "vae", "text_encoder"), ("tokenizer",))
        return Loaded(net=unet, call=unet_call, codec=self.codec(vae),
                      text=ClipPromptEncoder(tokenizer, encoder),
                      files=[*files, layout.paths["scheduler"]])

    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        return codec_from_vae(vae)

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """LoRA parts "unet" and "text_encoder"."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        if net is not None:
            assert isinstance(text, ClipPromptEncoder)
            return {"unet": net, "text_encoder": text.encoder}
        assert layout is not None
        return {"unet": meta_model(UNet2DConditionModel, layout.directory / "unet"),
                "text_encoder": meta_model(CLIPTextModel, layout.directory / "text_encoder")}

    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, Conditioning]:
        """See `Family.plan_inputs`."""
        encoder = layout.configs["text_encoder"]
        return unet_call, Conditioning({"encoder_hidden_states": torch.zeros(
            rows, int(encoder.get("max_position_embeddings", 77)),
            int(encoder.get("hidden_size", 768)))})

FAMILY = StableDiffusionFamily()
