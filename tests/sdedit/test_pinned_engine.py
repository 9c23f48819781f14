"""Pinned engine outputs: the float32 arrays `sdedit.edit` returns for fixed inputs, stored in
tests/data/pins/engine/ and compared within ATOL (tests/support/pins.py says how to rewrite them).

Written before the model-family seam (issue 16) on the code that had VP and VE kinds only: the
seam reproduces these outputs for pixel VP (every VP sampler, per-row t0, masks, repeats), pixel
VE (with the corrector) and the latent SD 1.x layout (guidance, negative prompts, the conditional
pass alone, masks). They were digests of the output bytes until issue 23, which failed on another
CPU; the arrays are the same outputs. A legitimate change of outputs must rewrite the pins and
say why in its commit.
"""

from __future__ import annotations

import pytest
import torch

from sdedit import edit
from tests.support.pins import assert_close, load_pin, max_abs_diff

# Outputs lie in [-1, 1]. Other CPU kernels (torch's ATEN_CPU_CAPABILITY default / avx2 instead
# of avx512, oneDNN limited to SSE4.1 or AVX2, MKL_CBWR=COMPATIBLE) or another thread count move
# them by up to ~1e-5; a real change moves them by 1e-2 or more (t0 by 0.01, one sampler step more
# or less, another seed, guidance 3.0 -> 3.1; guidance 3.0 -> 3.01 by 2e-3):
# test_pins_fail_on_a_real_change. ATOL sits between, a decade from each.
ATOL = 1e-4


def _guides(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _masks(n: int) -> torch.Tensor:
    masks = torch.zeros(n, 1, 16, 16)
    masks[:, :, 3:11, 5:14] = 1
    return masks


CASES = {
    "vp-ddpm": ("tiny_vp", dict(t0=[0.05, 0.1, 0.1], sampler="ddpm")),
    "vp-ddpm-respaced-masked": ("tiny_vp", dict(t0=[0.2, 0.4, 0.3], sampler="ddpm", steps=9,
                                                masks=True, repeats=2)),
    "vp-ddim-eta": ("tiny_vp", dict(t0=0.3, sampler="ddim", steps=7, eta=0.5)),
    "vp-dpmpp2m-masked": ("tiny_vp", dict(t0=[0.6, 0.3, 0.45], sampler="dpmpp2m", steps=8,
                                          masks=True)),
    "ve-corrector-masked": ("tiny_ve", dict(t0=[0.2, 0.3, 0.3], sampler="ve", steps=10,
                                            corrector_steps=1, masks=True)),
    "sd-ddpm-guided": ("tiny_sd", dict(t0=[0.04, 0.03, 0.04], sampler="ddpm",
                                       prompts=["a red cat", "blue dog", "a red cat"],
                                       negative_prompts=["", "lamp", "sky"],
                                       guidance_scale=3.0)),
    "sd-dpmpp2m-masked-repeats": ("tiny_sd", dict(t0=[0.3, 0.6, 0.5], sampler="dpmpp2m",
                                                  steps=5, masks=True, repeats=2,
                                                  prompts=["room", "bed lamp", ""])),
    "sd-ddim-conditional-only": ("tiny_sd", dict(t0=0.5, sampler="ddim", steps=6,
                                                 prompts=["sky", "dog", "cat"],
                                                 guidance_scale=1.0)),
}


def _edit(name: str, request: pytest.FixtureRequest, seeds: tuple[int, ...] = (11, 12, 13),
          **changes: object) -> dict[str, object]:
    """{"out": the case's output as a numpy array}, with `changes` to its options."""
    fixture, options = CASES[name]
    model = request.getfixturevalue(fixture)
    options = {**options, **changes}
    if options.pop("masks", False):
        options["masks"] = _masks(3)
    out = edit(model, _guides(3, seed=len(name)), seeds=list(seeds), **options)
    return {"out": out.detach().numpy()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_outputs_are_pinned(name, request):
    assert_close("engine", name, _edit(name, request), ATOL)


# One change per kind of mistake a refactor makes: the start time, the step plan, the noise
# drawn, the guidance formula, the corrector. Each moves the output well past ATOL.
CHANGES = {
    "t0 0.3 -> 0.31": ("vp-ddim-eta", dict(t0=0.31)),
    "ddim 7 -> 8 steps": ("vp-ddim-eta", dict(steps=8)),
    "one seed 13 -> 14": ("vp-ddpm", dict(seeds=(11, 12, 14))),
    "ve 10 -> 9 steps": ("ve-corrector-masked", dict(steps=9)),
    "guidance 3.0 -> 3.1": ("sd-ddpm-guided", dict(guidance_scale=3.1)),
    "ve corrector 1 -> 2 steps": ("ve-corrector-masked", dict(corrector_steps=2)),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_pins_fail_on_a_real_change(change, request):
    name, changes = CHANGES[change]
    found = _edit(name, request, **changes)
    worst = max_abs_diff(load_pin("engine", name), found)
    assert worst > 10 * ATOL, f"{change} moved {name} by {worst:.3g} only"
