"""LoRA adapters (Hu et al., 2021) on a loaded model: read with the family's diffusers loader,
checked key by key, then scaled and fused into the weights with peft.

Diffusers' loaders drop what they cannot convert with a log line only, so every
key of a file is checked by our own trace before loading, and a LoRA that does not fit is
refused by name. Fused, inference runs the plain network. docs/models.md#lora and
docs/open-models.md#lora-for-the-flow-families.
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
