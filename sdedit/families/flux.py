"""Flux.1 (dev, schnell): a rectified-flow transformer on 2 x 2-packed latents, CLIP + T5, as
`FluxImg2ImgPipeline` runs it.

The engine's state and noise stay unpacked (16, H/8, W/8); only the network call packs them, so
noise has the same shape as for SD3 and image sides are multiples of 16. Guidance, steps and
what is refused: docs/models.md#flow-matching-models-sd3--sd35-flux.
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
    meta_model,
    require_weights,
)
from sdedit.families.flow import T5Embedder, flow_scheduler, read_configs, transformer_class
from sdedit.families.sd import ClipEmbedder, check_vae_fits
from sdedit.latent import LatentCodec, codec_from_vae
from sdedit.sources import ModelSourceError

__all__ = ["FAMILY", "FluxFamily", "FluxPromptEncoder", "flux_call", "pack", "unpack"]

SUPPORTED = ("the FluxPipeline layout (Flux.1 dev / schnell): transformer "
             "FluxTransformer2DModel (patch_size 1, in_channels = 4 x the VAE's latent "
             "channels), vae AutoencoderKL, text_encoder CLIPTextModel, text_encoder_2 "
             "T5EncoderModel, tokenizer CLIPTokenizer, tokenizer_2 T5TokenizerFast, scheduler "
             "FlowMatchEulerDiscreteScheduler")
EMBEDDED_GUIDANCE = 3.5
"""The guidance input of a guidance-distilled Flux (dev) when a job sets none."""
MAX_SEQUENCE_LENGTH = 512
"""T5 tokens per prompt (the Flux pipelines' `max_sequence_length` default)."""
PACK = 2
"""Latent cells per packed token along a side."""
FULL_STEPS = {True: 28, False: 4}
"""Evaluations over the whole time axis when `steps` is None, by `guidance_embeds`: the
pipeline's 28 for dev, 4 for the timestep-distilled schnell."""


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens (diffusers' `_pack_latents`)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) tokens -> (B, C, h, w) latents (diffusers' `_unpack_latents`)."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // PACK, w // PACK, d // (PACK * PACK), PACK, PACK)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, d // (PACK * PACK), h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """float32 (h/2 * w/2, 3): (0, row, column) of each packed token of an h x w latent."""
    ids = torch.zeros(h // PACK, w // PACK, 3)
    ids[..., 1] = torch.arange(h // PACK)[:, None]
    ids[..., 2] = torch.arange(w // PACK)[None, :]
    return ids.reshape(-1, 3)


def flux_call(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
              cond: Conditioning | None) -> torch.Tensor:
    """A FluxTransformer2DModel on unpacked latents x (B, C, h, w) at t = sigma * 1000 (B,):
    packed in, unpacked out."""
    assert cond is not None
    h, w = x.shape[2:]
    out = module(hidden_states=pack(x), timestep=t / 1000, guidance=cond.rows.get("guidance"),
                 pooled_projections=cond.rows["pooled_projections"],
                 encoder_hidden_states=cond.rows["encoder_hidden_states"],
                 txt_ids=cond.shared["txt_ids"], img_ids=cond.shared["img_ids"]).sample
    return unpack(out, h, w)


class FluxPromptEncoder(PromptEncoder):
    """Flux prompts: rows "encoder_hidden_states" float32 (B, 512, D_t5), "pooled_projections"
    (B, D_clip) and with `embedded` guidance "guidance" (B,); shared "txt_ids" (512, 3) and
    "img_ids" (h/2 * w/2, 3). `factor`: the VAE's pixels per latent cell."""

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module],
                 embedded: bool, factor: int) -> None:
        self.clip = ClipEmbedder(tokenizers[0], encoders[0])
        self.t5 = T5Embedder(tokenizers[1], encoders[1], MAX_SEQUENCE_LENGTH)
        self.spec = text_spec(embedded)
        self.factor = factor

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        if negatives is not None:
            raise ValueError("negative prompts are not used by Flux (no classifier-free "
                             "guidance); allowed: None")
        if (guidance is None) == (self.spec.guidance == "embedded"):
            raise ValueError(f"guidance={guidance!r}; allowed: a number for a "
                             "guidance-distilled Flux, else None")
        distinct, out = self.clip.run(prompts)
        pooled = self.clip.rows(prompts, distinct, out.pooler_output.float())
        sequence = self.t5.embed(prompts)
        rows = {"encoder_hidden_states": sequence, "pooled_projections": pooled}
        if guidance is not None:
            rows["guidance"] = torch.full((len(prompts),), float(guidance),
                                          device=sequence.device)
        h, w = size[0] // self.factor, size[1] // self.factor
        shared = {"txt_ids": sequence.new_zeros(sequence.shape[1], 3),
                  "img_ids": image_ids(h, w).to(sequence.device)}
        return Conditioning(rows, shared), None

    def windows(self) -> list[TokenWindow]:
        return [self.clip.window(), self.t5.window()]

    def modules(self) -> list[torch.nn.Module]:
        return [self.clip.encoder, self.t5.encoder]


