"""`sdedit-batch bench --family flux|sdxl`: the latent families at real sizes, random weights.

A FLUX.1-dev-sized transformer or SDXL base's UNet, with its VAE, edited through `sdedit.edit` at
1024 x 1024 as a job does; text encoders are not run (random prompt rows), so their weights stay
off the device. Diffusers' img2img pipeline is timed beside it; `smoke` checks the code path on
the CPU. Figures: docs/performance.md."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from sdedit import (
    MAX_CACHE_BYTES,
    RUNTIME_BYTES,
    Acceleration,
    Conditioning,
    DiffusionModel,
    DynamicShift,
    FlowProcess,
    ModelLayout,
    PromptEncoder,
    TextSpec,
    VPProcess,
    VPSchedule,
    apply_precision,
    codec_from_vae,
    edit,
    family_named,
    flux_call,
    image_ids,
    plan_memory,
    resolve_precision,
    sdxl_call,
)

logger = logging.getLogger(__name__)

__all__ = ["CONFIGS", "build", "compile_part", "fp8_quality", "run_latent", "ssim"]

_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3,
        "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "force_upcast": True}
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "flux": {"transformer": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
                             "guidance_embeds": True, "in_channels": 64,
                             "joint_attention_dim": 4096, "num_attention_heads": 24,
                             "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
                             "pooled_projection_dim": 768},
             "vae": {**_VAE, "latent_channels": 16, "shift_factor": 0.1159,
                     "scaling_factor": 0.3611, "use_quant_conv": False,
                     "use_post_quant_conv": False}},
    "sdxl": {"unet": {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time",
                      "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
                      "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
                      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                           "CrossAttnDownBlock2D"],
                      "in_channels": 4, "layers_per_block": 2, "out_channels": 4,
                      "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
                      "transformer_layers_per_block": [1, 2, 10],
                      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                         "UpBlock2D"], "use_linear_projection": True},
             "vae": {**_VAE, "latent_channels": 4, "scaling_factor": 0.13025}},
}
"""The published FLUX.1-dev transformer / SDXL base 1.0 UNet and their VAEs' configs."""
TINY = {"flux": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                 "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 4, 8],
                 "pooled_projection_dim": 32},
        "sdxl": {"block_out_channels": [32, 64], "attention_head_dim": [2, 4],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                 "transformer_layers_per_block": [1, 2], "cross_attention_dim": 64,
                 "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
                 "norm_num_groups": 32},
        "vae": {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4, "layers_per_block": 1}}
T0_STEPS = {"flux": 17, "sdxl": 30}
"""Network evaluations of one edit at t0 = 0.6 (Flux-dev's 28 and SDXL img2img's 50 steps)."""


