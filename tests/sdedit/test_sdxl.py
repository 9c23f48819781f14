"""The SDXL family on a tiny random SDXL pipeline: agreement with diffusers'
StableDiffusionXLImg2ImgPipeline (base and refiner layouts), per-row settings, masks, and the
layout checks made from configs alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdedit import edit, load_model
from sdedit.families import inspect_model_dir
from sdedit.sources import ModelSourceError
from tests.support.tiny_sdxl import save_sdxl_model, tiny_sdxl_pipeline

PROMPTS = ["a red cat", "blue dog"]
SEEDS = [3, 4]
T0 = 0.01  # 10 DDPM steps: diffusers' strength 0.01 of 1000 inference steps


def _unit(n: int, seed: int = 0) -> torch.Tensor:
    """Guides in [0, 1] (diffusers' image range)."""
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _reference(pipe, u: torch.Tensor, negatives: list[str] | None) -> torch.Tensor:
    """diffusers' SDXL img2img with DDPMScheduler over 1000 steps at strength T0: the same
    start index round(1000 T0) - 1 and the same per-sample noise order as our ddpm."""
    return pipe(prompt=PROMPTS, negative_prompt=negatives, image=u, strength=T0,
                num_inference_steps=1000, guidance_scale=5.0, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' img2img samples the VAE posterior; ours takes its mean."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean)


@pytest.mark.parametrize("refiner,mean_std,cases", [
    (False, False, ([], ["lamp", "sky"])), (False, True, (["lamp", "sky"],)), (True, False, ([],))],
    ids=["base", "base-latents-mean-std", "refiner"])
def test_edit_agrees_with_diffusers_sdxl_img2img(refiner, mean_std, cases, tmp_path,
                                                 posterior_mean):
    """Through load_model: our ddpm equals StableDiffusionXLImg2ImgPipeline for the same start,
    steps, prompts, guidance and noise, with empty negatives (zero embeddings when the config
    asks: negative_prompt=None there; the refiner encodes "") and with given ones. Measured
    max |diff| 4.1e-6 on [0, 1] images (bound 1e-4)."""
    pipe = tiny_sdxl_pipeline(tmp_path / "vocab", refiner=refiner, latents_mean_std=mean_std)
    model = load_model(save_sdxl_model(tmp_path / "m", refiner=refiner,
                                       latents_mean_std=mean_std))
    assert model.family == "sdxl" and model.text.spec.default_guidance == 5.0
    u = _unit(2)
    for negatives in cases:
        ref = _reference(pipe, u, negatives or None)
        ours = edit(model, 2 * u - 1, t0=T0, seeds=SEEDS, prompts=PROMPTS,
                    negative_prompts=negatives or None) * 0.5 + 0.5
        assert (ours - ref).abs().max() <= 1e-4, float((ours - ref).abs().max())
    if refiner or mean_std:
        return
    # the comparison sees the unconditional pass: diffusers with the negatives encoded as ""
    # (not zeros) is far from ours with empty negatives
    ours = edit(model, 2 * u - 1, t0=T0, seeds=SEEDS, prompts=PROMPTS) * 0.5 + 0.5
    assert (ours - _reference(pipe, u, ["", ""])).abs().max() > 1e-3


def test_per_row_t0_and_prompts_in_one_batch_equal_each_row_alone(tiny_sdxl):
    x = _unit(3, seed=1) * 2 - 1
    t0s, prompts, negatives = [0.01, 0.02, 0.015], ["a red cat", "blue dog", ""], ["", "sky", ""]
    batch = edit(tiny_sdxl, x, t0=t0s, seeds=[5, 6, 7], prompts=prompts,
                 negative_prompts=negatives, guidance_scale=4.0)
    for i in range(3):
        alone = edit(tiny_sdxl, x[i:i + 1], t0=t0s[i], seeds=[5 + i], prompts=[prompts[i]],
                     negative_prompts=[negatives[i]], guidance_scale=4.0)
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5), \
            float((batch[i:i + 1] - alone).abs().max())
    assert (batch[0] - batch[2]).abs().max() > 1e-3  # rows differ (prompt, t0)


def test_masked_sdxl_output_equals_the_guide_outside_the_mask(tiny_sdxl):
    x = _unit(2, seed=2) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 2:9, 5:13] = 1
    out = edit(tiny_sdxl, x, t0=0.02, seeds=[1, 2], prompts=PROMPTS, masks=mask, repeats=2)
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out[~keep] - x[~keep]).abs().mean() > 0.05


