"""The memory plan (`sdedit.memplan`) of the published pipelines' configs, no weights read."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch

from sdedit import GIB, GPU_CLASSES, family_named, inspect_model_dir, resolve_precision
from sdedit.memplan import plan_memory, trace_peak
from tests.support.published import published_dir

TARGETS = [  # (model, weights, batch, the smallest GPU class it must fit, at 1024 x 1024)
    ("FLUX.1-dev", "bf16", 4, 48),
    ("FLUX.1-dev", "fp8", 1, 24),
    ("stable-diffusion-3.5-large", "bf16", 2, 48),
    ("stable-diffusion-xl-base-1.0", "fp16", 4, 24),
]


OPEN = [  # (model, batch, GB at 1024 x 1024 with bf16 weights (auto) and the family's default
    #        guidance, the smallest GPU class it fits without offload / with offload text,
    #        parameters of the network and of the text encoder; figures of jobs/ and
    #        docs/open-models.md)
    ("Qwen-Image", 4, 58.5, 80, 48, 20.43e9, 8.29e9),   # 20 B; Qwen2.5-VL-7B with its vision
    ("Z-Image-Turbo", 1, 21.9, 24, 16, 6.15e9, 4.02e9),  # 6 B; Qwen3-4B
    ("Z-Image-Turbo", 4, 22.6, 48, 24, 6.15e9, 4.02e9),
    ("Chroma", 4, 30.7, 48, 24, 8.90e9, 4.76e9),        # 8.9 B; T5-XXL encoder
]


@functools.cache
def _plan(name, weights, batch):
    """The plan at 1024 x 1024, made once per (model, weights, batch) for the whole module."""
    layout = inspect_model_dir(published_dir(name, Path(tempfile.mkdtemp(prefix="published"))),
                               name)
    precision = resolve_precision(weights, family=family_named(layout.family),
                                  process=layout.process, vae_config=layout.configs.get("vae"))
    text = layout.text
    return plan_memory(layout, precision, batch_size=batch, size=(1024, 1024),
                       guided=text.guidance == "cfg" and text.default_guidance != 1.0)


def _smallest(plan, offload):
    """The nominal GB of the smallest GPU class that holds the plan with `offload`."""
    return next((n for n, _, mib in GPU_CLASSES if plan.peak(offload) <= mib / 1024 * GIB),
                None)


@pytest.mark.parametrize("name,weights,batch,nominal", TARGETS)
def test_the_published_models_fit_the_gpus_the_issue_targets(name, weights, batch, nominal):
    plan = _plan(name, weights, batch)
    mib = next(m for n, _, m in GPU_CLASSES if n == nominal)
    assert plan.offload_for(mib / 1024) is not None, "\n".join(plan.lines())


@pytest.mark.parametrize("name,batch,gb,alone,offloaded,net,text", OPEN)
def test_the_open_families_published_configs_are_planned(name, batch, gb, alone, offloaded, net,
                                                         text):
    """Qwen-Image, Z-Image-Turbo and Chroma: their published parameter counts, bf16 by default,
    and the plans the jobs state (Qwen-Image's VAE untiled at 1024 px, as its pipeline runs;
    Z-Image's text encoder the Qwen3Model its index names)."""
    plan = _plan(name, "auto", batch)
    assert plan.notes == [] and {p for p, _ in plan.weights.values()} == {"bf16"}
    assert plan.weights["transformer"][1] / 2 == pytest.approx(net, rel=0.005)
    assert plan.weights["text_encoder"][1] / 2 == pytest.approx(text, rel=0.005)
    assert plan.peak() / GIB == pytest.approx(gb, abs=0.06), "\n".join(plan.lines())
    assert (_smallest(plan, "none"), _smallest(plan, "text")) == (alone, offloaded)


def test_weights_are_the_parameter_counts_at_their_precision():
    plan = _plan("FLUX.1-dev", "bf16", 4)
    params = {name: b / 2 for name, (_, b) in plan.weights.items()}   # 2 bytes each in bf16
    assert params["transformer"] == pytest.approx(11.90e9, rel=0.01)  # FLUX.1-dev: 12 B
    assert params["text_encoder_2"] == pytest.approx(4.76e9, rel=0.01)  # T5-XXL encoder
    assert plan.net is not None and 1.2 * GIB < plan.net < 4.0 * GIB   # 4 rows, 4608 tokens
    assert plan.peak("text") < plan.peak("none")


def test_the_tracer_counts_live_tensors_and_their_peak():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.zeros(1024, 256)                                      # 1 MiB, excluded

        def run() -> torch.Tensor:
            a = x * 2                                                   # 1 MiB
            b = a + 1                                                   # 2 MiB alive
            del a
            return b @ torch.zeros(256, 512)                           # 1 + 0.5 + 2 MiB

        assert trace_peak(run, [x]) == (1024 * 256 + 256 * 512 + 1024 * 512) * 4  # b, w, out


@pytest.mark.parametrize("family", ["qwen-image", "z-image", "chroma"])
def test_the_open_families_are_planned_through_their_codec_and_call(open_family_dirs, family):
    """Every family says its network's inputs and its VAE's codec (Qwen-Image's VAE takes
    one-frame videos), so the plan traces both: no part is left unestimated."""
    layout = inspect_model_dir(open_family_dirs[family], family)
    precision = resolve_precision("auto", family=family_named(layout.family),
                                  process=layout.process, vae_config=layout.configs.get("vae"))
    plan = plan_memory(layout, precision, batch_size=2, size=(64, 64), guided=True)
    assert plan.notes == [] and plan.net > 0 and plan.vae > 0
