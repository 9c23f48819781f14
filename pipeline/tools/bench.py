"""`sdedit-batch bench`: throughput of `sdedit.edit` against the paper's loop, FLOPs and MFU.

Whole `edit` calls are timed against `pipeline.tools.reference_loop`; FLOPs are counted on the
meta device, where attention is not hidden in an uncounted fused kernel. Networks get random
weights unless `source` names a model. Figures: docs/performance.md."""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.tools import reference_loop
from sdedit import (
    DTYPES,
    Acceleration,
    DiffusionModel,
    SeedNoise,
    VPProcess,
    VPSchedule,
    count_steps,
    edit,
    load_model,
    resolve_device,
)

logger = logging.getLogger(__name__)

_DDPM = dict(in_channels=3, out_channels=3, layers_per_block=2, attention_head_dim=None,
             downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
             norm_num_groups=32, act_fn="silu", mid_block_scale_factor=1,
             center_input_sample=False, time_embedding_type="positional")
ARCHS: dict[str, dict[str, Any]] = {
    # google/ddpm-ema-bedroom-256 (= the SDEdit LSUN models): 113.7M parameters
    "ddpm-256": dict(_DDPM, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                     down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    # google/ddpm-cifar10-32: 35.7M parameters, attention at 16x16
    "ddpm-32": dict(_DDPM, sample_size=32, block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                      "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "tiny": dict(_DDPM, sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                 norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D")),
}
PEAKS: list[tuple[str, dict[str, float]]] = [
    # dense tensor-core TFLOP/s (NVIDIA data sheets); fp32 = CUDA cores, tf32 = tensor cores
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; `source` (a model) wins over `arch` (random weights)."""

    arch: str = "ddpm-256"
    source: str | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    sampler: str = "ddpm"
    steps: int | None = None
    t0: float = 0.5
    threads: tuple[int, ...] = ()
    reference: bool = True
    repeats: int = 3
    warmup_steps: int = 2
    device: str = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    channels_last: bool | None = None
    noise_threads: int | None = None


@dataclass
class BenchRow:
    """One measurement; rates count per-image network evaluations ("image-forwards")."""

    impl: str
    dtype: str
    batch: int
    threads: int
    evals: int
    seconds: float
    img_forwards_per_s: float
    edits_per_s: float
    tflops: float
    mfu: float | None
    step_ms: float
    forward_ms: float | None = None
    forward_tflops: float | None = None
    noise_ms: float | None = None
    syncs_per_edit: int | None = None
    syncs_per_step: float | None = None
    vs_reference_forwards: float | None = None
    vs_reference_edits: float | None = None


@dataclass
class BenchReport:
    config: dict[str, Any]
    env: dict[str, Any]
    gflop_per_forward: float
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "env": self.env,
                "gflop_per_forward": self.gflop_per_forward,
                "rows": [asdict(r) for r in self.rows], "notes": self.notes}


def cpu_share() -> int:
    """CPUs this process may use: affinity, capped by a cgroup v2 quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus or 1, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus or 1)


def random_model(arch: str, device: torch.device) -> DiffusionModel:
    """A UNet2DModel with the architecture `arch` and seeded random weights, float32."""
    from diffusers import UNet2DModel

    if arch not in ARCHS:
        raise PipelineError(f"arch {arch!r} is unknown; allowed: {', '.join(ARCHS)}")
    config = ARCHS[arch]
    torch.manual_seed(0)
    net = UNet2DModel(**config).to(device).eval().requires_grad_(False)
    size = config["sample_size"]
    return DiffusionModel(
        net=net, process=VPProcess(VPSchedule.linear()), sample_size=(size, size), in_channels=3,
        downsample_factor=2 ** (len(config["block_out_channels"]) - 1),
        source=f"random:{arch}", device=device, dtype=torch.float32,
        accel=Acceleration.default(device, torch.float32))


