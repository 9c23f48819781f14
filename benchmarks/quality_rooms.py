"""Does SDEdit with the bundled model beat its stroke guides? Faithfulness and realism.

Held-out procedural rooms (a seed not used in training) are turned into simulated strokes as in
the paper's evaluation (median filter + 6-colour palette); the bundled model edits them at
several t0. Figures, per set (strokes, SDEdit outputs per t0, real images):
  * L2 to the original: mean per-image RMS difference to the held-out original, 0..255 units;
    also L2 to the guide (the paper's faithfulness figure);
  * realism: a small CNN is trained to tell real rooms from strokes (on other images); we report
    the fraction of each set it judges real, and KID (x100) between the set and held-out real
    rooms on that CNN's features (polynomial kernel, unbiased MMD^2; lower = closer to real).

    python benchmarks/quality_rooms.py [--model models/rooms-64 --n 64 --sampler ddpm --steps 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tools.demo_data import render_room
from pipeline.tools.strokes import simulate_strokes
from sdedit import edit, load_model

T0S = (0.3, 0.4, 0.5, 0.6)


def rooms(seed: int, n: int, size: int) -> np.ndarray:
    """uint8 (n, size, size, 3) rooms rendered with rng([seed, i]) (training used seed 0)."""
    return np.stack([np.asarray(render_room(np.random.default_rng([seed, i]), size))
                     for i in range(n)])


def strokes(images: np.ndarray) -> np.ndarray:
    return np.stack([simulate_strokes(img) for img in images])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def rms(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image RMS difference, 0..255 units."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt((diff**2).reshape(len(a), -1).mean(1)).mean())


class Critic(torch.nn.Module):
    """A small CNN: real procedural room (1) vs stroke painting (0); 64-d features."""

    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 3
        for out in (16, 32, 64, 64):
            layers += [torch.nn.Conv2d(width, out, 3, stride=2, padding=1), torch.nn.SiLU()]
            width = out
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1),
                                            torch.nn.Flatten())
        self.head = torch.nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


def train_critic(real: np.ndarray, fake: np.ndarray, steps: int = 400) -> Critic:
    torch.manual_seed(0)
    critic = Critic()
    opt = torch.optim.Adam(critic.parameters(), lr=2e-3)
    x = torch.cat([to_tensor(real), to_tensor(fake)])
    y = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        batch = x[idx]
        flip = torch.rand(64) < 0.5
        batch[flip] = batch[flip].flip(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(critic(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return critic.eval()


def kid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al., 2018)."""
    d = a.shape[1]

    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ y.T / d + 1) ** 3

    m, n = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - kaa.diag().sum()) / (m * (m - 1))
                 + (kbb.sum() - kbb.diag().sum()) / (n * (n - 1)) - 2 * kab.mean())


def grid(rows: list[list[np.ndarray]], path: Path, scale: int = 2) -> None:
    """Write a PNG grid of uint8 tiles (rows x columns), each upscaled `scale` times."""
    tile = rows[0][0].shape[0] * scale
    pad = 4
    sheet = Image.new("RGB", (len(rows[0]) * (tile + pad) + pad, len(rows) * (tile + pad) + pad),
                      "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            im = Image.fromarray(img).resize((tile, tile), Image.NEAREST)
            sheet.paste(im, (pad + c * (tile + pad), pad + r * (tile + pad)))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/rooms-64")
    parser.add_argument("--n", type=int, default=64, help="held-out images")
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--preview", default=None, help="PNG: strokes | outputs per t0 | real")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    size = model.sample_size[0]
    real_eval, real_ref = rooms(12345, args.n, size), rooms(54321, args.n, size)
    guide = strokes(real_eval)
    train_real = rooms(777, 256, size)
    critic = train_critic(train_real, strokes(train_real))

    sets: dict[str, np.ndarray] = {"strokes (guides)": guide}
    for t0 in T0S:
        out = edit(model, to_tensor(guide), t0=t0, seeds=list(range(args.n)),
                   sampler=args.sampler, steps=args.steps)
        sets[f"SDEdit t0={t0}"] = ((out + 1) * 127.5).round().clamp(0, 255).byte() \
            .permute(0, 2, 3, 1).numpy()
    sets["real rooms (other seeds)"] = real_ref

    with torch.no_grad():
        ref_features = critic.features(to_tensor(real_eval))
        mean, std = ref_features.mean(0), ref_features.std(0).clamp(min=1e-6)
        table = []
        for name, images in sets.items():
            x = to_tensor(images)
            features = (critic.features(x) - mean) / std  # z-scored by held-out real rooms
            table.append({
                "set": name,
                "l2_to_original": rms(images, real_eval),
                "l2_to_guide": rms(images, guide),
                "judged_real": float((critic(x) > 0).float().mean()),
                "kid_x100": 100 * kid(features, (ref_features - mean) / std),
            })
    print(f"model {args.model}; {args.n} held-out rooms (seed 12345) at {size}px; sampler "
          f"{args.sampler}, {args.steps} steps; {time.perf_counter() - start:.0f} s")
    print(f"{'set':28s}{'L2 to original':>16s}{'L2 to guide':>13s}{'judged real':>13s}"
          f"{'KID x100':>10s}")
    for row in table:
        print(f"{row['set']:28s}{row['l2_to_original']:16.2f}{row['l2_to_guide']:13.2f}"
              f"{row['judged_real']:13.2f}{row['kid_x100']:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    if args.preview:
        outs = [sets[f"SDEdit t0={t0}"] for t0 in T0S]
        grid([[guide[i], *[o[i] for o in outs], real_eval[i]] for i in range(6)],
             Path(args.preview))


if __name__ == "__main__":
    main()
