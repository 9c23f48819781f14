"""`Scorer`: the per-row scores of outputs, batched on the device, their inputs made on the host.

Scores are computed from the 8-bit outputs as written, so scoring after the fact gives the run's
scores; one CLIP forward serves `clip_score`, `aesthetic` and `embedding`. What each score is:
docs/scores.md."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.job.spec import ScoreSpec
from pipeline.score.models import Aesthetic, Clip, load_aesthetic, load_clip

__all__ = ["ScoreInput", "Scorer", "ssim"]

TEXT_CACHE = 4096
"""Prompts whose text embedding a scorer keeps (rows of one prompt share it)."""


@dataclass
class ScoreInput:
    """One output's scorer inputs, made in the host pool (`Scorer.prepare`)."""

    output: np.ndarray  # uint8 (H, W, 3), the output as written
    guide: np.ndarray | None  # uint8 (H, W, 3) for ssim
    pixel_values: torch.Tensor | None  # float32 (3, S, S), the CLIP processor's input
    text: str | None  # the text of clip_score, or None (null score)


def ssim(outputs: torch.Tensor, guides: torch.Tensor) -> torch.Tensor:
    """float32 (B,) SSIM of uint8 (B, 3, H, W) outputs and guides, with data_range 1 so that a
    row's score does not depend on its batch."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    values = structural_similarity_index_measure(
        outputs.float() / 255.0, guides.float() / 255.0, data_range=1.0, reduction="none")
    return values.reshape(-1).float()


class Scorer:
    """The scorers of a `score:` section on `device` (the edit's); `clip` and `aesthetic` are
    loaded from the spec unless given (tests). ScorerModelError when a model cannot be loaded or
    does not fit."""

    def __init__(self, spec: ScoreSpec, device: torch.device, clip: Clip | None = None,
                 aesthetic: Aesthetic | None = None) -> None:
        self.spec, self.device = spec, torch.device(device)
        self.metrics = set(spec.metrics)
        options = dict(spec.storage_options) or None
        self.clip = clip if clip is not None or not spec.uses_clip else \
            load_clip(spec.clip_model, self.device, options)
        self.aesthetic = aesthetic
        if "aesthetic" in self.metrics and aesthetic is None:
            assert spec.aesthetic_model is not None and self.clip is not None
            self.aesthetic = load_aesthetic(spec.aesthetic_model, self.device, self.clip.width,
                                            options)
        self._texts: dict[str, torch.Tensor] = {}

    def metadata(self) -> dict[str, Any]:
        """What makes these scores: settings, model identities, versions."""
        models = {}
        if self.clip is not None:
            models["clip"] = {"source": self.clip.source, "identity": self.clip.identity}
        if self.aesthetic is not None:
            models["aesthetic"] = {"source": self.aesthetic.source,
                                   "identity": self.aesthetic.identity}
        versions = {name: importlib.metadata.version(name)
                    for name in ("torch", "transformers", "torchmetrics")}
        return {"settings": self.spec.settings(), "models": models, "versions": versions,
                "ssim": {"data_range": 1.0, "kernel_size": 11, "sigma": 1.5}}

    def text_of(self, prompt: str | None) -> str | None:
        """The text of a row's clip_score: its prompt, else `score.prompt`, else None."""
        return prompt if prompt else self.spec.prompt

    def prepare(self, output: np.ndarray, guide: np.ndarray | None,
                prompt: str | None) -> ScoreInput:
        """One output's inputs (host work): `output` and `guide` uint8 (H, W, 3) as written and
        edited from, `prompt` None for unconditional models."""
        pixels = None if self.clip is None else self.clip.pixel_values(output)
        return ScoreInput(output, guide if "ssim" in self.metrics else None, pixels,
                          self.text_of(prompt))

    def score(self, inputs: Sequence[ScoreInput]) -> list[dict[str, Any]]:
        """Each input's scores (metric -> value), batched on the device."""
        results: list[dict[str, Any]] = [{} for _ in inputs]
        if not inputs:
            return results
        if "ssim" in self.metrics:
            self._ssim(inputs, results)
        if self.clip is not None:
            pixels = torch.stack([item.pixel_values for item in inputs])  # type: ignore[misc]
            images = self.clip.image_embeddings(pixels)
            if "clip_score" in self.metrics:
                texts = self._text_embeddings([item.text for item in inputs])
                for i, text in enumerate(texts):
                    results[i]["clip_score"] = None if text is None else float(
                        100.0 * torch.clamp((images[i].cpu() * text).sum(), min=0.0))
            if self.aesthetic is not None:
                for i, value in enumerate(self.aesthetic(images).cpu().tolist()):
                    results[i]["aesthetic"] = float(value)
            if "embedding" in self.metrics:
                for i, row in enumerate(images.cpu().numpy().astype(np.float16)):
                    results[i]["embedding"] = row
        return results

    def _ssim(self, inputs: Sequence[ScoreInput], results: list[dict[str, Any]]) -> None:
        """ssim per image, one call per image size (a batch may mix sizes)."""
        sizes: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(inputs):
            if item.guide is None or item.guide.shape != item.output.shape:
                results[i]["ssim"] = None
                continue
            sizes.setdefault(item.output.shape, []).append(i)
        for rows in sizes.values():
            outputs = torch.from_numpy(np.stack([inputs[i].output for i in rows]))
            guides = torch.from_numpy(np.stack([inputs[i].guide for i in rows]))  # type: ignore
            values = ssim(outputs.permute(0, 3, 1, 2).to(self.device),
                          guides.permute(0, 3, 1, 2).to(self.device))
            for i, value in zip(rows, values.cpu().tolist(), strict=True):
                results[i]["ssim"] = float(value)

    def _text_embeddings(self, texts: Sequence[str | None]) -> list[torch.Tensor | None]:
        """The (d,) CPU text embedding of each text (None for None), cached per text."""
        assert self.clip is not None
        new = sorted({t for t in texts if t is not None and t not in self._texts})
        if new:
            if len(self._texts) + len(new) > TEXT_CACHE:
                self._texts.clear()
            for text, row in zip(new, self.clip.text_embeddings(new).cpu(), strict=True):
                self._texts[text] = row
        return [None if t is None else self._texts[t] for t in texts]