class RandomPrompts(PromptEncoder):
    """Prompt rows of the text encoders' output shapes, random (their weights never loaded)."""

    def __init__(self, family: str, net: dict[str, Any], factor: int, device: torch.device
                 ) -> None:
        self.family, self.net, self.factor, self.device = family, net, factor, device
        self.spec = TextSpec("embedded", 3.5) if family == "flux" else TextSpec("cfg", 5.0)

    def encode(self, prompts: list[str], negatives: list[str] | None, size: tuple[int, int],
               guidance: float | None) -> tuple[Conditioning, Conditioning | None]:
        g, n = torch.Generator().manual_seed(0), len(prompts)
        if self.family == "flux":
            rows = {"encoder_hidden_states": torch.randn(n, 512, self.net["joint_attention_dim"],
                                                         generator=g),
                    "pooled_projections": torch.randn(n, self.net["pooled_projection_dim"],
                                                      generator=g),
                    "guidance": torch.full((n,), float(guidance or 3.5))}
            shared = {"txt_ids": torch.zeros(512, 3),
                      "img_ids": image_ids(size[0] // self.factor, size[1] // self.factor)}
            return _on(Conditioning(rows, shared), self.device), None
        pooled = self.net["projection_class_embeddings_input_dim"] - \
            6 * self.net["addition_time_embed_dim"]
        cond = Conditioning({"encoder_hidden_states": torch.randn(
            n, 77, self.net["cross_attention_dim"], generator=g),
            "text_embeds": torch.randn(n, pooled, generator=g),
            "time_ids": torch.tensor([[*size, 0, 0, *size]] * n, dtype=torch.float32)})
        uncond = None if negatives is None else Conditioning(
            {k: torch.zeros_like(v) if k != "time_ids" else v for k, v in cond.rows.items()})
        return _on(cond, self.device), None if uncond is None else _on(uncond, self.device)

    def modules(self) -> list[torch.nn.Module]:
        return []


def _on(cond: Conditioning, device: torch.device) -> Conditioning:
    return Conditioning({k: v.to(device) for k, v in cond.rows.items()},
                        {k: v.to(device) for k, v in cond.shared.items()})


def _configs(family: str, smoke: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    net_name = "transformer" if family == "flux" else "unet"
    net, vae = copy.deepcopy(CONFIGS[family][net_name]), copy.deepcopy(CONFIGS[family]["vae"])
    if smoke:
        net.update(TINY[family])
        vae.update(TINY["vae"])
    return net, vae


def build(family: str, weights: str, device: torch.device, smoke: bool) -> DiffusionModel:
    """A random-weights model of `family` at precision `weights` on `device`."""
    import diffusers

    net_config, vae_config = _configs(family, smoke)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 12 B parameters
        net = getattr(diffusers, net_config["_class_name"]).from_config(net_config)
        vae = diffusers.AutoencoderKL.from_config(vae_config)
    net.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    precision = resolve_precision(weights, family=family_named(family),
                                  process=FlowProcess(shift=3.0) if family == "flux" else
                                  VPProcess(VPSchedule.linear()), vae_config=vae_config)
    path = apply_precision(net, vae, [], precision, device)
    net.to(device)
    vae.to(device)
    codec = codec_from_vae(vae)
    codec.bound_memory()
    flux = family == "flux"
    size = 32 if smoke else 1024
    process = FlowProcess(shift=3.0, dynamic=DynamicShift()) if flux else \
        VPProcess(VPSchedule.from_config({"beta_start": 0.00085, "beta_end": 0.012,
                                          "beta_schedule": "scaled_linear"}))
    return DiffusionModel(
        net=net, process=process, sample_size=(size, size), in_channels=3,
        downsample_factor=codec.factor * (2 if flux else 4), source=f"random:{family}",
        device=device, dtype=precision.compute, call=flux_call if flux else sdxl_call,
        family=family, accel=Acceleration.default(device, torch.float32), codec=codec,
        text=RandomPrompts(family, net_config, codec.factor, device), patch=2 if flux else 1,
        precision=precision, net_path=path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn: Callable[[], Any], device: torch.device, runs: int = 2) -> float:
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _step_flops(model: DiffusionModel, rows: int) -> float:
    """FLOPs of one network call of `rows` rows at the sample size (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    family = model.family
    net_config, _ = _configs(family, model.sample_size[0] == 32)
    import diffusers

    with torch.device("meta"):
        net = getattr(diffusers, net_config["_class_name"]).from_config(net_config)
        h = model.sample_size[0] // model.codec.factor
        x = torch.zeros(rows, model.codec.channels, h, h)
        text: RandomPrompts = model.text  # type: ignore[assignment]
        cond, _ = RandomPrompts(family, net_config, text.factor, torch.device("meta")).encode(
            [""] * rows, None, model.sample_size, 3.5)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.call(net, x, torch.zeros(rows), cond)
    return float(counter.get_total_flops())


def run_latent(family: str, device: torch.device, smoke: bool,
               weights: tuple[str, ...] = ("bf16", "fp8"), batches: tuple[int, ...] = (1, 4),
               reference: bool = True) -> dict[str, Any]:
    """The measurements of `family` on `device`, as a JSON-able dict."""
    from pipeline.tools.bench import peak_tflops

    out: dict[str, Any] = {"family": family, "rows": [], "reference": []}
    for name in weights:
        start = time.perf_counter()
        model = build(family, name, device, smoke)
        _sync(device)
        built = time.perf_counter() - start
        cfg = family == "sdxl"
        parts = {"network": model.net, "vae": model.codec.vae}  # type: ignore[union-attr]
        weights_gb = {k: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30
                      for k, m in parts.items()}
        for batch in batches:
            out["rows"].append({**_measure(model, name, batch, cfg, built, peak_tflops(
                device, "bf16") if not smoke else None), "weights_gb": weights_gb})
            logger.info("latent %s %s batch %d: %s", family, name, batch, out["rows"][-1])
        if reference and name == weights[0]:
            out["reference"] = [_diffusers(model, batch) for batch in batches]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _measure(model: DiffusionModel, weights: str, batch: int, cfg: bool, built: float,
             peak: float | None) -> dict[str, Any]:
    device, size = model.device, model.sample_size
    guides = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    sampler = "euler" if model.family == "flux" else "ddim"

    def run(steps: int) -> None:
        edit(model, guides.to(device), t0=1.0 if model.family == "flux" else 0.999,
             seeds=list(range(batch)), sampler=sampler, steps=steps,
             prompts=[""] * batch, **({"negative_prompts": [""] * batch} if cfg else {}))

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runs = 1 if size[0] == 32 else 2
    run(1)
    two, four = _best(lambda: run(2), device, runs), _best(lambda: run(4), device, runs)
    step = max((four - two) / 2, 1e-9)
    fixed = max(0.0, two - 2 * step)
    rows = batch * (2 if cfg else 1)
    flops = _step_flops(model, rows)
    n = T0_STEPS[model.family]
    row = {"weights": weights, "network": model.net_path, "batch": batch, "build_s": built,
           "s_per_step": step, "fixed_s": fixed, "edits_per_hour_t0_0.6":
           3600 * batch / (fixed + n * step), "tflop_per_step": flops / 1e12,
           "tflops": flops / step / 1e12}
    if peak:
        row["mfu"] = row["tflops"] / peak
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    row["plan_gb"] = _plan(model, batch, cfg) / 2**30
    return row


def _plan(model: DiffusionModel, batch: int, cfg: bool) -> int:
    """The plan of what this run holds: network, VAE, activations and batch, no text encoders'
    weights and no runtime allowance (max_memory_allocated counts none)."""
    net_config, vae_config = _configs(model.family, model.sample_size[0] == 32)
    name = "transformer" if model.family == "flux" else "unet"
    configs: dict[str, Any] = {name: net_config, "vae": vae_config, "index": {}}
    if model.family == "sdxl":  # its network call's shapes come from CLIP-G's config
        configs["text_encoder_2"] = {"architectures": ["CLIPTextModelWithProjection"],
                                     "max_position_embeddings": 77, "hidden_size": 64,
                                     "intermediate_size": 64, "num_attention_heads": 2,
                                     "num_hidden_layers": 1, "projection_dim": net_config[
                                         "projection_class_embeddings_input_dim"] - 6 *
                                     net_config["addition_time_embed_dim"]}
    layout = ModelLayout(family=model.family, directory=None,  # type: ignore[arg-type]
                         process=model.process, sample_size=model.sample_size, in_channels=3,
                         downsample_factor=model.downsample_factor,
                         text=model.text.spec,  # type: ignore[union-attr]
                         configs=configs)
    plan = plan_memory(layout, model.precision, batch_size=batch, size=model.sample_size,
                       guided=cfg)
    return plan.peak("text") - RUNTIME_BYTES - MAX_CACHE_BYTES


def _diffusers(model: DiffusionModel, batch: int) -> dict[str, Any]:
    """diffusers' img2img pipeline with the same network, VAE and prompt embeddings: seconds per
    step and fixed cost from runs of 2 and 4 steps."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    device, size = model.device, model.sample_size[0]
    cond, _ = model.text.encode([""] * batch, None, model.sample_size, 3.5)  # type: ignore
    image = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    dtype = model.precision.compute
    if model.family == "flux":
        pipe = diffusers.FluxImg2ImgPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=model.codec.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None, transformer=model.net)
        kwargs = {"prompt_embeds": cond.rows["encoder_hidden_states"].to(dtype),
                  "pooled_prompt_embeds": cond.rows["pooled_projections"].to(dtype)}
    else:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=model.codec.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
            tokenizer_2=None, unet=model.net, scheduler=diffusers.EulerDiscreteScheduler())
        kwargs = {"prompt_embeds": cond.rows["encoder_hidden_states"].to(dtype),
                  "pooled_prompt_embeds": cond.rows["text_embeds"].to(dtype),
                  "negative_prompt_embeds": torch.zeros_like(cond.rows[
                      "encoder_hidden_states"]).to(dtype),
                  "negative_pooled_prompt_embeds": torch.zeros_like(cond.rows[
                      "text_embeds"]).to(dtype)}
    pipe.set_progress_bar_config(disable=True)
    diffusers.utils.logging.set_verbosity_error()  # its VAE upcast warns on every call

    def run(steps: int) -> None:
        pipe(image=image, strength=1.0, num_inference_steps=steps, height=size, width=size,
             output_type="pt", **kwargs)

    runs = 1 if size == 32 else 2
    run(1)
    two, four = _best(lambda: run(2), device, runs), _best(lambda: run(4), device, runs)
    step = max((four - two) / 2, 1e-9)
    return {"impl": f"diffusers {type(pipe).__name__}", "batch": batch, "s_per_step": step,
            "fixed_s": max(0.0, two - 2 * step)}


def compile_part(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Flux bf16 with regional torch.compile: the first (compiling) 2-step edit against the next,
    and s/step from 2- and 4-step edits after."""
    model = build("flux", "bf16", device, smoke)
    model.accelerate(compile_regional=True, compile_backend="eager" if smoke else "inductor")
    guides = torch.rand(1, 3, *model.sample_size, generator=torch.Generator().manual_seed(2))

    def run(steps: int) -> None:
        edit(model, guides.to(device) * 2 - 1, t0=1.0, seeds=[0], sampler="euler",
             steps=steps, prompts=[""])

    first = _best(lambda: run(2), device, 1)
    two, four = _best(lambda: run(2), device, 1), _best(lambda: run(4), device, 1)
    return {"compile_s": max(0.0, first - two), "s_per_step": max((four - two) / 2, 1e-9),
            "blocks": "FluxTransformerBlock, FluxSingleTransformerBlock"}


def fp8_quality(device: torch.device, smoke: bool, n: int = 4) -> dict[str, Any]:
    """The same Flux edits with bf16 and fp8 weights of one seeded random network: SSIM of fp8's
    outputs to bf16's and the largest difference in levels of 255."""
    size = 32 if smoke else 1024
    g = torch.Generator().manual_seed(5)
    guides = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size,
                                             mode="bicubic").clamp(0, 1) * 2 - 1
    outputs = {}
    for weights in ("bf16", "fp8"):
        model = build("flux", weights, device, smoke)
        outputs[weights] = torch.cat([edit(model, guides[i:i + 1].to(device), t0=0.6,
                                           seeds=[i], sampler="euler", steps=2 if smoke else 17,
                                           prompts=[""]).cpu() for i in range(n)])
        outputs[weights + "_path"] = model.net_path  # type: ignore[assignment]
        del model
    a, b = (outputs[w] * 0.5 + 0.5 for w in ("bf16", "fp8"))
    scores = [ssim(a[i], b[i]) for i in range(n)]
    return {"ssim_mean": sum(scores) / n, "ssim_min": min(scores),
            "max_levels": float((a - b).abs().max()) * 255, "fp8_path": outputs["fp8_path"]}


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """SSIM of two (3, H, W) images in [0, 1] (Wang et al. 2004: 11 x 11 Gaussian window, sigma
    1.5, per channel, averaged)."""
    coords = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(z[None].float(), window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())
