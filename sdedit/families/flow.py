"""What the flow-matching families (SD3, Flux, Chroma, Qwen-Image, Z-Image) share: the checks of
a transformer pipeline's layout, its flow-matching scheduler, and the T5 prompt embedder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdedit.conditioning import TokenWindow
from sdedit.families.base import read_json, scheduler_process
from sdedit.families.sd import ClipEmbedder, warn_cuts
from sdedit.processes import FlowProcess
from sdedit.sources import ModelSourceError

__all__ = ["T5Embedder", "flow_scheduler", "present", "read_configs", "transformer_class"]


def transformer_class(directory: Path) -> str | None:
    """The `_class_name` of `transformer/config.json`, or None when missing or unreadable."""
    config = directory / "transformer" / "config.json"
    if not config.exists():
        return None
    try:
        return read_json(config, "").get("_class_name")
    except ModelSourceError:
        return None


def present(directory: Path, index: Mapping[str, Any], name: str) -> bool:
    """Whether optional part `name` is there: model_index.json names a class for it (as
    diffusers reads it) and its folder exists."""
    entry = index.get(name)
    named = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
    return named and (directory / name).is_dir()


def read_configs(directory: Path, source: str, parts: Sequence[str],
                 supported: str) -> dict[str, dict[str, Any]]:
    """Each part's config.json by name; ModelSourceError naming a missing folder or a quantized
    part (only full-precision weights load)."""
    configs = {}
    for part in parts:
        if not (directory / part).is_dir():
            raise ModelSourceError(f"model source {source!r}: no {part}/ folder in "
                                   f"{directory}; supported: {supported}")
        config = read_json(directory / part / "config.json", source)
        if config.get("quantization_config") is not None:
            method = config["quantization_config"].get("quant_method", "?")
            raise ModelSourceError(
                f"model source {source!r}: {part}/ holds quantized weights (quant_method "
                f"{method!r}); allowed: full-precision weights (fp32, fp16 or bf16 files, "
                "loaded as float32)")
        configs[part] = config
    return configs


def flow_scheduler(directory: Path, source: str) -> tuple[FlowProcess, dict[str, Any], Path]:
    """(the flow process, the scheduler config, its path) of a flow-matching pipeline."""
    path = directory / "scheduler" / "scheduler_config.json"
    config = read_json(path, source)
    process = scheduler_process(config, source)
    if not isinstance(process, FlowProcess):
        raise ModelSourceError(
            f"model source {source!r}: scheduler {config.get('_class_name')!r} with a "
            "transformer; allowed: FlowMatchEulerDiscreteScheduler (rectified flow)")
    return process, config, path


class T5Embedder:
    """A T5 tokenizer and encoder called as the SD3, Flux and Chroma pipelines call them: each
    text padded to `max_length` tokens, encoded without the attention mask or, `masked`
    (Chroma), with it; the last hidden state. `name`: the encoder's folder."""

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module, max_length: int,
                 masked: bool = False, name: str = "text_encoder_2") -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_length = max_length
        self.masked = masked
        self.name = name

    def window(self) -> TokenWindow:
        """The tokens of a prompt this encoder reads."""
        return TokenWindow(self.name, self.tokenizer, self.max_length)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 (len(texts), max_length, d_model); each distinct text encoded once."""
        return self.run(texts)[0]

    @torch.no_grad()
    def run(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 (len(texts), max_length, d_model), int64 (len(texts),) token counts with
        `</s>`); each distinct text encoded once."""
        distinct = list(dict.fromkeys(texts))
        tokens = self.tokenizer(distinct, padding="max_length", max_length=self.max_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        warn_cuts(self.window(), distinct)
        device = next(self.encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        out = self.encoder(tokens.input_ids.to(device),
                           attention_mask=mask if self.masked else None)[0].float()
        return (ClipEmbedder.rows(texts, distinct, out),
                ClipEmbedder.rows(texts, distinct, mask.sum(dim=1)))
