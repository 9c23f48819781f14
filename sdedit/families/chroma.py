"""Chroma: a Flux-schnell-derived rectified-flow transformer on 2 x 2-packed latents, T5 only,
as `ChromaImg2ImgPipeline` runs it.

The pipeline's float attention mask is added to the scores, so padding is not
masked out and outputs depend on padding every prompt to 512 tokens, which we keep
(docs/open-models.md#chromas-float-t5-mask).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdedit.conditioning import Conditioning, NetCall, PromptEncoder, TextSpec, TokenWindow
from sdedit.families.base import (
    Loaded,
    ModelLayout,
    component,
    component_files,
    require_weights,
    transformer_lora_modules,
)
from sdedit.families.flow import T5Embedder, flow_scheduler, read_configs, transformer_class
from sdedit.families.flux import PACK, image_ids, pack, unpack
from sdedit.families.sd import check_vae_fits
from sdedit.latent import LatentCodec, codec_from_vae
from sdedit.sources import ModelSourceError

__all__ = ["FAMILY", "ChromaFamily", "ChromaPromptEncoder", "chroma_call"]

SUPPORTED = ("the ChromaPipeline layout (Chroma): transformer ChromaTransformer2DModel "
             "(patch_size 1, in_channels = 4 x the VAE's latent channels), vae AutoencoderKL, "
             "text_encoder T5EncoderModel, tokenizer T5TokenizerFast, scheduler "
             "FlowMatchEulerDiscreteScheduler")
DEFAULT_GUIDANCE = 5.0
FULL_STEPS = 35
MAX_SEQUENCE_LENGTH = 512


def chroma_call(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                cond: Conditioning | None) -> torch.Tensor:
    """A ChromaTransformer2DModel on unpacked latents x (B, C, h, w) at t = sigma * 1000 (B,)."""
    assert cond is not None
    h, w = x.shape[2:]
    out = module(hidden_states=pack(x), timestep=t / 1000,
                 encoder_hidden_states=cond.rows["encoder_hidden_states"],
                 attention_mask=cond.rows["attention_mask"], txt_ids=cond.shared["txt_ids"],
                 img_ids=cond.shared["img_ids"], return_dict=False)[0]
    return unpack(out, h, w)


class ChromaPromptEncoder(PromptEncoder):
    """Chroma prompts: rows "encoder_hidden_states" float32 (B, 512, D) and "attention_mask"
    float32 (B, 512 + h/2 * w/2); shared "txt_ids" (512, 3) and "img_ids" (h/2 * w/2, 3).
    `factor`: the VAE's pixels per latent cell."""

    spec = TextSpec("cfg", DEFAULT_GUIDANCE)

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module, factor: int) -> None:
        self.t5 = T5Embedder(tokenizer, encoder, MAX_SEQUENCE_LENGTH, masked=True,
                             name="text_encoder")
        self.factor = factor

    def embed(self, texts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """The rows of `texts` for (H, W) pixel images."""
        sequence, counts = self.t5.run(texts)
        h, w = size[0] // self.factor, size[1] // self.factor
        positions = torch.arange(sequence.shape[1], device=sequence.device)
        text = (positions[None, :] <= counts[:, None]).float()   # + one padding token
        image = text.new_ones(len(texts), (h // PACK) * (w // PACK))
        shared = {"txt_ids": sequence.new_zeros(sequence.shape[1], 3),
                  "img_ids": image_ids(h, w).to(sequence.device)}
        return Conditioning({"encoder_hidden_states": sequence,
                             "attention_mask": torch.cat([text, image], dim=1)}, shared)

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        n = len(prompts)
        both = self.embed(prompts + negatives if negatives is not None else prompts, size)
        if negatives is None:
            return both, None
        return both.take(slice(0, n)), both.take(slice(n, None))

    def windows(self) -> list[TokenWindow]:
        return [self.t5.window()]

    def modules(self) -> list[torch.nn.Module]:
        return [self.t5.encoder]


class ChromaFamily:
    """Chroma."""

    name = "chroma"
    weights_precision = "bf16"
    lora_loader = "FluxLoraLoaderMixin"
    """ChromaImg2ImgPipeline's loader, for the transformer only."""

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        return bool(index) and transformer_class(directory) == "ChromaTransformer2DModel"

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        weighted = ("transformer", "vae", "text_encoder")
        configs = read_configs(directory, source, weighted, SUPPORTED)
        if not (directory / "tokenizer").is_dir():
            raise ModelSourceError(f"model source {source!r}: no tokenizer/ folder in "
                                   f"{directory}; supported: {SUPPORTED}")
        net, vae, text = configs["transformer"], configs["vae"], configs["text_encoder"]
        channels_in = int(net.get("in_channels", 64))
        channels_out = int(net.get("out_channels") or channels_in)
        if net.get("patch_size", 1) != 1 or channels_in % 4 or channels_out % 4:
            raise ModelSourceError(f"model source {source!r}: transformer patch_size "
                                   f"{net.get('patch_size')}, in/out channels {channels_in}/"
                                   f"{channels_out}; supported: {SUPPORTED}")
        check_vae_fits(vae, channels_in // 4, channels_out // 4, source, SUPPORTED,
                       "transformer (unpacked)")
        if text.get("d_model") != net.get("joint_attention_dim", 4096):
            raise ModelSourceError(
                f"model source {source!r}: text_encoder d_model {text.get('d_model')} differs "
                f"from transformer joint_attention_dim {net.get('joint_attention_dim', 4096)}; "
                f"supported: {SUPPORTED}")
        require_weights(directory, weighted, source, SUPPORTED)
        process, scheduler, scheduler_path = flow_scheduler(directory, source)
        factor = 2 ** (len(vae.get("block_out_channels", (64,) * 4)) - 1)
        size = int(vae.get("sample_size", 128 * factor))   # Flux's VAE: 1024
        return ModelLayout(
            family=self.name, directory=directory,
            process=replace(process, full_steps=FULL_STEPS), sample_size=(size, size),
            in_channels=int(vae.get("in_channels", 3)), downsample_factor=factor * PACK,
            text=ChromaPromptEncoder.spec, patch=PACK,
            configs={"index": dict(index), **configs, "scheduler": scheduler},
            paths={"scheduler": scheduler_path})

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        from diffusers import AutoencoderKL, ChromaTransformer2DModel
        from transformers import T5EncoderModel, T5TokenizerFast

        directory = layout.directory
        net = component(ChromaTransformer2DModel, directory, "transformer", source)
        vae = component(AutoencoderKL, directory, "vae", source)
        encoder = component(T5EncoderModel, directory, "text_encoder", source)
        tokenizer = component(T5TokenizerFast, directory, "tokenizer", source)
        codec = self.codec(vae)
        files = component_files(directory, ("transformer", "vae", "text_encoder"),
                                ("tokenizer",))
        return Loaded(net=net, call=chroma_call, codec=codec,
                      text=ChromaPromptEncoder(tokenizer, encoder, codec.factor),
                      files=[*files, layout.paths["scheduler"]])

    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        return codec_from_vae(vae)

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """The LoRA part "transformer" (a Flux LoRA's CLIP part has no Chroma counterpart)."""
        from diffusers import ChromaTransformer2DModel

        return transformer_lora_modules(ChromaTransformer2DModel, layout, net)

    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, Conditioning]:
        """See `Family.plan_inputs`."""
        width = int(layout.configs["transformer"].get("joint_attention_dim", 4096))
        h, w = (side // (layout.downsample_factor // PACK) for side in size)
        image = (h // PACK) * (w // PACK)
        return chroma_call, Conditioning(
            {"encoder_hidden_states": torch.zeros(rows, MAX_SEQUENCE_LENGTH, width),
             "attention_mask": torch.ones(rows, MAX_SEQUENCE_LENGTH + image)},
            {"txt_ids": torch.zeros(MAX_SEQUENCE_LENGTH, 3), "img_ids": image_ids(h, w)})

FAMILY = ChromaFamily()
