"""`eval`: KID and FID equal torchmetrics' on the same injected features, groups smaller than
the subset clamp it, FID below the feature dimension is null with the reason, diversity is the
mean pairwise distance; the command on a t0 sweep writes the per-t0 table, JSON and plot."""

from __future__ import annotations

import json
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.curate import features as features_module
from pipeline.curate.evaluate import diversity, evaluate, fid, kid
from pipeline.errors import PipelineError
from tests.support.scored import T0S


class _Given(torch.nn.Module):
    """A torchmetrics feature extractor that returns its input: the features are injected."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_kid_and_fid_equal_torchmetrics_on_injected_features():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(24, 6)), rng.normal(size=(24, 6)) + 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = KernelInceptionDistance(feature=_Given(), subsets=3, subset_size=24)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    expected, _ = metric.compute()
    found = kid(real, fake, subset_size=1000, subsets=3)  # clamped to 24: every image
    assert found["kid"] == pytest.approx(float(expected), rel=1e-9)
    assert found["kid_subset_size"] == 24

    class _Fid(_Given):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the dummy probe: 6 dims
            return torch.zeros(len(x), 6, dtype=torch.float64) if x.dtype == torch.uint8 else x

    metric = FrechetInceptionDistance(feature=_Fid())
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    assert fid(real, fake)[0] == pytest.approx(float(metric.compute()), rel=1e-9)
    value, why = fid(real[:5], fake)
    assert value is None and "5 image(s) < 6 feature dimensions" in why


def test_diversity_is_the_mean_pairwise_cosine_distance():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(7, 5))
    guides = ["a", "a", "a", "b", "b", "c", "d"]
    found = diversity(e, guides)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)

    def brute(rows):
        return np.mean([1 - unit[i] @ unit[j] for i, j in combinations(rows, 2)])

    assert found["across"] == pytest.approx(brute(range(7)))
    assert found["within_guide"] == pytest.approx((brute([0, 1, 2]) + brute([3, 4])) / 2)
    assert found["guides"] == 2


def test_inception_without_torch_fidelity_is_a_clear_error(monkeypatch):
    from torchmetrics.image import fid as tm_fid

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("NoTrainInceptionV3 module requires that `Torch-fidelity` "
                                  "is installed.")

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", missing)
    with pytest.raises(PipelineError, match=r"needs torch-fidelity.*--features clip or pixels"):
        features_module.Features.make("inception", torch.device("cpu"))


def test_eval_of_a_t0_sweep(scored, tmp_path):
    out = scored.output.path
    reference = str(Path(out).parent / "in")
    result = CliRunner().invoke(main, [
        "eval", out, "--reference", reference, "--features", "pixels", "--kid-subsets", "2",
        "--json", str(tmp_path / "e.json"), "--png", str(tmp_path / "e.png")])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "e.json").read_text())
    assert figures["images"] == 12 and figures["reference"]["images"] == 6
    assert figures["kid_subset_size"] == 6 and figures["fid"] is None
    assert "768 feature dimensions" in figures["fid_note"]
    assert [row["t0"] for row in figures["per_t0"]] == list(T0S)
    assert all(row["kid"] is not None and row["ssim"] is not None for row in figures["per_t0"])
    assert figures["diversity"]["guides"] == 6 and figures["ssim"]["count"] == 12
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0.03 | 8 |" in result.output  # keys 0 and 2 of each shard
    # clip features: the stored embeddings, as the images give them again
    stored = evaluate(out, reference=[reference], features="clip", kid_subsets=1)
    clip_dir = scored.score.clip_model
    again = evaluate(out, reference=[reference], features="clip", kid_subsets=1,
                     clip_model=clip_dir + "/")
    assert stored["kid"] == pytest.approx(again["kid"], rel=0.02, abs=1e-4)


class _MeanColour(torch.nn.Module):
    """Features of [0, 1] images: their mean colour and its square (6-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3))
        return torch.cat([mean, mean * mean], dim=1)


def test_a_torchscript_feature_network(scored, tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(_MeanColour()), str(path))
    out = scored.output.path
    found = evaluate(out, reference=[str(Path(out).parent / "in")], features="torchscript",
                     feature_net=str(path), kid_subsets=1)
    assert found["features"]["dims"] == 6 and found["features"]["identity"].startswith("sha256:")
    assert found["fid"] is not None and found["per_t0"][0]["fid"] is not None  # 8 images
    assert found["per_t0"][1]["fid"] is None  # 4 images < 6 dimensions
    with pytest.raises(PipelineError, match=r"--feature-net .*cannot be used"):
        evaluate(out, reference=[str(Path(out).parent / "in")], features="torchscript",
                 feature_net=str(tmp_path / "none.pt"))
