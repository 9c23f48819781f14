"""Weights precision (`sdedit.precision`): auto per family, each part's dtype, fp8 storage, the
outputs of low-precision weights against fp32, offload's swap and regional compilation."""

from __future__ import annotations

import types

import pytest
import torch

from sdedit import edit, load_model
from sdedit.accel import repeated_blocks
from sdedit.families import FAMILIES
from sdedit.precision import (
    compute_dtype_problem,
    published_precision,
    resolve_precision,
    w8a8_unavailable,
)
from sdedit.processes import FlowProcess, VPProcess
from sdedit.prompts import swapped
from sdedit.schedules import VPSchedule

LEVELS = {"bf16": 12.0, "fp16": 2.0, "fp8": 12.0}
"""Largest difference from fp32 allowed, in levels of 255, over 2 tiny-model edits of 4
steps at t0 0.6 (measured on x86-64 CPUs: Flux bf16 5.6, fp16 0.2, fp8 6.1; SDXL bf16 2.2,
fp16 0.3, fp8 2.8). bf16 keeps 8 bits of mantissa (a relative error of 2^-9 per rounding), so
a random tiny network's output moves a few levels; twice the worst measured value leaves room
for other CPUs' kernels. A broken cast (a part left in float8, an fp16 overflow) moves it by
tens of levels or NaN."""


def _levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) * 127.5


@pytest.mark.parametrize("fixture,sampler", [("tiny_flux_dev_dir", "euler"),
                                             ("tiny_sdxl_dir", "ddim")])
def test_low_precision_outputs_stay_close_to_fp32(fixture, sampler, request):
    directory = request.getfixturevalue(fixture)
    guides = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    outputs = {}
    for weights in ("fp32", "bf16", "fp16", "fp8"):
        model = load_model(directory, weights_dtype=weights)
        outputs[weights] = edit(model, guides, t0=0.6, seeds=[1, 2], sampler=sampler, steps=4,
                                prompts=["red cat", "blue dog"])
        assert torch.isfinite(outputs[weights]).all()
    for weights, tolerance in LEVELS.items():
        assert _levels(outputs[weights], outputs["fp32"]) <= tolerance, weights
    assert _levels(outputs["bf16"], outputs["fp32"]) > 0     # it did run in bf16


OPEN = ("qwen-image", "z-image", "chroma")


def test_auto_is_each_familys_published_precision(tiny_flux_dev_dir, tiny_sdxl_dir, tiny_vp_dir):
    flux = load_model(tiny_flux_dev_dir, weights_dtype="auto")
    assert (flux.precision.net, flux.precision.vae, flux.precision.text) == ("bf16",) * 3
    assert flux.dtype == torch.bfloat16 and flux.accel.autocast is None
    assert {p.dtype for p in flux.net.parameters()} == {torch.bfloat16}
    assert next(flux.codec.vae.parameters()).dtype == torch.bfloat16
    assert {next(m.parameters()).dtype for m in flux.text.modules()} == {torch.bfloat16}
    assert flux.identity.endswith("@ text_encoder bf16, text_encoder_2 bf16, transformer "
                                  "bf16, vae bf16")
    sdxl = load_model(tiny_sdxl_dir, weights_dtype="auto")    # its VAE says force_upcast
    assert (sdxl.precision.net, sdxl.precision.vae, sdxl.precision.text) == \
        ("fp16", "fp32", "fp16")
    assert next(sdxl.codec.vae.parameters()).dtype == torch.float32
    pixel = load_model(tiny_vp_dir, weights_dtype="auto")
    assert pixel.precision.net == "fp32" and "@" not in pixel.identity   # pins stay
    # every family declares its precision; the open flow families theirs (bf16)
    assert {f.name: f.weights_precision for f in FAMILIES if f.name in OPEN} == \
        dict.fromkeys(OPEN, "bf16")
    # a family that declares None (one added later): flow models bf16, others fp32
    later = types.SimpleNamespace(name="new", weights_precision=None)
    assert published_precision(later, FlowProcess(shift=1.0)) == "bf16"
    assert published_precision(later, VPProcess(VPSchedule.linear())) == "fp32"
    assert resolve_precision("fp16", family=later, process=FlowProcess(shift=1.0),
                             vae_config={"force_upcast": False}).vae == "fp16"


def test_fp8_stores_the_linear_layers_in_float8(tiny_flux_dev_dir):
    model = load_model(tiny_flux_dev_dir, weights_dtype="fp8")
    linears = [m for m in model.net.modules() if isinstance(m, torch.nn.Linear)]
    stored = {m.weight.dtype for m in linears}
    assert torch.float8_e4m3fn in stored and torch.float32 not in stored
    assert model.net_path.startswith("fp8 storage, bf16 compute (layerwise casting: no FP8")
    assert w8a8_unavailable(torch.device("cpu")) == "no FP8 matrix units on cpu"
    assert model.dtype == torch.bfloat16


def test_compute_dtype_beside_low_precision_weights_is_checked(tiny_flux_dev_dir):
    bf16 = resolve_precision("bf16", family=None, process=FlowProcess(shift=1.0),
                             vae_config={})
    assert compute_dtype_problem(bf16, "auto") is None
    assert compute_dtype_problem(bf16, "bf16") is None
    problem = compute_dtype_problem(bf16, "fp16")
    assert "computes in bf16; allowed: auto or bf16, or model.weights_dtype fp32" in problem
    fp32 = resolve_precision("fp32", family=None, process=FlowProcess(shift=1.0), vae_config={})
    assert compute_dtype_problem(fp32, "fp16") is None        # autocast of fp32 weights
    with pytest.raises(ValueError, match=r"with bf16 weights; allowed: torch\.float32 or"):
        load_model(tiny_flux_dev_dir, dtype=torch.float16, weights_dtype="bf16")
    with pytest.raises(ValueError, match="weights_dtype='fp4' is unknown"):
        load_model(tiny_flux_dev_dir, weights_dtype="fp4")


def test_offload_text_swaps_the_encoders_with_the_network():
    moves: list[tuple[str, str]] = []

    def recorder(name: str) -> torch.nn.Module:
        module = torch.nn.Linear(2, 2)
        module.to = lambda device: moves.append((name, str(device)))  # type: ignore[method-assign]
        return module

    net, encoders = recorder("net"), [recorder("clip"), recorder("t5")]
    with swapped(net, encoders, torch.device("cuda")):
        moves.append(("encode", ""))
    assert moves == [("net", "cpu"), ("clip", "cuda"), ("t5", "cuda"), ("encode", ""),
                     ("clip", "cpu"), ("t5", "cpu"), ("net", "cuda")]
    moves.clear()
    with swapped(net, encoders, torch.device("cpu")):          # nothing to swap on a CPU
        pass
    assert moves == []


def test_regional_compile_compiles_the_repeated_blocks(tiny_flux_dev_dir):
    model = load_model(tiny_flux_dev_dir)
    assert repeated_blocks(model.net) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    guides = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    eager = edit(model, guides, t0=0.3, seeds=[4], sampler="euler", steps=1, prompts=["sky"])
    model.accelerate(compile_regional=True, compile_backend="eager")
    compiled = edit(model, guides, t0=0.3, seeds=[4], sampler="euler", steps=1,
                    prompts=["sky"])
    assert torch.allclose(eager, compiled, atol=1e-5)
    model.accelerate(compile_regional=False)
