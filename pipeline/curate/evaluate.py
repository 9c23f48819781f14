"""`sdedit-batch eval`: the paper's set-level figures of an output, per t0 when rows differ.

Realism is KID and FID against reference images (as torchmetrics computes them), faithfulness the
distributions of `faithfulness_l2` and `ssim`, diversity the mean pairwise cosine distance of
CLIP image embeddings. Definitions: docs/scores.md, "evaluation"."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.curate.features import Features, output_images, reference_images
from pipeline.curate.table import output_rows
from pipeline.errors import PipelineError
from pipeline.output.folder import OutputFolder
from sdedit import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["distribution", "diversity", "evaluate", "fid", "kid"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def kid(real: np.ndarray, fake: np.ndarray, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> dict[str, Any]:
    """KID of `fake` against `real` features (N, D): {kid, kid_std, kid_subset_size,
    kid_subsets}; the subset size clamped to the smaller set; kid None below 2 images."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        return {"kid": None, "kid_std": None, "kid_subset_size": size, "kid_subsets": 0,
                "kid_note": f"{min(len(real), len(fake))} image(s): KID needs 2 of each set"}
    x, y = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=generator)[:size]]
        b = y[torch.randperm(len(y), generator=generator)[:size]]
        values.append(_mmd2(a, b))
    scores = torch.stack(values)
    return {"kid": float(scores.mean()), "kid_std": float(scores.std(unbiased=False)),
            "kid_subset_size": size, "kid_subsets": subsets}


def _mmd2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The unbiased MMD^2 of two equal-size sets with the cubic polynomial kernel."""
    d, m = a.shape[1], a.shape[0]
    k_aa, k_bb, k_ab = ((p @ q.T / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
    same = (k_aa.sum() - k_aa.diag().sum() + k_bb.sum() - k_bb.diag().sum()) / (m * (m - 1))
    return same - 2 * k_ab.sum() / m**2


def fid(real: np.ndarray, fake: np.ndarray) -> tuple[float | None, str | None]:
    """(FID, None), or (None, why) when a set has fewer images than feature dimensions."""
    d = real.shape[1]
    smallest = min(len(real), len(fake))
    if smallest < d:
        return None, (f"{smallest} image(s) < {d} feature dimensions: the covariance is "
                      "singular; FID needs more images than dimensions")
    x, y = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = torch.cov(x.T), torch.cov(y.T)
    root = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * root), None


def distribution(values: Sequence[float | None]) -> dict[str, Any] | None:
    """count, mean, std, min, p5, p25, p50, p75, p95, max of the non-null values (None if none)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if not len(x):
        return None
    q = np.quantile(x, QUANTILES)
    return {"count": len(x), "mean": float(x.mean()), "std": float(x.std()),
            "min": float(x.min()), **{f"p{round(p * 100)}": float(v) for p, v in
                                      zip(QUANTILES, q, strict=True)}, "max": float(x.max())}


def _mean_distance(e: np.ndarray) -> float:
    n = len(e)
    total = e.sum(0)
    return float(1.0 - (total @ total - float((e * e).sum())) / (n * (n - 1)))


def diversity(embeddings: np.ndarray | None, guides: Sequence[Any]) -> dict[str, Any]:
    """Mean pairwise cosine distance within a guide's outputs (averaged over guides with 2 or
    more) and across the set; None where there are too few outputs or no embeddings."""
    if embeddings is None:
        return {"within_guide": None, "guides": 0, "across": None,
                "note": "no CLIP image embeddings: score with the embedding scorer, or use "
                        "--features clip"}
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    groups: dict[Any, list[int]] = {}
    for i, guide in enumerate(guides):
        groups.setdefault(guide, []).append(i)
    within = [_mean_distance(e[rows]) for rows in groups.values() if len(rows) > 1]
    return {"within_guide": float(np.mean(within)) if within else None,
            "guides": len(within), "across": _mean_distance(e) if len(e) > 1 else None}


