"""Pinned engine outputs: sha256 of the float32 bytes `sdedit.edit` returns for fixed inputs.

Written before the model-family seam (issue 16) on the code that had VP and VE kinds only: the
seam must reproduce these outputs bit for bit, for pixel VP (every VP sampler, per-row t0,
masks, repeats), pixel VE (with the corrector) and the latent SD 1.x layout (guidance,
negative prompts, the conditional pass alone, masks). A legitimate change of outputs must
update the table here and say why in its commit.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from sdedit import edit


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().contiguous().numpy().tobytes()).hexdigest()


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

PINNED = {
    'sd-ddim-conditional-only': 'fb2d86ee672d03dd25c4712237b19e261ac5e7c6538bb104219c5fc3ea90beb8',
    'sd-ddpm-guided': '7db99530c345c4c555a99f248c12ad85deb78b30635ee05013e6ba25d56554a2',
    'sd-dpmpp2m-masked-repeats': '6e975444043babd58a0906bfcda4c305f0e7f6680b79630559dac3161c6731c5',
    've-corrector-masked': '0a23c73c60a66603ca5d9f394b7900c767e1dd4774aa83dfab304c9921345df7',
    'vp-ddim-eta': '102bc0b9dfb06e3056ee0a1e0e9fc6ee223f2e3057ad87634ab617ab53d429ab',
    'vp-ddpm': '3138582d0ba8f73621389c28fc4b4a4aeab6a45e9814dc9a4345e0d8dc16a6bd',
    'vp-ddpm-respaced-masked': 'a0277a4dac482231247639a89bddfa45a0b1ebc413195a7a98bffcfb451e0e6b',
    'vp-dpmpp2m-masked': 'fffc9d1669cf8891860e79612c804d7bfbfde6e8a4e32f335a410b5e67a39ecb',
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_outputs_are_pinned(name, request):
    fixture, options = CASES[name]
    model = request.getfixturevalue(fixture)
    options = dict(options)
    if options.pop("masks", False):
        options["masks"] = _masks(3)
    out = edit(model, _guides(3, seed=len(name)), seeds=[11, 12, 13], **options)
    assert _digest(out) == PINNED[name]
