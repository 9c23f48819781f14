"""Job-level settings checked from a model's layout alone (no weights): the same verdicts as
`edit` on the loaded model, so a job is refused before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdedit import EditInputError, edit
from sdedit.checks import settings_problems
from sdedit.families import inspect_model_dir


def _problems(layout, **settings):
    base = dict(sampler="ddpm", t0=0.5, steps=None)
    base.update(settings)
    f = layout.downsample_factor
    tokens = (layout.sample_size[0] // f) * (layout.sample_size[1] // f)
    return settings_problems(layout.process, layout.text, source="m", family=layout.family,
                             tokens=tokens, **base)


def test_layouts_are_read_without_weights(tiny_vp_dir, tiny_sd_dir, tmp_path):
    for source in (tiny_vp_dir, tiny_sd_dir):
        bare = tmp_path / source.name
        shutil.copytree(source, bare)
        for weights in bare.rglob("*.safetensors"):      # the tensors' bytes are never read
            data = weights.read_bytes()                  # (only the header: sdedit.weights)
            header = 8 + int.from_bytes(data[:8], "little")
            weights.write_bytes(data[:header] + bytes(len(data) - header))
        assert inspect_model_dir(bare, str(bare)).family in ("pixel", "sd")


@pytest.mark.parametrize(
    ("fixture", "settings", "setting", "fragment"),
    [
        ("tiny_vp_dir", dict(sampler="ve"), "sampler", "allowed: ddpm, ddim, dpmpp2m"),
        ("tiny_vp_dir", dict(sampler="euler"), "sampler", "VP noise process"),
        ("tiny_vp_dir", dict(t0=0.0004), "t0", "round(t0 * 1000) >= 1"),
        ("tiny_vp_dir", dict(t0=0.01, steps=11), "steps", "allowed: 1..10"),
        ("tiny_vp_dir", dict(prompt="a room"), "prompt", "takes no text; allowed: unset"),
        ("tiny_vp_dir", dict(guidance_scale=5.0), "guidance_scale", "takes no text"),
        ("tiny_ve_dir", dict(sampler="ddpm"), "sampler", "allowed: ve"),
        ("tiny_sd_dir", dict(guidance_scale=0.5), "guidance_scale", "a number >= 1"),
        ("tiny_sd_dir", dict(sampler="flow_ddpm"), "sampler", "a sd model"),
    ],
)
def test_settings_a_model_cannot_run_are_named(request, fixture, settings, setting, fragment):
    layout = inspect_model_dir(request.getfixturevalue(fixture), "m")
    problems = _problems(layout, **settings)
    assert [name for name, _ in problems] == [setting]
    assert fragment in problems[0][1]


@pytest.mark.parametrize("fixture", ["tiny_vp_dir", "tiny_sd_dir"])
def test_settings_a_model_runs_pass(request, fixture):
    layout = inspect_model_dir(request.getfixturevalue(fixture), "m")
    text = dict(prompt="a room", negative_prompt="blur", guidance_scale=3.0) \
        if layout.text is not None else {}
    for sampler in layout.process.samplers:
        assert _problems(layout, sampler=sampler, t0=0.3, steps=5, **text) == []


@pytest.mark.parametrize(("settings", "setting"),
                         [(dict(sampler="ve"), "sampler"), (dict(t0=0.01, steps=11), "steps")])
def test_the_loaded_model_gives_the_same_verdict(tiny_vp, tiny_vp_dir, settings, setting):
    """The layout check and `edit` refuse the same settings with the same message."""
    layout = inspect_model_dir(tiny_vp_dir, tiny_vp.source)
    args = dict(sampler="ddpm", t0=0.5, steps=None)
    args.update(settings)
    f = layout.downsample_factor
    problems = settings_problems(layout.process, layout.text, source=tiny_vp.source,
                                 family=layout.family, tokens=(16 // f) ** 2, **args)
    with pytest.raises(EditInputError) as info:
        edit(tiny_vp, torch.zeros(1, 3, 16, 16), seeds=[1], **args)
    assert problems == [(setting, str(info.value))]


def test_zero_terminal_snr_schedules_are_applied_and_t0_1_refused(tiny_vp_dir, tmp_path):
    """rescale_betas_zero_snr is never ignored: alpha_bar ends at 0 and t0 = 1 (no signal)
    is refused with the reason."""
    model_dir = tmp_path / "zsnr"
    shutil.copytree(tiny_vp_dir, model_dir)
    config = json.loads((model_dir / "scheduler_config.json").read_text())
    config.update(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    (model_dir / "scheduler_config.json").write_text(json.dumps(config))
    layout = inspect_model_dir(model_dir, "m")
    abar = layout.process.schedule.alphas_cumprod
    plain = inspect_model_dir(tiny_vp_dir, "m").process.schedule.alphas_cumprod
    assert float(abar[-1]) == pytest.approx(0.0, abs=1e-12) and float(plain[-1]) > 1e-5
    assert float(abar[0]) == pytest.approx(float(plain[0]), rel=1e-9)
    assert _problems(layout, t0=0.99) == []
    assert [name for name, _ in _problems(layout, t0=1.0)] == ["t0"]
    assert "zero-terminal-SNR" in _problems(layout, t0=1.0)[0][1]
