"""Z-Image (Turbo and base): a single-stream rectified-flow DiT prompted through Qwen3, as
`ZImageImg2ImgPipeline` runs it: per-row lists of latents and captions of their own lengths,
called at time 1 - sigma, predicting minus the velocity.

Turbo and base publish the same configs, so the defaults are Turbo's; the base model needs its
own `guidance_scale` and `steps`; our g is the pipeline's `guidance_scale` + 1
(docs/open-models.md).
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
from sdedit.families.flow import flow_scheduler, read_configs, transformer_class
from sdedit.families.sd import check_vae_fits
from sdedit.latent import LatentCodec, codec_from_vae
from sdedit.sources import ModelSourceError

__all__ = ["FAMILY", "ZImageFamily", "ZImagePromptEncoder", "z_image_call"]

SUPPORTED = ("the ZImagePipeline layout (Z-Image, Z-Image-Turbo): transformer "
             "ZImageTransformer2DModel (patch 2, frame patch 1, in_channels = the VAE's latent "
             "channels), vae AutoencoderKL, text_encoder Qwen3Model, tokenizer Qwen2Tokenizer "
             "with a chat template, scheduler FlowMatchEulerDiscreteScheduler")
DEFAULT_GUIDANCE = 1.0
"""Turbo's: the pipeline's guidance_scale 0.0 (no negative pass)."""
FULL_STEPS = 8
MAX_SEQUENCE_LENGTH = 512
PATCH = 2


def z_image_call(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                 cond: Conditioning | None) -> torch.Tensor:
    """A ZImageTransformer2DModel on latents x (B, C, h, w) at t = sigma * 1000 (B,) -> the
    velocity (B, C, h, w)."""
    assert cond is not None
    return _run(module, x, t, cond.rows["cap_feats"], cond.rows["cap_lengths"].tolist())


def _run(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, feats: torch.Tensor,
         lengths: list[int]) -> torch.Tensor:
    """The transformer on per-row lists: each row's caption features cut to its length."""
    captions = [feats[i, :n] for i, n in enumerate(lengths)]
    out = module(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, captions,
                 return_dict=False)[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)


z_image_call.graph_safe = False  # type: ignore[attr-defined]  # caption lengths on the host


