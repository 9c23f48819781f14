"""Qwen-Image: a rectified-flow MMDiT on 2 x 2-packed latents of a one-frame video VAE, prompted
through Qwen2.5-VL, as `QwenImageImg2ImgPipeline` runs it.

Prompts of a batch are zero-padded to the longest and the transformer masks the padding, so a
row's output does not depend on its batch. Template, true CFG and `shift_terminal`:
docs/open-models.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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
from sdedit.families.flux import PACK, pack, unpack
from sdedit.latent import LatentCodec
from sdedit.sources import ModelSourceError

logger = logging.getLogger(__name__)

__all__ = ["FAMILY", "QwenImageFamily", "QwenPromptEncoder", "qwen_call"]

SUPPORTED = ("the QwenImagePipeline layout (Qwen-Image): transformer "
             "QwenImageTransformer2DModel (patch_size 2, in_channels = 4 x the VAE's z_dim), "
             "vae AutoencoderKLQwenImage, text_encoder Qwen2_5_VLForConditionalGeneration, "
             "tokenizer Qwen2Tokenizer, scheduler FlowMatchEulerDiscreteScheduler")
PIPELINES = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
"""model_index classes taken (Edit, Layered and ControlNet take more than a prompt)."""
DEFAULT_GUIDANCE = 4.0
FULL_STEPS = 50
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, "
            "texture, quantity, text, spatial relationships of the objects and background:"
            "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
DROP = 34
"""Template tokens before the prompt that the pipeline drops from the embedding."""
TOKENIZER_MAX = 1024
MAX_SEQUENCE_LENGTH = 512
"""Prompt tokens kept (the img2img pipeline's `max_sequence_length` default)."""
TILE = 1024
"""Image side above which the VAE tiles (the pipeline's default_sample_size 128 x 8)."""
REFUSED_OPTIONS = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
"""Transformer options of other Qwen-Image variants (Edit-2511, Layered)."""


@dataclass
class QwenCodec(LatentCodec):
    """The video VAE on one-frame clips: (N, 3, H, W) <-> (N, z_dim, H/f, W/f), normalised by
    per-channel latents_mean (`shift_factor`) and 1 / latents_std (`scaling_factor`). Tiled
    only above `TILE` px a side, as the pipeline (which does not tile at 1024 px); the class's
    own tiling would start at 256 px."""

    def bound_memory(self) -> None:
        """Tiling on above `TILE` px, in tiles of `TILE` overlapping by a quarter."""
        stride = TILE * 3 // 4
        self.vae.enable_tiling(tile_sample_min_height=TILE, tile_sample_min_width=TILE,
                               tile_sample_stride_height=stride, tile_sample_stride_width=stride)

    def posterior_mean(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.unsqueeze(2)).latent_dist.mean[:, :, 0]

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.unsqueeze(2)).sample[:, :, 0]


def qwen_codec(vae: Any) -> QwenCodec:
    config = vae.config
    return QwenCodec(vae=vae, factor=2 ** len(config.temperal_downsample),
                     channels=int(config.z_dim),
                     shift_factor=torch.tensor(config.latents_mean).view(1, -1, 1, 1),
                     scaling_factor=1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1))