def evaluate(output: str, *, reference: Sequence[str] = (), reference_image: str | None = None,
             features: str = "inception", clip_model: str | None = None,
             kid_subset_size: int = 1000, kid_subsets: int = 100,
             inception_weights: str | None = None, feature_net: str | None = None,
             device: str = "auto") -> dict[str, Any]:
    """The figures of the output at `output`, as a JSON-able dict. PipelineError when there is no
    output or no ok row, reference shards hold no images, or a feature network cannot be had."""
    folder = OutputFolder(output)
    record = folder.read_record()
    if record is None:
        raise PipelineError(f"output {output}: no job.json; allowed: an output written by "
                            "`sdedit-batch run`")
    spec = record.get("spec", {})
    image_format = spec.get("output", {}).get("image_format", "png")
    recorded = folder.read_score_settings() or {}
    clip_model = clip_model or recorded.get("clip_model") or \
        spec.get("score", {}).get("clip_model")
    parts = [rows.filter(pc.equal(rows["status"], "ok"))
             for _, rows, _ in output_rows(folder)]
    rows = pa.concat_tables(parts) if parts else None
    if rows is None or not len(rows):
        raise PipelineError(f"output {output}: no ok row to evaluate")
    n = len(rows)
    stored = _stored_embeddings(rows)
    result: dict[str, Any] = {"output": output, "images": n}
    fake = real = None
    if reference:
        extractor = Features.make(features, resolve_device(device), clip_model,
                                  inception_weights, feature_net)
        result["features"] = extractor.describe
        real = extractor.of(reference_images(reference, reference_image))
        if not len(real):
            raise PipelineError(f"--reference {', '.join(reference)}: no image found")
        result["reference"] = {"shards": list(reference), "images": len(real)}
        if features == "clip" and stored is not None and \
                recorded.get("clip_model") == clip_model:
            fake = stored
        else:
            fake = _output_features(folder, rows, image_format, extractor)
        result.update(_realism(real, fake, kid_subset_size, kid_subsets))
    embeddings = stored if stored is not None else (fake if features == "clip" else None)
    guides = list(zip(rows.column("input_shard").to_pylist(), rows.column("key").to_pylist(),
                      strict=True))
    result["faithfulness_l2"] = distribution(rows.column("faithfulness_l2").to_pylist())
    result["ssim"] = distribution(rows.column("ssim").to_pylist())
    result["diversity"] = diversity(embeddings, guides)
    result["per_t0"] = _per_t0(rows, real, fake, embeddings, guides, kid_subset_size,
                               kid_subsets)
    return result


def _realism(real: np.ndarray, fake: np.ndarray, subset_size: int, subsets: int
             ) -> dict[str, Any]:
    found = kid(real, fake, subset_size, subsets)
    value, note = fid(real, fake)
    return {**found, "fid": value, **({"fid_note": note} if note else {})}


def _per_t0(rows: pa.Table, real: np.ndarray | None, fake: np.ndarray | None,
            embeddings: np.ndarray | None, guides: list[Any], subset_size: int,
            subsets: int) -> list[dict[str, Any]]:
    """One entry per t0 (rounded to 1e-6), in increasing t0."""
    t0s = np.round(np.asarray(rows.column("t0").to_pylist(), np.float64), 6)
    l2 = np.asarray(rows.column("faithfulness_l2").to_pylist(), np.float64)
    ssim = rows.column("ssim").to_pylist()
    table = []
    for t0 in sorted(set(t0s.tolist())):
        idx = np.flatnonzero(t0s == t0)
        entry: dict[str, Any] = {"t0": t0, "images": len(idx),
                                 "faithfulness_l2": float(l2[idx].mean())}
        values = [ssim[i] for i in idx if ssim[i] is not None]
        entry["ssim"] = float(np.mean(values)) if values else None
        if real is not None and fake is not None:
            entry.update(_realism(real, fake[idx], subset_size, subsets))
        if embeddings is not None:
            found = diversity(embeddings[idx], [guides[i] for i in idx])
            entry.update(diversity_within_guide=found["within_guide"],
                         diversity_across=found["across"])
        table.append(entry)
    return table


def _stored_embeddings(rows: pa.Table) -> np.ndarray | None:
    """float64 (N, d) stored embeddings, or None unless every row has one."""
    column = rows.column("embedding")
    if column.null_count:
        return None
    return np.asarray(column.to_pylist(), dtype=np.float64)


def _output_features(folder: OutputFolder, rows: pa.Table, image_format: str,
                     extractor: Features) -> np.ndarray:
    """Features of every row's output (read from the output tars), in row order."""
    index = {(s, k): i for i, (s, k) in enumerate(zip(rows.column("stem").to_pylist(),
                                                       rows.column("output_key").to_pylist(),
                                                       strict=True))}
    wanted: dict[str, set[str]] = {}
    for stem, key in index:
        wanted.setdefault(stem, set()).add(key)
    order, images, found = [], [], 0
    out = np.zeros((len(rows), extractor.describe["dims"]))
    for stem, key, image in output_images(folder, image_format, wanted):
        order.append(index[(stem, key)])
        images.append(image)
        if len(images) == 256:
            out[order] = extractor.of(images)
            found += len(order)
            order, images = [], []
    if images:
        out[order] = extractor.of(images)
        found += len(order)
    if found != len(rows):
        raise PipelineError(f"output {folder.path}: {len(rows) - found} ok row(s) have no "
                            "output image in their shard")
    return out
