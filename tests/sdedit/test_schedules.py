"""Schedules: DDPM betas, t0 -> start index, respacing, VE sigmas."""

from __future__ import annotations

import pytest
import torch

from sdedit.schedules import VESchedule, VPSchedule, respace


def test_ddpm_linear_schedule():
    s = VPSchedule.linear()
    assert s.num_train_timesteps == 1000
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    abar = s.alphas_cumprod
    assert bool((abar[1:] < abar[:-1]).all()) and 0 < float(abar[-1]) < 1e-4


def test_old_config_keys_and_schedules():
    old = VPSchedule.from_config({"timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                  "beta_schedule": "linear"})
    assert torch.equal(old.betas, VPSchedule.linear().betas)
    cos = VPSchedule.from_config({"num_train_timesteps": 100,
                                  "beta_schedule": "squaredcos_cap_v2"})
    assert cos.num_train_timesteps == 100 and float(cos.betas.max()) <= 0.999
    with pytest.raises(ValueError, match="beta_schedule='sigmoid' is not supported"):
        VPSchedule.from_config({"beta_schedule": "sigmoid"})


@pytest.mark.parametrize(("t0", "index"), [(0.5, 499), (1.0, 999), (0.3, 299), (0.001, 0)])
def test_start_index(t0, index):
    assert VPSchedule.linear().start_index(t0) == index


def test_respace():
    assert respace(499, None) == list(range(499, -1, -1))
    steps = respace(499, 20)
    assert len(steps) == 20 == len(set(steps)) and steps[0] == 499 and steps[-1] == 0
    assert steps == sorted(steps, reverse=True)
    assert respace(5, 6) == [5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match=r"allowed: 1\.\.6"):
        respace(5, 7)


def test_ve_sigmas():
    s = VESchedule(sigma_min=0.01, sigma_max=100.0)
    sig = s.sigma(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(sig, torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64))


def test_ve_defaults_are_one_fact_and_diffusers_defaults():
    from diffusers import ScoreSdeVeScheduler

    assert VESchedule() == VESchedule.from_config({})
    config = ScoreSdeVeScheduler().config
    assert VESchedule() == VESchedule(config["sigma_min"], config["sigma_max"],
                                      config["num_train_timesteps"], config["snr"])
    assert VESchedule.from_config({"sigma_max": 50, "snr": 0.2}) == VESchedule(sigma_max=50.0,
                                                                                snr=0.2)