def text_spec(embedded: bool) -> TextSpec:
    """"embedded" guidance (default 3.5) for a guidance-distilled Flux, else "none"."""
    return TextSpec("embedded", EMBEDDED_GUIDANCE) if embedded else TextSpec("none", None)


class FluxFamily:
    """Flux.1 dev and schnell."""

    name = "flux"
    weights_precision = "bf16"
    lora_loader = "FluxLoraLoaderMixin"

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        return bool(index) and transformer_class(directory) == "FluxTransformer2DModel"

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        weighted = ("transformer", "vae", "text_encoder", "text_encoder_2")
        configs = read_configs(directory, source, weighted, SUPPORTED)
        for part in ("tokenizer", "tokenizer_2"):
            if not (directory / part).is_dir():
                raise ModelSourceError(f"model source {source!r}: no {part}/ folder in "
                                       f"{directory}; supported: {SUPPORTED}")
        net, vae = configs["transformer"], configs["vae"]
        if net.get("patch_size", 1) != 1:
            raise ModelSourceError(f"model source {source!r}: transformer patch_size "
                                   f"{net.get('patch_size')}; supported: {SUPPORTED}")
        channels_in = int(net.get("in_channels", 64))
        channels_out = int(net.get("out_channels") or channels_in)
        if channels_in % 4 or channels_out % 4:
            raise ModelSourceError(f"model source {source!r}: transformer in/out channels "
                                   f"{channels_in}/{channels_out} are not 4 x the latent "
                                   f"channels; supported: {SUPPORTED}")
        check_vae_fits(vae, channels_in // 4, channels_out // 4, source,
                       SUPPORTED + " (Flux Fill, Canny and Depth add image channels)",
                       "transformer (unpacked)")
        require_weights(directory, weighted, source, SUPPORTED)
        process, scheduler, scheduler_path = flow_scheduler(directory, source)
        embedded = bool(net.get("guidance_embeds", False))
        process = replace(process, full_steps=FULL_STEPS[embedded])
        factor = 2 ** (len(vae.get("block_out_channels", (64,) * 4)) - 1)
        size = int(vae.get("sample_size", 128 * factor))  # FluxPipeline: 128 latent cells
        return ModelLayout(
            family=self.name, directory=directory, process=process,
            sample_size=(size, size), in_channels=int(vae.get("in_channels", 3)),
            downsample_factor=factor * PACK, text=text_spec(embedded), patch=PACK,
            configs={"index": dict(index), **configs, "scheduler": scheduler},
            paths={"scheduler": scheduler_path})

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        directory = layout.directory
        net = component(FluxTransformer2DModel, directory, "transformer", source)
        vae = component(AutoencoderKL, directory, "vae", source)
        encoders = [component(CLIPTextModel, directory, "text_encoder", source),
                    component(T5EncoderModel, directory, "text_encoder_2", source)]
        tokenizers = [component(CLIPTokenizer, directory, "tokenizer", source),
                      component(T5TokenizerFast, directory, "tokenizer_2", source)]
        codec = self.codec(vae)
        files = component_files(directory, ("transformer", "vae", "text_encoder",
                                            "text_encoder_2"), ("tokenizer", "tokenizer_2"))
        text = FluxPromptEncoder(tokenizers, encoders, layout.text is not None and
                                 layout.text.guidance == "embedded", codec.factor)
        return Loaded(net=net, call=flux_call, codec=codec, text=text,
                      files=[*files, layout.paths["scheduler"]])

    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        return codec_from_vae(vae)

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """LoRA parts "transformer" and "text_encoder" (CLIP), as diffusers' Flux loader has
        them."""
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel

        if net is not None:
            assert isinstance(text, FluxPromptEncoder)
            return {"transformer": net, "text_encoder": text.clip.encoder}
        assert layout is not None
        return {"transformer": meta_model(FluxTransformer2DModel,
                                          layout.directory / "transformer"),
                "text_encoder": meta_model(CLIPTextModel, layout.directory / "text_encoder")}


    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, Conditioning]:
        """See `Family.plan_inputs`."""
        net = layout.configs["transformer"]
        h, w = size[0] // (layout.downsample_factor // PACK), \
            size[1] // (layout.downsample_factor // PACK)
        cond = {"encoder_hidden_states": torch.zeros(rows, MAX_SEQUENCE_LENGTH,
                                                     int(net.get("joint_attention_dim", 4096))),
                "pooled_projections": torch.zeros(rows, int(net.get("pooled_projection_dim",
                                                                    768)))}
        if net.get("guidance_embeds"):
            cond["guidance"] = torch.zeros(rows)
        shared = {"txt_ids": torch.zeros(MAX_SEQUENCE_LENGTH, 3), "img_ids": image_ids(h, w)}
        return flux_call, Conditioning(cond, shared)

FAMILY = FluxFamily()
