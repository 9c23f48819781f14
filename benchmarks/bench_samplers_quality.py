"""Fewer steps at equal quality? Few-evaluation samplers against the paper's full DDPM chain.

For held-out guides (procedural rooms rendered with seed 12345, never used in training, turned
into stroke paintings with pipeline.tools.strokes.simulate_strokes) and several seeds per guide,
every
candidate (ddim and dpmpp2m at 5/10/20/50 evaluations, ddpm respaced to as many) is compared with
the full chain (`ddpm`, every step from t0: 500 at t0 = 0.5). DDPM is stochastic, so besides
the same-seed distance (outputs share the perturbation noise), distributions are compared:
  l2_guide   RMS distance to the guide (faithfulness; [0, 255] scale, as in the manifests)
  same_seed  mean RMS distance to the full chain's output of the same guide and seed
  mean_dist  mean over guides of the RMS distance between per-guide output means (over seeds)
  spread     mean over guides of the RMS per-pixel std over seeds (diversity), / full chain's
A second full chain with other seeds gives the floor each figure has from randomness alone.

    python benchmarks/bench_samplers_quality.py [--model models/rooms-64] [--guides 8]
        [--seeds 4] [--t0 0.5] [--evals 5,10,20,50] [--threads 1] [--json out.json]

Without --model it uses models/rooms-64 when present, else a small random network (figures then
only show numerical agreement between samplers, not image quality).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.tools.demo_data import render_room  # noqa: E402
from pipeline.tools.strokes import simulate_strokes  # noqa: E402
from sdedit import DiffusionModel, edit, load_model  # noqa: E402
from sdedit.accel import Acceleration  # noqa: E402
from sdedit.processes import VPProcess  # noqa: E402
from sdedit.schedules import VPSchedule  # noqa: E402

HELD_OUT_SEED = 12345


def random_model(size: int = 32) -> DiffusionModel:
    """A small random UNet (no trained weights exist offline)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=size, block_out_channels=(32, 64), layers_per_block=1,
                      norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval().requires_grad_(False)
    return DiffusionModel(net=net, process=VPProcess(VPSchedule.linear()),
                          sample_size=(size, size), in_channels=3, downsample_factor=2,
                          source="random UNet", device=torch.device("cpu"),
                          dtype=torch.float32, accel=Acceleration())


def held_out_guides(n: int, size: int) -> torch.Tensor:
    """float32 (n, 3, size, size) in [-1, 1]: stroke paintings of unseen procedural rooms."""
    images = []
    for i in range(n):
        room = render_room(np.random.default_rng([HELD_OUT_SEED, i]), size)
        strokes = np.asarray(simulate_strokes(room), dtype=np.float32)
        images.append(torch.from_numpy(strokes).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(images)


def rms(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """RMS difference over `dims` on the [0, 255] scale."""
    return 127.5 * (a - b).double().pow(2).mean(dim=dims).sqrt()


def metrics(out: torch.Tensor, full: torch.Tensor, guides: torch.Tensor) -> dict[str, float]:
    """out, full: (G, S, C, H, W); guides: (G, C, H, W)."""
    spread = out.double().std(dim=1).pow(2).mean(dim=(1, 2, 3)).sqrt().mean() * 127.5
    spread_full = full.double().std(dim=1).pow(2).mean(dim=(1, 2, 3)).sqrt().mean() * 127.5
    return {
        "l2_guide": float(rms(out, guides[:, None], (2, 3, 4)).mean()),
        "same_seed": float(rms(out, full, (2, 3, 4)).mean()),
        "mean_dist": float(rms(out.mean(dim=1), full.mean(dim=1), (1, 2, 3)).mean()),
        "spread_ratio": float(spread / spread_full),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="VP model directory / hub id / URL")
    parser.add_argument("--guides", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--t0", type=float, default=0.5)
    parser.add_argument("--evals", default="5,10,20,50")
    parser.add_argument("--samplers", default="ddim,dpmpp2m,ddpm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = args.model or (str(ROOT / "models/rooms-64")
                            if (ROOT / "models/rooms-64/config.json").exists() else None)
    model = load_model(source) if source else random_model()
    if source is None:
        print("NOTE: models/rooms-64 is absent: using a small RANDOM network; the figures show "
              "numerical agreement of samplers only, not image quality")
    size = model.sample_size[0]
    guides = held_out_guides(args.guides, size)
    g, s = args.guides, args.seeds
    batch = guides.repeat_interleave(s, dim=0)                  # (G*S, C, H, W), guide-major
    seeds = [1000 * i + j for i in range(g) for j in range(s)]

    def run(sampler: str, steps: int | None, seed_offset: int = 0) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = edit(model, batch, t0=args.t0, seeds=[x + seed_offset for x in seeds],
                   sampler=sampler, steps=steps)
        return out.view(g, s, *out.shape[1:]), (time.perf_counter() - start) / len(seeds)

    print(f"model {model.source} ({size} px), {g} held-out guides x {s} seeds, t0 {args.t0}, "
          f"{args.threads} thread(s)")
    full, full_s = run("ddpm", None)
    evals_full = model.process.schedule.start_index(args.t0) + 1  # type: ignore[attr-defined]
    rows = [{"sampler": "ddpm (full)", "evals": evals_full, "s_per_edit": full_s,
             **metrics(full, full, guides)}]
    floor, floor_s = run("ddpm", None, seed_offset=7_000_000)
    rows.append({"sampler": "ddpm (full, other seeds)", "evals": evals_full,
                 "s_per_edit": floor_s, **metrics(floor, full, guides)})
    for sampler in args.samplers.split(","):
        for evals in (int(e) for e in args.evals.split(",")):
            out, sec = run(sampler, min(evals, evals_full))
            rows.append({"sampler": sampler, "evals": min(evals, evals_full), "s_per_edit": sec,
                         **metrics(out, full, guides)})
            print(f"  {sampler} {evals}: done", file=sys.stderr)

    header = f"{'sampler':>24} {'evals':>5} {'l2_guide':>8} {'same_seed':>9} " \
             f"{'mean_dist':>9} {'spread':>6} {'s/edit':>7} {'speed-up':>8}"
    print(header)
    for r in rows:
        print(f"{r['sampler']:>24} {r['evals']:>5} {r['l2_guide']:8.2f} {r['same_seed']:9.2f} "
              f"{r['mean_dist']:9.2f} {r['spread_ratio']:6.2f} {r['s_per_edit']:7.3f} "
              f"{full_s / r['s_per_edit']:8.1f}")
    print("l2/dist on the [0, 255] scale; spread = per-guide diversity / the full chain's; "
          "the 'other seeds' row is the floor from randomness alone")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.source, "t0": args.t0,
                                               "guides": g, "seeds": s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
