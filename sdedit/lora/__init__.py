"""LoRA adapters (Hu et al., 2021) on a loaded model: read with diffusers' LoRA loaders,
injected with peft, scaled and fused into the weights.

A LoRA is a file of low-rank weight updates W' = W + scale * (alpha / r) * B A for some layers
of the denoising network and the text encoders. Its keys name the part they adapt ("unet.",
"transformer.", "text_encoder.", "text_encoder_2." as diffusers saves them; kohya / A1111 /
ai-toolkit and trainer files are converted by the family's diffusers `lora_state_dict`). A
model family that takes LoRAs says which parts there are (`Family.lora_loader` and
`Family.lora_modules`): SD and SDXL (UNet + CLIP), SD3 (transformer + both CLIP encoders),
Flux (transformer + CLIP), Chroma, Qwen-Image and Z-Image (transformer); the pixel family
refuses them.

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
network built on the meta device), every key of the file is checked by our own check, not the
loader's: each tensor is traced through diffusers' conversion (`coverage`: a key it drops, such
as a DoRA scale, is named unless it is all zeros), and each converted key must name a layer the
model has, with shapes that fit. A LoRA that does not fit is refused naming its keys; nothing
is silently dropped (diffusers only logs unexpected keys, and its Qwen-Image loader adapts
half of a file that mixes lora.down and lora_A keys).
"""

from sdedit.lora.check import (
    Lora,
    LoraTargets,
    checked_lora,
    lora_fit,
    lora_mismatches,
    lora_targets,
)
from sdedit.lora.files import lora_file, lora_kind
from sdedit.lora.fuse import apply_loras

__all__ = ["Lora", "LoraTargets", "apply_loras", "checked_lora", "lora_file", "lora_fit",
           "lora_kind", "lora_mismatches", "lora_targets"]
