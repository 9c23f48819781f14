"""A realism feature network for the bundled model's domain, for `sdedit-batch eval
--features torchscript`: quality_rooms.py's critic (a small CNN trained to tell procedural rooms
from their simulated stroke paintings, on 256 rooms of seed 777, which neither the training
data, seed 0, nor the t0 sweep's guides, seed 2026, use), scripted with its input convention
(float32 (N, 3, H, W) in [0, 1]) and its 64-d features as the output.

    python benchmarks/rooms_critic.py --out data/rooms-critic.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality_rooms import rooms, strokes, train_critic


class Features(torch.nn.Module):
    """The critic's features of [0, 1] images (it was trained on [-1, 1])."""

    def __init__(self, features: torch.nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x * 2 - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/rooms-critic.pt")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    real = rooms(777, 256, args.size)
    critic = train_critic(real, strokes(real))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Features(critic.features).eval()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
