"""Stable Diffusion 3 / 3.5: rectified-flow MMDiT transformers with two CLIP encoders and an
optional T5, prompts embedded exactly as `StableDiffusion3Img2ImgPipeline.encode_prompt` does
(without T5, zeros as diffusers). docs/models.md#flow-matching-models-sd3--sd35-flux.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from sdedit.families.flow import (
    T5Embedder,
    flow_scheduler,
    present,
    read_configs,
    transformer_class,
)
from sdedit.families.sd import ClipEmbedder, check_vae_fits, latent_sizes
from sdedit.latent import LatentCodec, codec_from_vae
from sdedit.sources import ModelSourceError

__all__ = ["FAMILY", "SD3Family", "SD3PromptEncoder", "sd3_call"]

SUPPORTED = ("the StableDiffusion3Pipeline layout (SD3 / SD3.5): transformer "
             "SD3Transformer2DModel, vae AutoencoderKL, text_encoder and text_encoder_2 "
             "CLIPTextModelWithProjection, text_encoder_3 T5EncoderModel (or none), tokenizer "
             "and tokenizer_2 CLIPTokenizer, tokenizer_3 T5TokenizerFast, scheduler "
             "FlowMatchEulerDiscreteScheduler")
DEFAULT_GUIDANCE = 7.0
"""Guidance scale when a job sets none (the img2img pipeline's)."""
MAX_SEQUENCE_LENGTH = 256
"""T5 tokens per prompt (the SD3 pipelines' `max_sequence_length` default)."""


class _ClipAt(ClipEmbedder):
    """A CLIP embedder padding to a given length (SD3's second tokenizer pads to the first's)."""

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module, max_length: int,
                 name: str) -> None:
        super().__init__(tokenizer, encoder, name)
        self._max_length = max_length

    @property
    def max_length(self) -> int:
        return self._max_length


class SD3PromptEncoder(PromptEncoder):
    """SD3 prompts: rows "encoder_hidden_states" float32 (B, L_clip + 256, D_t5) and
    "pooled_projections" float32 (B, P1 + P2). The T5 tokenizer and encoder may be None."""

    spec = TextSpec("cfg", DEFAULT_GUIDANCE)

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module | None],
                 joint_attention_dim: int) -> None:
        length = int(tokenizers[0].model_max_length)
        self.clips = [_ClipAt(tokenizers[i], encoders[i], length, name)
                      for i, name in enumerate(("text_encoder", "text_encoder_2"))]
        t5 = encoders[2]
        self.t5 = None if t5 is None else T5Embedder(tokenizers[2], t5, MAX_SEQUENCE_LENGTH,
                                                     name="text_encoder_3")
        self.joint_attention_dim = joint_attention_dim

    def embed(self, texts: Sequence[str]) -> Conditioning:
        """The conditioning rows of `texts`."""
        hidden, pooled = [], []
        for clip in self.clips:
            distinct, out = clip.run(texts, hidden_states=True)
            hidden.append(clip.rows(texts, distinct, out.hidden_states[-2].float()))
            pooled.append(clip.rows(texts, distinct, out[0].float()))
        joined = torch.cat(hidden, dim=-1)
        if self.t5 is not None:
            t5 = self.t5.embed(texts)
        else:
            t5 = joined.new_zeros(len(texts), MAX_SEQUENCE_LENGTH, self.joint_attention_dim)
        joined = torch.nn.functional.pad(joined, (0, t5.shape[-1] - joined.shape[-1]))
        return Conditioning({"encoder_hidden_states": torch.cat([joined, t5], dim=-2),
                             "pooled_projections": torch.cat(pooled, dim=-1)})

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        n = len(prompts)
        both = self.embed(prompts + negatives if negatives is not None else prompts)
        if negatives is None:
            return both, None
        return both.take(slice(0, n)), both.take(slice(n, None))

    def windows(self) -> list[TokenWindow]:
        return [clip.window() for clip in self.clips] + \
            ([] if self.t5 is None else [self.t5.window()])

    def modules(self) -> list[torch.nn.Module]:
        t5 = [] if self.t5 is None else [self.t5.encoder]
        return [clip.encoder for clip in self.clips] + t5


def sd3_call(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
             cond: Conditioning | None) -> torch.Tensor:
    """An SD3Transformer2DModel on latents x (B, C, h, w) at timesteps t = sigma * 1000 (B,)."""
    assert cond is not None
    return module(hidden_states=x, timestep=t,
                  encoder_hidden_states=cond.rows["encoder_hidden_states"],
                  pooled_projections=cond.rows["pooled_projections"]).sample