def test_time_ids_are_the_guides_size(tiny_sdxl):
    cond, uncond = tiny_sdxl.text.encode(["sky"], [""], (48, 32), None)
    assert cond.rows["time_ids"].tolist() == [[48.0, 32.0, 0.0, 0.0, 48.0, 32.0]]
    assert torch.equal(uncond.rows["time_ids"], cond.rows["time_ids"])
    assert not uncond.rows["encoder_hidden_states"].any()          # force_zeros_for_empty
    assert cond.rows["encoder_hidden_states"].shape == (1, 12, 64)  # 32 + 32 joined
    assert cond.rows["text_embeds"].shape == (1, 32)


def test_t0_maps_to_sdxl_strength_as_the_readme_says(tiny_sdxl, tmp_path):
    """SDXL base 1.0's scheduler config: strength 0.3 of 50 steps starts at timestep 281 and
    runs 15 evaluations (diffusers' own get_timesteps); t0 = 0.282 with 15 steps starts there."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_sdxl_pipeline(tmp_path / "vocab", scheduler=EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", num_train_timesteps=1000, prediction_type="epsilon"))
    pipe.scheduler.set_timesteps(50)
    timesteps, count = pipe.get_timesteps(50, 0.3, "cpu")
    assert (int(timesteps[0]), count, int(timesteps[-1])) == (281, 15, 1)
    plan = tiny_sdxl.process.plan(0.282, "ddim", 15)
    assert (plan[0], len(plan)) == (281, 15)


def test_layout_is_read_from_configs_and_names_its_family(tiny_sdxl_dir, tiny_sd_dir):
    layout = inspect_model_dir(tiny_sdxl_dir, "x")
    assert (layout.family, layout.sample_size, layout.downsample_factor) == ("sdxl", (16, 16), 4)
    assert inspect_model_dir(tiny_sd_dir, "x").family == "sd"   # SD 1.x is not claimed


def test_an_sd_directory_calling_itself_xl_is_the_sdxl_familys_to_refuse(tiny_sd_dir,
                                                                         tmp_path):
    """SDXL layouts were refused by the SD family before; now the sdxl family reads them and
    names what such a directory lacks."""
    bad = _copy(tiny_sd_dir, tmp_path / "half", {"model_index.json": lambda d: d.update(
        _class_name="StableDiffusionXLImg2ImgPipeline",
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"])})
    with pytest.raises(ModelSourceError, match=r"no text_encoder_2/ folder in .*; supported: "
                                               r"the StableDiffusionXL layout"):
        load_model(bad)


def _copy(src, dst, edit_json):
    shutil.copytree(src, dst)
    for name, change in edit_json.items():
        path = dst / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("edits,fragment", [
    ({"model_index.json": lambda d: d.update(requires_aesthetics_score=True)},
     r"projection_class_embeddings_input_dim is 80, but 5 time ids x 8 \+ the pooled width 32 "
     r"give 72 \(the UNet takes 6 time ids: model_index.json requires_aesthetics_score should "
     r"be false\)"),
    ({"unet/config.json": lambda d: d.update(addition_embed_type=None)},
     "addition_embed_type=None; SDXL needs 'text_time'"),
    ({"unet/config.json": lambda d: d.update(cross_attention_dim=48)},
     "cross_attention_dim 48 is not the text encoders' joined width 64"),
    ({"unet/config.json": lambda d: d.update(in_channels=9)},
     "unet in/out channels 9/4 do not match the VAE's 4 latent channels"),
])
def test_layouts_that_do_not_fit_are_refused_without_weights(tiny_sdxl_dir, tmp_path, edits,
                                                             fragment):
    bad = _copy(tiny_sdxl_dir, tmp_path / "bad", edits)
    with pytest.raises(ModelSourceError, match=fragment):
        inspect_model_dir(bad, "bad")


def test_identity_covers_model_index(tiny_sdxl_dir, tmp_path):
    """force_zeros_for_empty_prompt and requires_aesthetics_score live in model_index.json:
    they change outputs, so the identity covers that file."""
    other = _copy(tiny_sdxl_dir, tmp_path / "other",
                  {"model_index.json": lambda d: d.update(force_zeros_for_empty_prompt=False)})
    assert load_model(other).identity != load_model(tiny_sdxl_dir).identity
