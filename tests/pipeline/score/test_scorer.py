"""The scorers against torchmetrics and the published aesthetic predictor, on a tiny random
CLIP: clip_score equals torchmetrics' CLIPScore, ssim its SSIM, aesthetic the MLP on the
normalised embedding; bad scorer models are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ScorerModelError
from pipeline.job.spec import ScoreSpec
from pipeline.score.models import aesthetic_mlp, load_aesthetic, load_clip
from pipeline.score.scorer import Scorer
from tests.support.tiny_clip import CLIP_WIDTH, save_aesthetic

CPU = torch.device("cpu")
PROMPTS = ["a photo of a room", "a red chair", None]


def _images(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(n)]


class _PlainClip(torch.nn.Module):
    """A CLIPModel whose get_*_features return the embeddings (transformers 5 returns a model
    output, which torchmetrics' CLIPScore cannot take)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids,
                                            attention_mask=attention_mask).pooler_output


def test_scores_agree_with_torchmetrics_and_the_predictor(tiny_clip_dir, tiny_aesthetic_path):
    from torchmetrics.functional.image import structural_similarity_index_measure
    from torchmetrics.multimodal import CLIPScore

    spec = ScoreSpec(metrics=("ssim", "clip_score", "aesthetic", "embedding"),
                     clip_model=str(tiny_clip_dir), aesthetic_model=str(tiny_aesthetic_path),
                     prompt="a photo of a bedroom")
    scorer = Scorer(spec, CPU)
    outputs, guides = _images(3, 0), _images(3, 1)
    inputs = [scorer.prepare(o, g, p) for o, g, p in zip(outputs, guides, PROMPTS, strict=True)]
    scores = scorer.score(inputs)
    clip = scorer.clip
    metric = CLIPScore(model_name_or_path=lambda: (_PlainClip(clip.model), clip.processor))
    state = torch.load(tiny_aesthetic_path, weights_only=True)
    mlp = aesthetic_mlp(CLIP_WIDTH).eval()
    mlp.load_state_dict(state)
    for image, guide, prompt, row in zip(outputs, guides, PROMPTS, scores, strict=True):
        metric.reset()
        metric.update(torch.from_numpy(image).permute(2, 0, 1), prompt or spec.prompt)
        assert row["clip_score"] == pytest.approx(float(metric.compute()), abs=1e-4)
        pixels = clip.processor(images=image, return_tensors="pt")["pixel_values"]
        embedding = clip.model.get_image_features(pixel_values=pixels).pooler_output[0]
        embedding = embedding / embedding.norm()
        np.testing.assert_allclose(row["embedding"], embedding.detach().numpy(), atol=2e-3)
        assert row["embedding"].dtype == np.float16
        with torch.no_grad():
            assert row["aesthetic"] == pytest.approx(float(mlp(embedding[None])[0, 0]),
                                                     abs=1e-5)
        expected = structural_similarity_index_measure(
            torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
            torch.from_numpy(guide).permute(2, 0, 1)[None].float() / 255, data_range=1.0)
        assert row["ssim"] == pytest.approx(float(expected), abs=1e-5)
    meta = scorer.metadata()
    assert meta["models"]["clip"]["identity"].startswith("sha256:")
    assert meta["models"]["aesthetic"]["identity"].startswith("sha256:")
    assert meta["settings"]["prompt"] == "a photo of a bedroom"


def test_a_row_without_text_has_no_clip_score_and_ssim_alone_needs_no_model():
    scorer = Scorer(ScoreSpec(metrics=("ssim",)), CPU)
    assert scorer.clip is None
    out = scorer.score([scorer.prepare(o, o, None) for o in _images(2)])
    assert [row["ssim"] for row in out] == pytest.approx([1.0, 1.0])


def test_bad_scorer_models_are_refused_by_name(tiny_clip_dir, tmp_path):
    with pytest.raises(ScorerModelError, match=r"score\.clip_model: cannot load"):
        load_clip(str(tmp_path / "nothing-here"), CPU)
    clip = load_clip(str(tiny_clip_dir), CPU)
    wide = save_aesthetic(tmp_path / "wide.safetensors", width=768)
    with pytest.raises(ScorerModelError, match=r"width 768.*are 16"):
        load_aesthetic(str(wide), CPU, clip.width)
    torch.save({"layers.0.weight": torch.zeros(1024, 16)}, tmp_path / "other.pth")
    with pytest.raises(ScorerModelError, match=r"missing layers\.0\.bias"):
        load_aesthetic(str(tmp_path / "other.pth"), CPU, clip.width)
    ok = save_aesthetic(tmp_path / "ok.safetensors")
    assert load_aesthetic(str(ok), CPU, clip.width).width == 16


def test_an_aesthetic_predictor_at_a_url_is_copied_once(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    local = save_aesthetic(tmp_path / "a.pth")
    fsspec.filesystem("memory").pipe("/scorers/a.pth", local.read_bytes())
    found = load_aesthetic("memory://scorers/a.pth", CPU, CLIP_WIDTH)
    assert found.identity == load_aesthetic(str(local), CPU, CLIP_WIDTH).identity
    fsspec.filesystem("memory").rm("/scorers/a.pth")
    assert load_aesthetic("memory://scorers/a.pth", CPU, CLIP_WIDTH).width == CLIP_WIDTH
