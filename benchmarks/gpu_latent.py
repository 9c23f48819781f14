"""The latent case of the GPU run: a random-weights Flux-sized transformer at 1024 px.

A FluxTransformer2DModel with FLUX.1-dev's architecture (11.9 B parameters, float32 weights,
bf16 autocast as the engine runs it) and the Flux VAE, both with random weights, edited through
`sdedit.edit` exactly as a job does (VAE encode, Flux's packed network call with its guidance
input and position ids, `euler`, VAE decode). Text encoding is not run: the prompt rows are
random tensors of T5-XXL's and CLIP-L's output shapes (T5-XXL would add 19 GB of weights and
one ~20 TFLOP encoder pass per batch, under 0.1 s on an H100-class GPU).

For each batch size, edits of 2 and 4 steps (the faster of two runs each) give the time per
step (their difference / 2) and the fixed cost (VAE encode + decode, conditioning); a full run
is extrapolated from them:
28 steps (Flux-dev's default from t0 = 1), 17 (t0 = 0.6) and 4 (Flux-schnell, same network
without the guidance embedder). Peak device memory is recorded per batch size (the figure the
job files' memory estimates wait for). FLOPs per forward are counted on the
"meta" device (FlopCounterMode; 2 per multiply-add).

    python benchmarks/gpu_latent.py [--smoke] [--json out.json]
--smoke: a tiny Flux on the CPU at 32 px (checks the script, measures nothing useful).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdedit import DiffusionModel, edit
from sdedit.accel import Acceleration
from sdedit.conditioning import Conditioning, PromptEncoder, TextSpec
from sdedit.families.flux import flux_call, image_ids
from sdedit.latent import codec_from_vae
from sdedit.processes import DynamicShift, FlowProcess

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
"""black-forest-labs/FLUX.1-dev transformer/config.json (schnell: guidance_embeds false)."""
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16,
                block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                scaling_factor=0.3611)
TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 4, 8])
TINY_VAE = {**FLUX_VAE, "block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4,
            "layers_per_block": 1}
TEXT_TOKENS = 512
"""Flux's T5 sequence length."""


class RandomPrompts(PromptEncoder):
    """Prompt rows of T5-XXL's (B, 512, joint_attention_dim) and CLIP-L's (B, pooled) shapes,
    random; Flux's position ids; the guidance input (a stand-in for the text encoders)."""

    spec = TextSpec("embedded", 3.5)

    def __init__(self, device: torch.device, text_dim: int, pooled_dim: int,
                 factor: int) -> None:
        self.device, self.text_dim, self.pooled_dim, self.factor = \
            device, text_dim, pooled_dim, factor

    def encode(self, prompts: list[str], negatives: list[str] | None,
               size: tuple[int, int], guidance: float | None
               ) -> tuple[Conditioning, Conditioning | None]:
        g = torch.Generator().manual_seed(0)
        n = len(prompts)
        rows = {"encoder_hidden_states": torch.randn(n, TEXT_TOKENS, self.text_dim, generator=g),
                "pooled_projections": torch.randn(n, self.pooled_dim, generator=g),
                "guidance": torch.full((n,), float(guidance or 3.5))}
        shared = {"txt_ids": torch.zeros(TEXT_TOKENS, 3),
                  "img_ids": image_ids(size[0] // self.factor, size[1] // self.factor)}
        return Conditioning({k: v.to(self.device) for k, v in rows.items()},
                            {k: v.to(self.device) for k, v in shared.items()}), None

    def modules(self) -> list[torch.nn.Module]:
        return []


def flux_model(device: torch.device, smoke: bool) -> DiffusionModel:
    """A random-weights Flux-dev-sized model on `device` (bf16 autocast on CUDA)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (12 B parameters)
        net = FluxTransformer2DModel(**(TINY if smoke else FLUX_DEV))
        vae = AutoencoderKL(**(TINY_VAE if smoke else FLUX_VAE))
    net.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    codec = codec_from_vae(vae)
    dtype = torch.float32 if smoke else torch.bfloat16
    config = net.config
    return DiffusionModel(
        net=net, process=FlowProcess(shift=3.0, dynamic=DynamicShift()),
        sample_size=(32, 32) if smoke else (1024, 1024), in_channels=3,
        downsample_factor=codec.factor * 2, source="random:flux-dev", device=device,
        dtype=dtype, call=flux_call, family="flux",
        accel=Acceleration.default(device, dtype), codec=codec,
        text=RandomPrompts(device, config.joint_attention_dim, config.pooled_projection_dim,
                           codec.factor), patch=2)


def forward_flops(model: DiffusionModel) -> float:
    """FLOPs of one network forward for one image at `sample_size` (meta device)."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with meta:
        net = FluxTransformer2DModel.from_config(model.net.config)
    h, w = (s // model.codec.factor for s in model.sample_size)
    x = torch.zeros(1, model.codec.channels, h, w, device=meta)
    cond, _ = RandomPrompts(meta, net.config.joint_attention_dim,
                            net.config.pooled_projection_dim, model.codec.factor).encode(
        [""], None, model.sample_size, 3.5)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        flux_call(net, x, torch.full((1,), 500.0, device=meta), cond)
    return float(counter.get_total_flops())


def _timed(model: DiffusionModel, guides: torch.Tensor, steps: int) -> float:
    seeds = list(range(len(guides)))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    edit(model, guides, t0=1.0, seeds=seeds, sampler="euler", steps=steps,
         prompts=[""] * len(guides), guidance_scale=3.5)
    sync()
    return time.perf_counter() - start


def run(device: torch.device, smoke: bool, batches: tuple[int, ...] = (1, 4)
        ) -> dict[str, Any]:
    """The measurements (see the module docstring), as a JSON-able dict."""
    from pipeline.tools.bench import peak_tflops

    start = time.perf_counter()
    model = flux_model(device, smoke)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out: dict[str, Any] = {
        "model": "random FLUX.1-dev-sized transformer + Flux VAE" + (" (tiny)" if smoke else ""),
        "parameters_b": sum(p.numel() for p in model.net.parameters()) / 1e9,
        "size": list(model.sample_size), "dtype": str(model.dtype),
        "build_s": time.perf_counter() - start, "rows": []}
    flops = forward_flops(model)
    out["gflop_per_forward"] = flops / 1e9
    peak = None if smoke else peak_tflops(device, "bf16")
    h, w = model.sample_size
    for batch in batches:
        guides = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(batch)) \
            .to(device) * 2 - 1
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        _timed(model, guides, 1)                       # warm-up (kernel selection)
        two = min(_timed(model, guides, 2) for _ in range(2))
        four = min(_timed(model, guides, 4) for _ in range(2))
        step = (four - two) / 2
        fixed = max(0.0, two - 2 * step)
        row = {"batch": batch, "edit_2_steps_s": two, "edit_4_steps_s": four,
               "step_s": step, "fixed_s": fixed,
               "per_image_full": {name: (fixed + n * step) / batch
                                  for name, n in (("dev_28_steps", 28),
                                                  ("dev_t0_0.6_17_steps", 17),
                                                  ("schnell_4_steps", 4))},
               "tflops": flops * batch / step / 1e12 if step > 0 else None}
        if peak and row["tflops"]:
            row["mfu"] = row["tflops"] / peak
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        out["rows"].append(row)
        print("# latent flux:", json.dumps(row), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU (a check)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    result = run(device, args.smoke, (1, 2) if args.smoke else (1, 4))
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
