"""The scorer models: a CLIP model with its processor and the LAION improved aesthetic predictor,
loaded from a hub id, a local path or an fsspec URL, with their identities.

CLIP is found as the diffusion model is (`sdedit.resolve`). The aesthetic predictor is the
published MLP without activations on the L2-normalised CLIP image embedding; its layout is
checked against `AESTHETIC_KEYS`. See docs/scores.md."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ScorerModelError
from pipeline.storage import describe_error, url_fs, with_retries
from sdedit import (
    ModelSourceError,
    cached_snapshot,
    files_identity,
    hub_download_hint,
    hub_repo_files,
    local_path,
    resolve,
    source_kind,
    transformers_allow_patterns,
)

logger = logging.getLogger(__name__)

__all__ = ["AESTHETIC_KEYS", "Aesthetic", "Clip", "aesthetic_mlp", "load_aesthetic", "load_clip",
           "scorer_model_problems"]

AESTHETIC_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
"""The Linear layers of the published predictor's state dict, in order."""
_WIDTHS = (1024, 128, 64, 16, 1)


@dataclass
class Clip:
    """A loaded CLIP model and its processor, on `device` (float32, eval mode)."""

    model: Any  # transformers.CLIPModel
    processor: Any  # transformers.CLIPProcessor
    source: str
    identity: str
    device: torch.device

    @property
    def width(self) -> int:
        """The embedding width (the projection dimension)."""
        return int(self.model.config.projection_dim)

    def pixel_values(self, image: Any) -> torch.Tensor:
        """float32 (3, S, S): the processor's input of one uint8 (H, W, 3) image (host work)."""
        return self.processor.image_processor(images=image, return_tensors="pt")[
            "pixel_values"][0]

    @torch.inference_mode()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """float32 (B, d) L2-normalised image embeddings of (B, 3, S, S) processor inputs."""
        out = self.model.get_image_features(pixel_values=pixel_values.to(self.device))
        return _normalised(_embeddings(out))

    @torch.inference_mode()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """float32 (B, d) L2-normalised text embeddings; texts too long for the text model are
        truncated by the tokenizer, keeping the end token."""
        limit = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True,
                                          max_length=limit, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return _normalised(_embeddings(out))


def _embeddings(out: Any) -> torch.Tensor:
    """The embeddings of `get_*_features`: a tensor (transformers 4) or its output's
    `pooler_output` (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalised(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(p=2, dim=-1, keepdim=True)


def load_clip(source: str, device: torch.device,
              storage_options: dict[str, Any] | None = None) -> Clip:
    """CLIPModel + CLIPProcessor from `source` (hub id, local folder or fsspec URL);
    ScorerModelError names score.clip_model, the source and why it cannot be loaded."""
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    try:
        resolved = resolve(source, None, storage_options, layout="transformers")
        hf_logging.set_verbosity_error()  # the PIL image processor's torchvision notice
        model = CLIPModel.from_pretrained(resolved.directory).to(device).eval()
        processor = CLIPProcessor.from_pretrained(resolved.directory)
    except (ModelSourceError, OSError, ValueError, KeyError) as exc:
        raise ScorerModelError(f"score.clip_model: cannot load {source!r} as a CLIP model and "
                               f"processor: {describe_error(exc)}; allowed: a hub id, local "
                               "folder or fsspec URL of a transformers CLIPModel with its "
                               "CLIPProcessor files") from exc
    model.requires_grad_(False)
    if resolved.revision:
        identity = f"hf:{source}@{resolved.revision}"
    else:
        names = transformers_allow_patterns(os.listdir(resolved.directory))
        identity = files_identity(resolved.directory,
                                  [Path(resolved.directory) / n for n in names])
    logger.info("loaded CLIP %s (%s) on %s", source, identity, device)
    return Clip(model, processor, source, identity, device)


def aesthetic_mlp(width: int) -> torch.nn.Sequential:
    """The predictor's network for embeddings of `width` (module names as published)."""
    layers: list[torch.nn.Module] = []
    sizes = (width, *_WIDTHS)
    drops = (0.2, 0.2, 0.1)
    for i in range(4):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < 3:
            layers.append(torch.nn.Dropout(drops[i]))
    layers.append(torch.nn.Linear(sizes[4], sizes[5]))
    net = torch.nn.Sequential()
    net.add_module("layers", torch.nn.Sequential(*layers))
    return net


@dataclass
class Aesthetic:
    """The loaded aesthetic predictor: `net` maps (B, d) normalised embeddings to (B, 1)."""

    net: torch.nn.Module
    source: str
    identity: str
    width: int

    @torch.inference_mode()
    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """float32 (B,) scores of (B, d) L2-normalised CLIP image embeddings."""
        return self.net(embeddings.float())[:, 0]


