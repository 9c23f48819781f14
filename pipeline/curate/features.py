"""Image features for KID and FID (`inception`, `clip`, `torchscript`, `pixels`), and the images
they are made from. See docs/scores.md, "evaluation"."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.images import ImageError, decode_guide
from pipeline.input.reader import iter_raw, iter_samples
from pipeline.input.shards import expand_shards
from pipeline.output.folder import OutputFolder
from pipeline.score.models import Clip, load_clip

logger = logging.getLogger(__name__)

__all__ = ["FEATURES", "Features", "output_images", "reference_images"]

FEATURES = ("inception", "clip", "torchscript", "pixels")
PIXELS_SIDE = 16
BATCH = 32


@dataclass
class Features:
    """A feature extractor: `kind`, what it is (`describe`) and `__call__` on uint8 images."""

    kind: str
    describe: dict[str, Any]
    net: Any = None
    clip: Clip | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def make(cls, kind: str, device: torch.device, clip_model: str | None = None,
             inception_weights: str | None = None, feature_net: str | None = None
             ) -> Features:
        """The extractor of `kind`; PipelineError names what is missing (torch-fidelity, its
        weights, a CLIP model, the feature network)."""
        if kind == "torchscript":
            return cls._torchscript(device, feature_net)
        if kind == "pixels":
            return cls(kind, {"kind": kind, "size": PIXELS_SIDE, "dims": 3 * PIXELS_SIDE ** 2})
        if kind == "clip":
            if not clip_model:
                raise PipelineError("--features clip: no CLIP model; allowed: --clip-model, or "
                                    "an output whose score.clip_model is set")
            clip = load_clip(clip_model, device)
            return cls(kind, {"kind": kind, "model": clip_model, "identity": clip.identity,
                              "dims": clip.width}, clip=clip)
        if kind != "inception":
            raise PipelineError(f"--features {kind!r}; allowed: {', '.join(FEATURES)}")
        return cls(kind, {"kind": kind, "network": "torch-fidelity inception-v3-compat",
                          "dims": 2048}, net=_inception(device, inception_weights),
                   device=device)

    @classmethod
    def _torchscript(cls, device: torch.device, path: str | None) -> Features:
        if not path:
            raise PipelineError("--features torchscript: no network; allowed: --feature-net "
                                "PATH of a torch.jit.save'd module")
        try:
            net = torch.jit.load(path, map_location=device).eval()
            with torch.inference_mode():
                dims = int(net(torch.zeros(1, 3, 64, 64, device=device)).shape[-1])
        except Exception as exc:
            raise PipelineError(f"--feature-net {path}: cannot be used ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); allowed: a TorchScript module from float32 "
                                "(N, 3, H, W) in [0, 1] to (N, D) features") from exc
        from sdedit import files_identity

        identity = files_identity(Path(path).parent, [Path(path)])
        return cls("torchscript", {"kind": "torchscript", "path": path, "identity": identity,
                                   "dims": dims}, net=net, device=device)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float64 (N, D) features of uint8 (H, W, 3) images (sizes may differ)."""
        if self.kind == "pixels":
            return np.stack([np.asarray(Image.fromarray(im).resize(
                (PIXELS_SIDE, PIXELS_SIDE), Image.BOX), dtype=np.float64).reshape(-1) / 255.0
                for im in images])
        if self.kind == "clip":
            assert self.clip is not None
            pixels = torch.stack([self.clip.pixel_values(im) for im in images])
            return self.clip.image_embeddings(pixels).double().cpu().numpy()
        out = np.zeros((len(images), self.describe["dims"]))
        scale = 1.0 / 255 if self.kind == "torchscript" else None
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.shape, []).append(i)
        for rows in by_size.values():
            x = torch.from_numpy(np.stack([images[i] for i in rows])).permute(0, 3, 1, 2)
            x = x.to(self.device)
            if scale is not None:
                x = x.float() * scale
            with torch.inference_mode():
                out[rows] = self.net(x).double().cpu()
        return out

    def of(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """Features of every image of a stream, `BATCH` at a time."""
        parts, batch = [], []
        for image in images:
            batch.append(image)
            if len(batch) == BATCH:
                parts.append(self(batch))
                batch = []
        if batch:
            parts.append(self(batch))
        return np.concatenate(parts) if parts else np.zeros((0, self.describe["dims"]))


def _inception(device: torch.device, weights: str | None) -> Any:
    """torchmetrics' InceptionV3 (torch-fidelity's); a clear error when it cannot be had."""
    hint = ("; allowed: --features clip or pixels, or install torch-fidelity (pip install "
            "'sdedit-batch[inception]') where its weights can be downloaded once (the torch "
            "hub cache, ~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth) "
            "or pass them with --inception-weights PATH")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as exc:  # pragma: no cover - torchmetrics is a dependency
        raise PipelineError(f"--features inception: {exc}{hint}") from exc
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=weights)
    except ModuleNotFoundError as exc:
        raise PipelineError(f"--features inception needs torch-fidelity, which is not "
                            f"installed{hint}") from exc
    except Exception as exc:
        raise PipelineError(f"--features inception: its weights cannot be loaded "
                            f"({type(exc).__name__}: {str(exc)[:200]}){hint}") from exc
    return net.to(device)


def output_images(folder: OutputFolder, image_format: str, wanted: dict[str, set[str]]
                  ) -> Iterator[tuple[str, str, np.ndarray]]:
    """(stem, output key, uint8 image as written) of the `wanted` output keys of each stem."""
    for stem in sorted(wanted):
        keys = wanted[stem]
        for raw in iter_raw(folder.shard_urls(stem).tar, folder.options):
            if raw.key not in keys or raw.duplicate or image_format not in raw.members:
                continue
            try:
                image = decode_guide(raw.members[image_format], f"{raw.key}.{image_format}")
            except ImageError as exc:
                raise PipelineError(f"shard {stem}: {exc}") from exc
            yield stem, raw.key, image


def reference_images(patterns: Sequence[str], image: str | None = None,
                     storage_options: dict[str, Any] | None = None
                     ) -> Iterator[np.ndarray]:
    """The decoded images of reference shards; an undecodable sample is skipped and logged."""
    for url in expand_shards(list(patterns), storage_options):
        for sample in iter_samples(url, storage_options, image, None):
            if sample.guide is None:
                logger.warning("reference %s: skipped: %s", sample.key, sample.error)
                continue
            yield sample.guide