def qwen_call(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
              cond: Conditioning | None) -> torch.Tensor:
    """A QwenImageTransformer2DModel on unpacked latents x (B, C, h, w) at t = sigma * 1000 (B,)."""
    assert cond is not None
    h, w = x.shape[2:]
    out = module(hidden_states=pack(x), timestep=t / 1000,
                 encoder_hidden_states=cond.rows["encoder_hidden_states"],
                 encoder_hidden_states_mask=cond.rows["encoder_hidden_states_mask"],
                 img_shapes=[[(1, h // PACK, w // PACK)]] * x.shape[0], return_dict=False)[0]
    return unpack(out, h, w)


class QwenPromptEncoder(PromptEncoder):
    """Qwen-Image prompts: rows "encoder_hidden_states" float32 (B, L, D), zero-padded to the
    call's longest text, and "encoder_hidden_states_mask" bool (B, L), True on its own tokens."""

    spec = TextSpec("cfg", DEFAULT_GUIDANCE)

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Conditioning:
        """The rows of `texts`, each distinct text encoded once."""
        distinct = list(dict.fromkeys(texts))
        tokens = self.tokenizer([TEMPLATE.format(t) for t in distinct], padding=True,
                                truncation=True, max_length=TOKENIZER_MAX + DROP,
                                return_tensors="pt")
        device = next(self.encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = self.encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                              output_hidden_states=True).hidden_states[-1].float()
        pieces = [hidden[i][mask[i].bool()][DROP:] for i in range(len(distinct))]
        long = [t for t, p in zip(distinct, pieces, strict=True) if len(p) > MAX_SEQUENCE_LENGTH]
        if long:
            logger.warning("%d prompt(s) cut to %d Qwen-Image text tokens, e.g. %r", len(long),
                           MAX_SEQUENCE_LENGTH, long[0][:80])
        pieces = [p[:MAX_SEQUENCE_LENGTH] for p in pieces]
        width = max(len(p) for p in pieces)
        embeds = hidden.new_zeros(len(pieces), width, hidden.shape[-1])
        valid = torch.zeros(len(pieces), width, dtype=torch.bool, device=device)
        for i, piece in enumerate(pieces):
            embeds[i, :len(piece)] = piece
            valid[i, :len(piece)] = True
        where = {text: i for i, text in enumerate(distinct)}
        rows = torch.tensor([where[t] for t in texts], device=device)
        return Conditioning({"encoder_hidden_states": embeds[rows],
                             "encoder_hidden_states_mask": valid[rows]})

    def windows(self) -> list[TokenWindow]:
        """The prompt in its template, less the dropped template tokens, at most 512."""
        return [TokenWindow("text_encoder", self.tokenizer, MAX_SEQUENCE_LENGTH,
                            TEMPLATE.format, DROP)]

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        n = len(prompts)
        both = self.embed(prompts + negatives if negatives is not None else prompts)
        if negatives is None:
            return both, None
        return both.take(slice(0, n)), both.take(slice(n, None))

    def combine(self, pred_u: torch.Tensor, pred_c: torch.Tensor,
                scale: float) -> torch.Tensor:
        """pred_u + g (pred_c - pred_u), rescaled per 2 x 2 packed token to pred_c's norm
        (QwenImageImg2ImgPipeline's true CFG)."""
        b, c, h, w = pred_c.shape
        shape = (b, c, h // PACK, PACK, w // PACK, PACK)
        guided = (pred_u + scale * (pred_c - pred_u)).reshape(shape)
        dims = (1, 3, 5)
        ratio = torch.linalg.vector_norm(pred_c.reshape(shape), dim=dims, keepdim=True) / \
            torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
        return (guided * ratio).reshape(b, c, h, w)

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder]


class QwenImageFamily:
    """Qwen-Image (text-to-image weights)."""

    name = "qwen-image"
    weights_precision = "bf16"
    lora_loader = "QwenImageLoraLoaderMixin"

    def claims(self, directory: Path, index: Mapping[str, Any]) -> bool:
        return bool(index) and transformer_class(directory) == "QwenImageTransformer2DModel"

    def inspect(self, directory: Path, source: str,
                index: Mapping[str, Any]) -> ModelLayout:
        def refuse(problem: str) -> ModelSourceError:
            return ModelSourceError(f"model source {source!r}: {problem}; supported: {SUPPORTED}")

        pipeline = index.get("_class_name")
        if pipeline not in PIPELINES:
            raise refuse(f"model_index.json names {pipeline!r} (allowed: "
                         f"{', '.join(PIPELINES)}: Edit, Layered and ControlNet models take "
                         "more than a prompt)")
        weighted = ("transformer", "vae", "text_encoder")
        configs = read_configs(directory, source, weighted, SUPPORTED)
        if not (directory / "tokenizer").is_dir():
            raise refuse(f"no tokenizer/ folder in {directory}")
        net, vae, text = configs["transformer"], configs["vae"], configs["text_encoder"]
        used = [f"{name}={net[name]!r}" for name in REFUSED_OPTIONS if net.get(name)]
        if used:
            raise refuse(f"transformer {', '.join(used)} (another Qwen-Image variant)")
        if vae.get("_class_name") != "AutoencoderKLQwenImage":
            raise refuse(f"vae class {vae.get('_class_name')!r}")
        z_dim = int(vae.get("z_dim", 16))
        if len(vae.get("latents_mean") or ()) != z_dim or \
                len(vae.get("latents_std") or ()) != z_dim:
            raise refuse(f"vae latents_mean / latents_std do not have z_dim={z_dim} values")
        if net.get("patch_size", 2) != PACK or int(net.get("in_channels", 64)) != 4 * z_dim \
                or int(net.get("out_channels") or 16) != z_dim:
            raise refuse(f"transformer patch_size {net.get('patch_size')}, in/out channels "
                         f"{net.get('in_channels')}/{net.get('out_channels')} do not fit the "
                         f"VAE's z_dim {z_dim} (2 x 2 packing)")
        width = (text.get("text_config") or {}).get("hidden_size", text.get("hidden_size"))
        if width != net.get("joint_attention_dim", 3584):
            raise refuse(f"text_encoder hidden_size {width} differs from transformer "
                         f"joint_attention_dim {net.get('joint_attention_dim', 3584)}")
        require_weights(directory, weighted, source, SUPPORTED)
        process, scheduler, scheduler_path = flow_scheduler(directory, source)
        factor = 2 ** len(vae.get("temperal_downsample", (False, True, True)))
        size = 128 * factor                        # the pipeline's default_sample_size
        return ModelLayout(
            family=self.name, directory=directory, process=replace(process,
                                                                   full_steps=FULL_STEPS),
            sample_size=(size, size), in_channels=3, downsample_factor=factor * PACK,
            text=QwenPromptEncoder.spec, patch=PACK,
            configs={"index": dict(index), **configs, "scheduler": scheduler},
            paths={"scheduler": scheduler_path})

    def load(self, layout: ModelLayout, source: str) -> Loaded:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        directory = layout.directory
        net = component(QwenImageTransformer2DModel, directory, "transformer", source)
        vae = component(AutoencoderKLQwenImage, directory, "vae", source)
        encoder = component(Qwen2_5_VLForConditionalGeneration, directory, "text_encoder",
                            source)
        tokenizer = component(Qwen2Tokenizer, directory, "tokenizer", source)
        files = component_files(directory, ("transformer", "vae", "text_encoder"),
                                ("tokenizer",))
        return Loaded(net=net, call=qwen_call, codec=self.codec(vae),
                      text=QwenPromptEncoder(tokenizer, encoder),
                      files=[*files, layout.paths["scheduler"]])

    def codec(self, vae: torch.nn.Module) -> LatentCodec:
        return qwen_codec(vae)

    def lora_modules(self, layout: ModelLayout | None, net: torch.nn.Module | None = None,
                     text: PromptEncoder | None = None) -> dict[str, torch.nn.Module]:
        """The LoRA part "transformer", the only one diffusers' loader adapts."""
        from diffusers import QwenImageTransformer2DModel

        return transformer_lora_modules(QwenImageTransformer2DModel, layout, net)

    def plan_inputs(self, layout: ModelLayout, rows: int, size: tuple[int, int]
                    ) -> tuple[NetCall, Conditioning]:
        """See `Family.plan_inputs`."""
        width = int(layout.configs["transformer"].get("joint_attention_dim", 3584))
        return qwen_call, Conditioning(
            {"encoder_hidden_states": torch.zeros(rows, MAX_SEQUENCE_LENGTH, width),
             "encoder_hidden_states_mask": torch.ones(rows, MAX_SEQUENCE_LENGTH,
                                                      dtype=torch.bool)})

FAMILY = QwenImageFamily()