def count_flops(model: DiffusionModel) -> float:
    """FLOPs of one network forward for one image (2 per multiply-add), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = model.sample_size
    config = getattr(model.net, "config", None)
    with torch.device("meta"):
        net = type(model.net).from_config(config) if config is not None else None
    if net is None:  # not a diffusers model: count on its own device
        net, device = model.net, model.device
    else:
        device = torch.device("meta")
    x = torch.zeros(1, model.in_channels, h, w, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, torch.zeros(1, dtype=torch.long, device=device))
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """Dense peak TFLOP/s of the GPU for `dtype` (fp32 convolutions as TF32, PyTorch's default);
    None for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAKS:
        if fragment in name:
            key = "tf32" if dtype == "fp32" and torch.backends.cudnn.allow_tf32 else dtype
            return peaks[key]
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _count_syncs(fn: Callable[[int], Any], device: torch.device
                 ) -> tuple[int | None, float | None]:
    """(syncs of a 4-step call, syncs per extra step from 2 to 4 steps) seen by CUDA's sync debug
    mode; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    counts = []
    for steps in (2, 4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn(steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return counts[1], (counts[1] - counts[0]) / 2


def run_bench(config: BenchConfig, progress: Callable[[str], None] = logger.info) -> BenchReport:
    """The measurements of `config`; PipelineError for bad settings."""
    device, model, evals = _setup(config)
    flops = count_flops(model)
    report = BenchReport(config=asdict(config), env=_environment(device, model),
                         gflop_per_forward=flops / 1e9)
    for threads in config.threads or (cpu_share(),):
        torch.set_num_threads(threads)
        ref_row = None
        if config.reference:
            progress(f"reference loop, {threads} thread(s)")
            ref_row = _bench_reference(model, config, device, flops, threads)
            report.rows.append(ref_row)
        for name in config.dtypes:
            if device.type == "cpu" and name == "fp16":
                report.notes.append("fp16 skipped on the CPU (no fp16 convolutions)")
                continue
            model.accelerate(**_accel_options(config, device, DTYPES[name]))
            for batch in config.batch_sizes:
                progress(f"sdedit.edit {name} batch {batch}, {threads} thread(s)")
                row = _bench_edit(model, config, device, name, batch, threads, evals, flops)
                if ref_row is not None:
                    row.vs_reference_forwards = row.img_forwards_per_s / \
                        ref_row.img_forwards_per_s
                    row.vs_reference_edits = row.edits_per_s / ref_row.edits_per_s
                report.rows.append(row)
    return report


def _setup(config: BenchConfig) -> tuple[torch.device, DiffusionModel, int]:
    """(device, model, network evaluations per edit), or PipelineError for bad settings."""
    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc
    for name in config.dtypes:
        if name not in DTYPES:
            raise PipelineError(f"dtype {name!r} is unknown; allowed: {', '.join(DTYPES)}")
    model = load_model(config.source, device) if config.source else \
        random_model(config.arch, device)
    if not isinstance(model.process, VPProcess) or model.latent:
        raise PipelineError(f"bench needs a pixel VP (DDPM) model (the reference is the "
                            f"official DDPM loop); {model.source} is a {model.family} model "
                            f"with a {model.process.name.upper()} process")
    try:
        evals = count_steps(model, config.sampler, config.t0, config.steps)
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc
    return device, model, evals


def _accel_options(config: BenchConfig, device: torch.device, dtype: torch.dtype
                   ) -> dict[str, Any]:
    default = Acceleration.default(device, dtype)
    return dict(autocast=default.autocast, compile=config.compile,
                cuda_graphs=config.cuda_graphs,
                channels_last=default.channels_last if config.channels_last is None
                else config.channels_last,
                noise_threads=default.noise_threads if config.noise_threads is None
                else config.noise_threads)


def _bench_edit(model: DiffusionModel, config: BenchConfig, device: torch.device, name: str,
                batch: int, threads: int, evals: int, flops: float) -> BenchRow:
    size = model.sample_size
    gen = torch.Generator().manual_seed(batch)
    guides = torch.rand(batch, model.in_channels, *size, generator=gen) * 2 - 1
    seeds = list(range(batch))
    start = model.process.schedule.start_index(config.t0)  # type: ignore[attr-defined]

    def run(steps: int | None = config.steps) -> torch.Tensor:
        return edit(model, guides, t0=config.t0, seeds=seeds, sampler=config.sampler,
                    steps=steps)

    run(min(config.warmup_steps, start + 1))          # compile / capture / allocate
    seconds = _median_seconds(run, config.repeats, device)
    syncs, per_step = _count_syncs(lambda steps: run(min(steps, start + 1)), device)
    x = torch.randn(batch, model.in_channels, *size, device=device)
    t = torch.full((batch,), start, dtype=torch.long, device=device)
    with torch.no_grad():
        model.forward(x, t)
        forward = _median_seconds(lambda: model.forward(x, t), max(3, config.repeats), device)
    noise = SeedNoise(seeds, (model.in_channels, *size), torch.device("cpu"))
    noise_s = _median_seconds(lambda: noise(seeds), 5, torch.device("cpu"))
    rate = batch * evals / seconds
    peak = peak_tflops(device, name)
    return BenchRow(
        impl="sdedit", dtype=name, batch=batch, threads=threads, evals=evals, seconds=seconds,
        img_forwards_per_s=rate, edits_per_s=batch / seconds, tflops=rate * flops / 1e12,
        mfu=None if peak is None else rate * flops / 1e12 / peak,
        step_ms=1e3 * seconds / evals, forward_ms=1e3 * forward,
        forward_tflops=batch * flops / forward / 1e12, noise_ms=1e3 * noise_s,
        syncs_per_edit=syncs, syncs_per_step=per_step)


def _bench_reference(model: DiffusionModel, config: BenchConfig, device: torch.device,
                     flops: float, threads: int) -> BenchRow:
    net = reference_loop.official_network(model.net, device)
    gen = torch.Generator().manual_seed(0)
    guide = torch.rand(1, model.in_channels, *model.sample_size, generator=gen) * 2 - 1
    levels = round(config.t0 * 1000)
    batch = reference_loop.BATCH
    reference_loop.reference_edit(net, guide, min(config.warmup_steps, levels))
    seconds = _median_seconds(lambda: reference_loop.reference_edit(net, guide, levels),
                              config.repeats, device)
    syncs, per_step = _count_syncs(
        lambda steps: reference_loop.reference_edit(net, guide, min(steps, levels)), device)
    rate = batch * levels / seconds
    peak = peak_tflops(device, "fp32")
    return BenchRow(
        impl="reference", dtype="fp32", batch=batch, threads=threads, evals=levels,
        seconds=seconds, img_forwards_per_s=rate, edits_per_s=batch / seconds,
        tflops=rate * flops / 1e12, mfu=None if peak is None else rate * flops / 1e12 / peak,
        step_ms=1e3 * seconds / levels, syncs_per_edit=syncs, syncs_per_step=per_step)


def _environment(device: torch.device, model: DiffusionModel) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (_cpu_name() or "cpu")
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "cpu_share": cpu_share(), "model": model.source,
            "parameters_m": sum(p.numel() for p in model.net.parameters()) / 1e6,
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32)}


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def format_table(report: BenchReport) -> str:
    """The report as a fixed-width text table plus its notes."""
    env = report.env
    lines = [f"device: {env['device_name']} ({env['device']}), torch {env['torch']}, model "
             f"{env['model']} ({env['parameters_m']:.1f}M params, "
             f"{report.gflop_per_forward:.2f} GFLOP per image-forward)",
             f"sampler {report.config['sampler']}, t0 {report.config['t0']}, steps "
             f"{report.config['steps'] or 'default'}; rates are per image-forward; "
             "x ref = ratio to the reference loop (same threads)"]
    header = ("impl", "dtype", "batch", "thr", "evals", "s/call", "img-fwd/s", "edits/s",
              "TFLOP/s", "MFU", "x ref fwd", "x ref edit", "step ms", "fwd ms", "noise ms",
              "syncs/step")
    rows = [header]

    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in report.rows:
        rows.append((r.impl, r.dtype, str(r.batch), str(r.threads), str(r.evals),
                     f"{r.seconds:.3f}", f"{r.img_forwards_per_s:.1f}",
                     f"{r.edits_per_s:.3f}", f"{r.tflops:.3f}",
                     "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                     num(r.vs_reference_forwards, ".2f"), num(r.vs_reference_edits, ".2f"),
                     f"{r.step_ms:.2f}", num(r.forward_ms, ".2f"), num(r.noise_ms, ".2f"),
                     num(r.syncs_per_step, ".1f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
              for row in rows]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