class SD3Family:
    """SD3 / SD3.5."""

    name = "sd3"
    weights_precision = "bf16"
    lora_loader = "SD3LoraLoaderMixin"

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        return bool(index) and transformer_class(directory) == "SD3Transformer2DModel"

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        t5 = present(directory, index, "text_encoder_3")
        weighted = ("transformer", "vae", "text_encoder", "text_encoder_2") + \
            (("text_encoder_3",) if t5 else ())
        configs = read_configs(directory, source, weighted, SUPPORTED)
        for part in ("tokenizer", "tokenizer_2") + (("tokenizer_3",) if t5 else ()):
            if not (directory / part).is_dir():
                raise ModelSourceError(f"model source {source!r}: no {part}/ folder in "
                                       f"{directory}; supported: {SUPPORTED}")
        net, vae = configs["transformer"], configs["vae"]
        check_vae_fits(vae, net.get("in_channels", 16), net.get("out_channels") or
                       net.get("in_channels", 16), source, SUPPORTED, "transformer")
        pooled = sum(int(configs[p].get("projection_dim", 512))
                     for p in ("text_encoder", "text_encoder_2"))
        if pooled != net.get("pooled_projection_dim", 2048):
            raise ModelSourceError(
                f"model source {source!r}: the CLIP encoders' projections ({pooled} together) "
                f"do not fit transformer pooled_projection_dim "
                f"{net.get('pooled_projection_dim', 2048)}; supported: {SUPPORTED}")
        if t5 and configs["text_encoder_3"].get("d_model") != net.get("joint_attention_dim",
                                                                      4096):
            raise ModelSourceError(
                f"model source {source!r}: text_encoder_3 d_model "
                f"{configs['text_encoder_3'].get('d_model')} differs from transformer "
                f"joint_attention_dim {net.get('joint_attention_dim', 4096)}; supported: "
                f"{SUPPORTED}")
        require_weights(directory, weighted, source, SUPPORTED)
        process, scheduler, scheduler_path = flow_scheduler(directory, source)
        patch = int(net.get("patch_size", 2))
        return ModelLayout(
            family=self.name, directory=directory, process=process,
            text=SD3PromptEncoder.spec, patch=patch,
            configs={"index": dict(index), **configs, "scheduler": scheduler},
            paths={"scheduler": scheduler_path},
            **latent_sizes(directory, source, {"sample_size": 128, **net}, vae, patch))

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        directory = layout.directory
        t5 = "text_encoder_3" in layout.configs
        net = component(SD3Transformer2DModel, directory, "transformer", source)
        vae = component(AutoencoderKL, directory, "vae", source)
        encoders = [component(CLIPTextModelWithProjection, directory, name, source)
                    for name in ("text_encoder", "text_encoder_2")]
        tokenizers = [component(CLIPTokenizer, directory, name, source)
                      for name in ("tokenizer", "tokenizer_2")]
        encoders.append(component(T5EncoderModel, directory, "text_encoder_3", source)
                        if t5 else None)
        tokenizers.append(component(T5TokenizerFast, directory, "tokenizer_3", source)
                          if t5 else None)
        weighted = ("transformer", "vae", "text_encoder", "text_encoder_2") + \
            (("text_encoder_3",) if t5 else ())
        texts = ("tokenizer", "tokenizer_2") + (("tokenizer_3",) if t5 else ())
        files = component_files(directory, weighted, texts)
        text = SD3PromptEncoder(tokenizers, encoders,
                                int(layout.configs["transformer"].get("joint_attention_dim",
                                                                      4096)))
        return Loaded(net=net, call=sd3_call, codec=self.codec(vae), text=text,
                      files=[*files, layout.paths["scheduler"]])

    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        return codec_from_vae(vae)

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """LoRA parts "transformer" and the CLIP encoders, as diffusers' SD3 loader has them."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        if net is not None:
            assert isinstance(text, SD3PromptEncoder)
            return {"transformer": net, "text_encoder": text.clips[0].encoder,
                    "text_encoder_2": text.clips[1].encoder}
        assert layout is not None
        return {"transformer": meta_model(SD3Transformer2DModel,
                                          layout.directory / "transformer"),
                **{name: meta_model(CLIPTextModelWithProjection, layout.directory / name)
                   for name in ("text_encoder", "text_encoder_2")}}


    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, Conditioning]:
        """See `Family.plan_inputs`."""
        net = layout.configs["transformer"]
        clip = int(layout.configs["text_encoder"].get("max_position_embeddings", 77))
        return sd3_call, Conditioning({
            "encoder_hidden_states": torch.zeros(rows, clip + MAX_SEQUENCE_LENGTH,
                                                 int(net.get("joint_attention_dim", 4096))),
            "pooled_projections": torch.zeros(rows, int(net.get("pooled_projection_dim",
                                                                2048)))})

FAMILY = SD3Family()
