"""The bookkeeping of a batch whose samples start at different noise levels (per-sample t0).

Step lists are aligned at their end, so every sample finishes at the last iteration and one with
fewer steps joins later. Which samples step and draw noise is decided from CPU tables before the
loop, so the loop never synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace

import torch

__all__ = ["AfterStep", "NoiseFn", "Step", "Steps", "align"]

NoiseFn = Callable[[list[int]], torch.Tensor]
"""noise(rows): one standard normal draw per listed sample, float32 (len(rows), C, H, W)."""
AfterStep = Callable[[torch.Tensor, slice | torch.Tensor, torch.Tensor, torch.Tensor],
                     torch.Tensor]
"""after_step(x_rows, rows, signal, sigma) -> x_rows; see `sdedit.samplers`."""


def align(sequences: Sequence[Sequence[float]], pad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """End-align ragged per-sample step lists into (N, K) float64 with `pad`, and (N, K) active."""
    width = max(len(s) for s in sequences)
    grid = torch.full((len(sequences), width), pad, dtype=torch.float64)
    active = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        if seq:
            grid[i, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.float64)
            active[i, width - len(seq):] = True
    return grid, active


class Step:
    """One aligned step: `rows` selects the stepped samples of a full-batch tensor (a slice or
    an int64 index tensor), `ids` their positions; `c` their float32 (B, 1, 1, 1) coefficients
    and `index` their int64 (B,) timesteps on the device, by table name."""

    def __init__(self, rows: slice | torch.Tensor, ids: list[int], c: SimpleNamespace,
                 index: SimpleNamespace, draw: list[int], where: torch.Tensor | None) -> None:
        self.rows, self.ids, self.c, self.index = rows, ids, c, index
        self._draw, self._where = draw, where

    def add_noise(self, x_rows: torch.Tensor, noise: NoiseFn) -> torch.Tensor:
        """x_rows + c.std * z for the rows that draw noise at this step (one draw each)."""
        if not self._draw:
            return x_rows
        z = noise(self._draw)
        if self._where is None:
            return x_rows + self.c.std * z
        x_rows[self._where] = x_rows[self._where] + self.c.std[self._where] * z
        return x_rows

    def update(self, x: torch.Tensor, x_rows: torch.Tensor,
               after_step: AfterStep | None) -> torch.Tensor:
        """The batch with the stepped rows replaced by x_rows (after after_step)."""
        if after_step is not None:
            x_rows = after_step(x_rows, self.rows, self.c.signal.flatten(),
                                self.c.sigma.flatten())
        if isinstance(self.rows, slice):
            return x_rows
        x[self.rows] = x_rows
        return x


class Steps:
    """The aligned steps of a batch: `active`, `noisy` (N, K) bool CPU (sample n takes / draws
    noise at step k); float64 `tables` (each sampler gives `std`, `signal`, `sigma`) and int64
    `index` tables (N, K), moved to the device once."""

    def __init__(self, device: torch.device, active: torch.Tensor, noisy: torch.Tensor,
                 tables: dict[str, torch.Tensor],
                 index: dict[str, torch.Tensor] | None = None) -> None:
        self.active, self.noisy, self.device = active, noisy, device
        self.tables = {name: t.to(device=device, dtype=torch.float32)
                       for name, t in tables.items()}
        self.index = {name: t.to(device) for name, t in (index or {}).items()}

    def __iter__(self) -> Iterator[Step]:
        n = self.active.shape[0]
        plan = []  # built whole before the first step: the loop reads no device data
        for k in range(self.active.shape[1]):
            ids = self.active[:, k].nonzero().flatten().tolist()
            if not ids:
                continue
            rows = slice(None) if len(ids) == n else torch.tensor(ids, device=self.device)
            draw = [i for i in ids if self.noisy[i, k]]
            where = None if len(draw) == len(ids) else \
                torch.tensor([ids.index(i) for i in draw], device=self.device)
            plan.append((k, rows, ids, draw, where))
        for k, rows, ids, draw, where in plan:
            c = SimpleNamespace(**{name: t[rows, k].view(-1, 1, 1, 1)
                                   for name, t in self.tables.items()})
            index = SimpleNamespace(**{name: t[rows, k] for name, t in self.index.items()})
            yield Step(rows, ids, c, index, draw, where)
