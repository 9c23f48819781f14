"""The network of the official DDPM / SDEdit code (`models/diffusion.py` `Model`), written here
from its description, to test the checkpoint converter against: same module names (hence the
same state-dict keys), same arithmetic.

Description: sinusoidal timestep embedding of width ch (sin half then cos half, frequencies
exp(-log(10000) i / (ch/2 - 1))), two linear layers to 4ch with swish between; GroupNorm(32,
eps 1e-6) everywhere; ResnetBlock: norm1, swish, conv1 3x3, + temb_proj(swish(temb)), norm2,
swish, dropout, conv2 3x3, a 1x1 nin_shortcut when channels change; AttnBlock: norm, 1x1 convs
q, k, v, softmax(q^T k / sqrt(C)) over positions, proj_out, residual; Downsample: pad (0, 1, 0, 1)
then a 3x3 stride-2 conv; Upsample: nearest x2 then a 3x3 conv. Down level i has num_res_blocks
resnets (+ attention after each if its resolution is in attn_resolutions) and a downsample except
the last; the middle is block_1, attn_1, block_2; up levels run from the lowest resolution up, each
with num_res_blocks + 1 resnets fed the popped skip, and are stored as up[i] by resolution level.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :].to(t.device)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2, self.dropout = _norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = h + self.temb_proj(_swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1)
                                                 for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).permute(0, 2, 1)
        k = self.k(n).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        out = torch.bmm(self.v(n).reshape(b, c, h * w), weights.permute(0, 2, 1))
        return x + self.proj_out(out.reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class OfficialDDPM(nn.Module):
    """The official `Model(config)`; config.model: ch, out_ch, ch_mult, num_res_blocks,
    attn_resolutions, dropout, in_channels; config.data.image_size."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        m = config.model
        self.ch, self.levels, self.blocks = m.ch, len(m.ch_mult), m.num_res_blocks
        temb = 4 * m.ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(m.ch, temb), nn.Linear(temb, temb)])
        self.conv_in = nn.Conv2d(m.in_channels, m.ch, 3, padding=1)
        mult = (1, *m.ch_mult)
        res, cin = config.data.image_size, m.ch
        self.down = nn.ModuleList()
        for i in range(self.levels):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = m.ch * mult[i], m.ch * m.ch_mult[i]
            for _ in range(self.blocks):
                level.block.append(ResnetBlock(cin, cout, temb, m.dropout))
                cin = cout
                if res in m.attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != self.levels - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, temb, m.dropout)
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin, temb, m.dropout)
        ups: list[nn.Module] = []
        for i in reversed(range(self.levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cout = m.ch * m.ch_mult[i]
            for j in range(self.blocks + 1):
                skip = m.ch * (mult[i] if j == self.blocks else m.ch_mult[i])
                level.block.append(ResnetBlock(cin + skip, cout, temb, m.dropout))
                cin = cout
                if res in m.attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, m.out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb.dense[1](_swish(self.temb.dense[0](timestep_embedding(t, self.ch))))
        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j in range(self.blocks):
                h = level.block[j](hs[-1], temb)
                hs.append(level.attn[j](h) if len(level.attn) else h)
            if i != self.levels - 1:
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for i in reversed(range(self.levels)):
            level = self.up[i]
            for j in range(self.blocks + 1):
                h = level.block[j](torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


def official_config(ch: int = 32, ch_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                    attn_resolutions: tuple[int, ...] = (8,), image_size: int = 16) -> dict:
    """A config in the layout of the official configs/*.yml (bedroom.yml, church.yml)."""
    return {
        "data": {"dataset": "LSUN", "category": "bedroom", "image_size": image_size,
                 "channels": 3, "rescaled": True},
        "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": ch,
                  "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks,
                  "attn_resolutions": list(attn_resolutions), "dropout": 0.0,
                  "var_type": "fixedsmall", "ema_rate": 0.999, "ema": True,
                  "resamp_with_conv": True},
        "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                      "num_diffusion_timesteps": 1000},
        "sampling": {"batch_size": 8, "last_only": True},
    }


def official_model(config: dict, seed: int = 0) -> OfficialDDPM:
    """The official network for a config dict, random weights (non-trivial norms too)."""
    torch.manual_seed(seed)
    net = OfficialDDPM(SimpleNamespace(model=SimpleNamespace(**config["model"]),
                                       data=SimpleNamespace(**config["data"])))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.ndim == 1:      # group norm scales
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return net.eval()
