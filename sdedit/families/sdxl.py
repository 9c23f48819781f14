"""Stable Diffusion XL base and refiner: latent VP models conditioned on two CLIP text encoders
and size ids, with prompts encoded as `StableDiffusionXLImg2ImgPipeline.encode_prompt` does.

The size ids are the guide's own size, so a batch holds guides of one size.
Layout, refiner and VAE details: docs/models.md#sdxl.
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
    read_json,
    require_weights,
    scheduler_process,
)
from sdedit.families.sd import ClipEmbedder, check_vae_fits, is_xl_layout, latent_sizes
from sdedit.latent import LatentCodec, codec_from_vae
from sdedit.processes import VPProcess
from sdedit.sources import ModelSourceError

__all__ = ["FAMILY", "SdxlFamily", "SdxlPromptEncoder", "sdxl_call"]

SUPPORTED = ("the StableDiffusionXL layout: unet UNet2DConditionModel (addition_embed_type "
             "text_time), vae AutoencoderKL, text_encoder CLIPTextModel (absent in the refiner), "
             "text_encoder_2 CLIPTextModelWithProjection, tokenizer / tokenizer_2 CLIPTokenizer, "
             "a VP scheduler")
DEFAULT_GUIDANCE = 5.0
"""Guidance scale when a job sets none (the img2img pipeline's)."""
AESTHETIC_SCORES = (6.0, 2.5)
"""The refiner's aesthetic scores of prompt and negative prompt (diffusers' defaults)."""


def sdxl_call(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
              cond: Conditioning | None) -> torch.Tensor:
    """An SDXL UNet: prompt embeddings as `encoder_hidden_states`, the pooled vector and the
    time ids as `added_cond_kwargs`."""
    assert cond is not None, "an SDXL UNet is text-conditioned"
    rows = cond.rows
    return module(x, t, encoder_hidden_states=rows["encoder_hidden_states"],
                  added_cond_kwargs={"text_embeds": rows["text_embeds"],
                                     "time_ids": rows["time_ids"]}).sample


class SdxlPromptEncoder(PromptEncoder):
    """SDXL prompts: the `embedders`' penultimate hidden states joined (the last one's
    `text_embeds` are the pooled vector); empty negatives give zeros when `zeros_for_empty`;
    `aesthetic`: the refiner's (prompt, negative) scores, or None for the base's size ids."""

    spec = TextSpec("cfg", DEFAULT_GUIDANCE)

    def __init__(self, embedders: Sequence[ClipEmbedder], zeros_for_empty: bool,
                 aesthetic: tuple[float, float] | None) -> None:
        self.embedders = list(embedders)
        self.zeros_for_empty = zeros_for_empty
        self.aesthetic = aesthetic

    @property
    def encoders(self) -> list[torch.nn.Module]:
        return [e.encoder for e in self.embedders]

    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 (N, L, sum of widths) prompt embeddings, float32 (N, P) pooled vectors)."""
        parts, pooled = [], None
        for embedder in self.embedders:
            distinct, out = embedder.run(texts, hidden_states=True)
            parts.append(embedder.rows(texts, distinct, out.hidden_states[-2].float()))
            pooled = getattr(out, "text_embeds", None)
            pooled = None if pooled is None else embedder.rows(texts, distinct, pooled.float())
        if pooled is None:
            raise ModelSourceError("the last SDXL text encoder gives no text_embeds; allowed: "
                                   "a CLIPTextModelWithProjection as text_encoder_2")
        return torch.cat(parts, dim=-1), pooled

    def time_ids(self, size: tuple[int, int], n: int, negative: bool,
                 device: torch.device) -> torch.Tensor:
        """float32 (n, 6) (H, W, 0, 0, H, W), or (n, 5) (H, W, 0, 0, aesthetic score)."""
        height, width = size
        tail = (height, width) if self.aesthetic is None else (self.aesthetic[int(negative)],)
        ids = torch.tensor([height, width, 0, 0, *tail], dtype=torch.float32, device=device)
        return ids.expand(n, -1).contiguous()

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        n = len(prompts)
        zeroed = [self.zeros_for_empty and not text for text in negatives or []]
        texts = prompts + [t for t, zero in zip(negatives or [], zeroed, strict=True) if not zero]
        hidden, pooled = self.embed(texts)
        device = hidden.device
        cond = Conditioning({"encoder_hidden_states": hidden[:n], "text_embeds": pooled[:n],
                             "time_ids": self.time_ids(size, n, False, device)})
        if negatives is None:
            return cond, None
        uncond_hidden = hidden.new_zeros((n, *hidden.shape[1:]))
        uncond_pooled = pooled.new_zeros((n, *pooled.shape[1:]))
        encoded = torch.tensor([i for i, zero in enumerate(zeroed) if not zero],
                               dtype=torch.long, device=device)
        uncond_hidden[encoded] = hidden[n:]
        uncond_pooled[encoded] = pooled[n:]
        return cond, Conditioning({"encoder_hidden_states": uncond_hidden,
                                   "text_embeds": uncond_pooled,
                                   "time_ids": self.time_ids(size, n, True, device)})

    def windows(self) -> list[TokenWindow]:
        return [e.window() for e in self.embedders]

    def modules(self) -> list[torch.nn.Module]:
        return self.encoders


def _has(index: Mapping[str, Any], directory: Path, name: str) -> bool:
    """Whether the pipeline has component `name` (the refiner's text_encoder is [null, null])."""
    entry = index.get(name)
    listed = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
    return listed and (directory / name).is_dir()


class SdxlFamily:
    """SDXL base and refiner."""

    name = "sdxl"
    weights_precision = "fp16"
    lora_loader = "StableDiffusionXLLoraLoaderMixin"

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        config = directory / "unet" / "config.json"
        if not index or not config.exists() or not is_xl_layout(directory, index):
            return False
        try:
            return read_json(config, "").get("_class_name") == "UNet2DConditionModel"
        except ModelSourceError:
            return False

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        def problem(text: str) -> ModelSourceError:
            return ModelSourceError(f"model source {source!r}: {text}; supported: {SUPPORTED}")

        first = _has(index, directory, "text_encoder")
        parts = ("unet", "vae", "text_encoder_2", "tokenizer_2") + \
            (("text_encoder", "tokenizer") if first else ())
        for part in parts:
            if not (directory / part).is_dir():
                raise problem(f"no {part}/ folder in {directory}")
        unet = read_json(directory / "unet" / "config.json", source)
        vae = read_json(directory / "vae" / "config.json", source)
        encoders = {name: read_json(directory / name / "config.json", source)
                    for name in ("text_encoder", "text_encoder_2")[0 if first else 1:]}
        scheduler_path = directory / "scheduler" / "scheduler_config.json"
        scheduler = read_json(scheduler_path, source)
        process = scheduler_process(scheduler, source)
        if not isinstance(process, VPProcess):
            raise problem(f"scheduler {scheduler.get('_class_name')!r} is not a VP scheduler")
        if unet.get("addition_embed_type") != "text_time":
            raise problem(f"unet config addition_embed_type="
                          f"{unet.get('addition_embed_type')!r}; SDXL needs 'text_time'")
        for key in ("class_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type"):
            if unet.get(key) is not None:
                raise problem(f"unet config {key}={unet.get(key)!r} is not supported (extra "
                              "conditioning)")
        second = encoders["text_encoder_2"]
        if "CLIPTextModelWithProjection" not in second.get("architectures", [
                "CLIPTextModelWithProjection"]) or "projection_dim" not in second:
            raise problem("text_encoder_2 is not a CLIPTextModelWithProjection (no pooled "
                          "projection)")
        _check_widths(unet, encoders, bool(index.get("requires_aesthetics_score", False)),
                      problem)
        check_vae_fits(vae, unet.get("in_channels", 4), unet.get("out_channels", 4), source,
                       SUPPORTED)
        require_weights(directory, ("unet", "vae", *encoders), source, SUPPORTED)
        net_factor = 2 ** (len(unet.get("down_block_types", ())) - 1)
        return ModelLayout(
            family=self.name, directory=directory, process=process, text=SdxlPromptEncoder.spec,
            configs={"index": dict(index), "unet": unet, "vae": vae, "scheduler": scheduler,
                     **encoders},
            paths={"scheduler": scheduler_path, "index": directory / "model_index.json"},
            **latent_sizes(directory, source, unet, vae, net_factor))

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        directory, index = layout.directory, layout.configs["index"]
        first = "text_encoder" in layout.configs
        unet = component(UNet2DConditionModel, directory, "unet", source)
        vae = component(AutoencoderKL, directory, "vae", source)
        embedders = [ClipEmbedder(component(CLIPTokenizer, directory, "tokenizer", source),
                                  component(CLIPTextModel, directory, "text_encoder", source))
                     ] if first else []
        embedders.append(ClipEmbedder(
            component(CLIPTokenizer, directory, "tokenizer_2", source),
            component(CLIPTextModelWithProjection, directory, "text_encoder_2", source),
            "text_encoder_2"))
        lengths = {e.max_length for e in embedders}
        if len(lengths) > 1:
            raise ModelSourceError(f"model source {source!r}: tokenizer and tokenizer_2 have "
                                   f"different model_max_length {sorted(lengths)}; their "
                                   "embeddings are joined token by token, so they must match")
        aesthetic = AESTHETIC_SCORES if index.get("requires_aesthetics_score") else None
        text = SdxlPromptEncoder(embedders, bool(index.get("force_zeros_for_empty_prompt", True)),
                                 aesthetic)
        weighted = ("unet", "vae", *(("text_encoder",) if first else ()), "text_encoder_2")
        files = component_files(directory, weighted,
                                (*(("tokenizer",) if first else ()), "tokenizer_2"))
        return Loaded(net=unet, call=sdxl_call, codec=self.codec(vae), text=text,
                      files=[*files, layout.paths["scheduler"], layout.paths["index"]])

    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        return codec_from_vae(vae)

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """LoRA parts "unet", "text_encoder" (not in the refiner) and "text_encoder_2"."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        if net is not None:
            assert isinstance(text, SdxlPromptEncoder)
            names = ["text_encoder", "text_encoder_2"][-len(text.encoders):]
            return {"unet": net, **dict(zip(names, text.encoders, strict=True))}
        assert layout is not None
        classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
                   "text_encoder_2": CLIPTextModelWithProjection}
        return {name: meta_model(cls, layout.directory / name)
                for name, cls in classes.items() if name in layout.configs}

    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, Conditioning]:
        """See `Family.plan_inputs`."""
        unet, second = layout.configs["unet"], layout.configs["text_encoder_2"]
        length = int(second.get("max_position_embeddings", 77))
        ids = 5 if layout.configs["index"].get("requires_aesthetics_score") else 6
        return sdxl_call, Conditioning({
            "encoder_hidden_states": torch.zeros(rows, length, int(unet["cross_attention_dim"])),
            "text_embeds": torch.zeros(rows, int(second["projection_dim"])),
            "time_ids": torch.zeros(rows, ids)})


def _check_widths(unet: Mapping[str, Any], encoders: Mapping[str, Mapping[str, Any]],
                  aesthetic: bool, problem: Any) -> None:
    """The text widths and time ids fit the UNet (diffusers' `_get_add_time_ids` check, on the
    configs)."""
    width = sum(int(c.get("hidden_size", 0)) for c in encoders.values())
    cross = unet.get("cross_attention_dim")
    if isinstance(cross, int) and cross != width:
        raise problem(f"unet cross_attention_dim {cross} is not the text encoders' joined "
                      f"width {width}")
    ids = 5 if aesthetic else 6
    time_dim = int(unet.get("addition_time_embed_dim") or 0)
    passed = time_dim * ids + int(encoders["text_encoder_2"]["projection_dim"])
    expected = unet.get("projection_class_embeddings_input_dim")
    if expected != passed:
        hint = ""
        if isinstance(expected, int) and expected - passed == time_dim * (1 if aesthetic else -1):
            hint = (f" (the UNet takes {6 if aesthetic else 5} time ids: model_index.json "
                    f"requires_aesthetics_score should be {str(not aesthetic).lower()})")
        raise problem(f"unet projection_class_embeddings_input_dim is {expected}, but "
                      f"{ids} time ids x {time_dim} + the pooled width "
                      f"{encoders['text_encoder_2']['projection_dim']} give {passed}{hint}")


FAMILY = SdxlFamily()