class ZImagePromptEncoder(PromptEncoder):
    """Z-Image prompts: rows "cap_feats" float32 (B, L, D), each caption zero-padded to the
    call's longest, and "cap_lengths" int64 (B,)."""

    spec = TextSpec("cfg", DEFAULT_GUIDANCE)

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Conditioning:
        """The rows of `texts`, each distinct text encoded once."""
        distinct = list(dict.fromkeys(texts))
        chats = [self.chat(text) for text in distinct]
        tokens = self.tokenizer(chats, padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                                truncation=True, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        mask = tokens.attention_mask.to(device).bool()
        hidden = self.encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                              output_hidden_states=True).hidden_states[-2].float()
        counts = mask.sum(dim=1)
        width = int(counts.max())
        feats = hidden.new_zeros(len(distinct), width, hidden.shape[-1])
        for i in range(len(distinct)):
            feats[i, :int(counts[i])] = hidden[i][mask[i]]
        where = {text: i for i, text in enumerate(distinct)}
        rows = torch.tensor([where[t] for t in texts], device=device)
        return Conditioning({"cap_feats": feats[rows], "cap_lengths": counts[rows]})

    def chat(self, text: str) -> str:
        """A prompt in the tokenizer's chat template, as the pipeline renders it."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
            enable_thinking=True)

    def windows(self) -> list[TokenWindow]:
        """The prompt in its chat template, at most 512 tokens."""
        return [TokenWindow("text_encoder", self.tokenizer, MAX_SEQUENCE_LENGTH, self.chat)]

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        n = len(prompts)
        both = self.embed(prompts + negatives if negatives is not None else prompts)
        if negatives is None:
            return both, None
        return both.take(slice(0, n)), both.take(slice(n, None))

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder]


class ZImageFamily:
    """Z-Image and Z-Image-Turbo."""

    name = "z-image"
    weights_precision = "bf16"
    lora_loader = "ZImageLoraLoaderMixin"

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        return bool(index) and transformer_class(directory) == "ZImageTransformer2DModel"

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        def refuse(problem: str) -> ModelSourceError:
            return ModelSourceError(f"model source {source!r}: {problem}; supported: {SUPPORTED}")

        weighted = ("transformer", "vae", "text_encoder")
        configs = read_configs(directory, source, weighted, SUPPORTED)
        if not (directory / "tokenizer").is_dir():
            raise refuse(f"no tokenizer/ folder in {directory}")
        net, vae, text = configs["transformer"], configs["vae"], configs["text_encoder"]
        sizes = list(zip(net.get("all_patch_size", (2,)), net.get("all_f_patch_size", (1,)),
                         strict=False))
        if (PATCH, 1) not in [tuple(s) for s in sizes]:
            raise refuse(f"transformer patch sizes {sizes} lack (2, 1), the pipeline's")
        if net.get("siglip_feat_dim") is not None:
            raise refuse("transformer siglip_feat_dim is set (Z-Image-Omni: image "
                         "conditioning)")
        channels = int(net.get("in_channels", 16))
        check_vae_fits(vae, channels, channels, source, SUPPORTED, "transformer")
        if text.get("hidden_size") != net.get("cap_feat_dim", 2560):
            raise refuse(f"text_encoder hidden_size {text.get('hidden_size')} differs from "
                         f"transformer cap_feat_dim {net.get('cap_feat_dim', 2560)}")
        require_weights(directory, weighted, source, SUPPORTED)
        process, scheduler, scheduler_path = flow_scheduler(directory, source)
        factor = 2 ** (len(vae.get("block_out_channels", (64,) * 4)) - 1)
        size = int(vae.get("sample_size", 128 * factor))
        return ModelLayout(
            family=self.name, directory=directory,
            process=replace(process, full_steps=FULL_STEPS), sample_size=(size, size),
            in_channels=int(vae.get("in_channels", 3)), downsample_factor=factor * PATCH,
            text=ZImagePromptEncoder.spec, patch=PATCH,
            configs={"index": dict(index), **configs, "scheduler": scheduler},
            paths={"scheduler": scheduler_path})

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import Qwen2Tokenizer, Qwen3Model

        directory = layout.directory
        net = component(ZImageTransformer2DModel, directory, "transformer", source)
        vae = component(AutoencoderKL, directory, "vae", source)
        encoder = component(Qwen3Model, directory, "text_encoder", source)
        tokenizer = component(Qwen2Tokenizer, directory, "tokenizer", source)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelSourceError(f"model source {source!r}: tokenizer/ has no chat template "
                                   f"(the pipeline wraps each prompt in it); supported: "
                                   f"{SUPPORTED}")
        files = component_files(directory, ("transformer", "vae", "text_encoder"),
                                ("tokenizer",))
        return Loaded(net=net, call=z_image_call, codec=self.codec(vae),
                      text=ZImagePromptEncoder(tokenizer, encoder),
                      files=[*files, layout.paths["scheduler"]])

    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        return codec_from_vae(vae)

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """The LoRA part "transformer", the only one diffusers' loader adapts."""
        from diffusers import ZImageTransformer2DModel

        return transformer_lora_modules(ZImageTransformer2DModel, layout, net)

    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, Conditioning]:
        """See `Family.plan_inputs`; caption lengths are known on the host, as in a real call."""
        width = int(layout.configs["transformer"].get("cap_feat_dim", 2560))

        def call(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                 cond: Conditioning | None) -> torch.Tensor:
            assert cond is not None
            return _run(module, x, t, cond.rows["cap_feats"], [MAX_SEQUENCE_LENGTH] * rows)

        return call, Conditioning({"cap_feats": torch.zeros(rows, MAX_SEQUENCE_LENGTH, width)})

FAMILY = ZImageFamily()