def load_aesthetic(source: str, device: torch.device, width: int,
                   storage_options: dict[str, Any] | None = None) -> Aesthetic:
    """The aesthetic predictor from a local file or an fsspec URL, checked against the published
    layout and the CLIP embedding `width`; ScorerModelError names score.aesthetic_model and what
    is wrong."""
    where = f"score.aesthetic_model: {source!r}"
    path = _aesthetic_file(source, storage_options, where)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ScorerModelError(f"{where}: cannot be read as a state dict: "
                               f"{describe_error(exc)}") from exc
    if not isinstance(state, dict):
        raise ScorerModelError(f"{where}: holds a {type(state).__name__}, not a state dict")
    expected = {f"{name}.{part}" for name in AESTHETIC_KEYS for part in ("weight", "bias")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ScorerModelError(
            f"{where}: not the improved aesthetic predictor's layout (missing "
            f"{', '.join(missing) or 'none'}; unexpected {', '.join(extra[:5]) or 'none'}); "
            "allowed: keys layers.0/2/4/6/7 .weight/.bias, Linear(d, 1024) -> 128 -> 64 -> "
            "16 -> 1")
    found = int(state["layers.0.weight"].shape[1])
    if found != width:
        raise ScorerModelError(f"{where}: takes embeddings of width {found}, but score."
                               f"clip_model's are {width}; allowed: a predictor trained on "
                               "that CLIP model's image embeddings")
    net = aesthetic_mlp(width)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ScorerModelError(f"{where}: {describe_error(exc)}") from exc
    net = net.to(device).eval().requires_grad_(False)
    identity = files_identity(path.parent, [path])
    return Aesthetic(net, source, identity, width)


def _aesthetic_file(source: str, storage_options: dict[str, Any] | None,
                    where: str) -> Path:
    """The predictor's local file: a local path, or a URL's file copied once into the cache."""
    if source_kind(source) != "url":
        path = local_path(source)
        if not path.is_file():
            raise ScorerModelError(f"{where}: no such file ({os.path.abspath(path)}); allowed: "
                                   "a local .pth / .safetensors file or an fsspec URL (hf://, "
                                   "s3://, https://)")
        return path
    name = hashlib.sha256(source.encode()).hexdigest()[:20]
    target = Path.home() / ".cache" / "sdedit-batch" / "models" / name / \
        source.rstrip("/").rsplit("/", 1)[-1]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        fs, path = url_fs(source, storage_options)
        with_retries(lambda: fs.get_file(path, str(partial)), what="copy", url=source)
        os.replace(partial, target)
    except Exception as exc:
        raise ScorerModelError(f"{where}: cannot copy it: {describe_error(exc)}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def scorer_model_problems(source: str, *, aesthetic: bool = False, offline: bool = False
                          ) -> tuple[list[str], list[str]]:
    """(problems, notes) of a scorer model source without loading weights, as `validate` checks
    the diffusion model; URLs are left to the actors, which copy them."""
    kind = source_kind(source)
    field = "score.aesthetic_model" if aesthetic else "score.clip_model"
    if kind == "url":
        return [], [f"{field} {source}: read by each actor"]
    if aesthetic:
        if local_path(source).is_file():
            return [], []
        return [f"{field}: {source!r}: no such file ({os.path.abspath(local_path(source))}); "
                "allowed: a local .pth / .safetensors file or an fsspec URL "
                "(hf://ORG/REPO/FILE, s3://, https://)"], []
    if kind == "missing":
        return [f"{field}: {source!r} not found (no folder {os.path.abspath(local_path(source))}"
                "); allowed: a hub id such as openai/clip-vit-large-patch14, a local folder "
                "or an fsspec URL of a CLIPModel with its processor"], []
    folder = local_path(source) if kind == "local" else cached_snapshot(source)
    if folder is None:
        if offline:
            return [], [f"{field} {source}: not in the hub cache; the hub was not checked "
                        "(--offline)"]
        try:
            hub_repo_files(source)
        except Exception as exc:
            return [f"{field}: {source!r} is not in the hub cache (HF_HOME) and the hub cannot "
                    f"tell about it ({type(exc).__name__}); allowed: a local folder, or a hub "
                    f"repository that is reachable or cached (cache it with "
                    f"{hub_download_hint(source)} where the hub is reachable)"], []
        return [], [f"{field} {source}: on the hub; downloaded into the hub cache on first use"]
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    weights = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json"}
    if "config.json" not in names or not weights & names:
        return [f"{field}: {source!r} ({folder}) holds no config.json with weights "
                "(model.safetensors or pytorch_model.bin); allowed: a folder written by "
                "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained"], []
    return [], []
