"""Positional code for variable shapes: integer-index 3D sin-cos (stale's) against resolution-scaled sin-cos
(Open-Sora 1.2 / PixArt: spatial indices x base / sqrt(H'W')), measured (docs/buckets.md has the table).

A tiny model is trained on procedural clips (a bright disc moving over a class-coloured gradient) in buckets of
three aspects (16x16, 12x20, 20x12 pixels; images and 8-frame clips), then the flow loss is measured on fixed noise
and times for trained shapes and for shapes never trained on (larger, wider, longer). Same seeds, same batches for
both variants. `python scripts/pos_embed_ablation.py [steps] [seeds]`; CPU minutes.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from stale.diffusion.objective import StaleObjective
from stale.models.stale_transformer import StaleConfig, StaleTransformer

TRAIN = [(1, 16, 16, 16), (1, 12, 20, 16), (1, 20, 12, 16), (8, 16, 16, 4), (8, 12, 20, 4), (8, 20, 12, 4)]
EVAL = {"trained 8x16x16": (8, 16, 16), "trained 8x12x20": (8, 12, 20), "unseen 8x24x24 (larger)": (8, 24, 24),
        "unseen 8x16x32 (wider)": (8, 16, 32), "unseen 8x32x32 (2x side)": (8, 32, 32),
        "unseen 16x16x16 (longer)": (16, 16, 16)}


def render(b: int, t: int, h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips in [-1, 1] (B, 3, T, H, W), labels (B,)): class 0 red-ish, class 1 blue-ish gradient; a disc moves."""
    y = torch.randint(0, 2, (b,), generator=g)
    yy = torch.linspace(0, 1, h)[:, None].expand(h, w)
    xx = torch.linspace(0, 1, w)[None, :].expand(h, w)
    phase = torch.rand(b, generator=g) * 6.28
    out = torch.empty(b, 3, t, h, w)
    for i in range(b):
        base = torch.stack([xx, yy * 0.5, 1 - xx]) if y[i] == 0 else torch.stack([1 - xx, yy * 0.5, xx])
        for k in range(t):
            cy, cx = 0.5 + 0.3 * math.sin(k / 3 + phase[i]), 0.5 + 0.3 * math.cos(k / 4 + phase[i])
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.04
            out[i, :, k] = torch.where(disc, torch.ones(3, 1, 1), base)
    return out * 2 - 1, y


def flow_loss(model, shape, seed=123, n=8) -> float:
    g = torch.Generator().manual_seed(seed)
    x, y = render(n, *shape, g)
    losses = []
    with torch.no_grad():
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            z = torch.rand(x.shape, generator=g) * 2 - 1
            tt = torch.full((n,), t)
            v, _ = model((1 - t) * z + t * x, tt, y)
            losses.append(float((v - (x - z)).pow(2).mean()))
    return sum(losses) / len(losses)


def train(pos_base, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = StaleTransformer(StaleConfig(dim=64, depth=4, heads=4, frames=8, size=16, num_classes=2,
                                         pos_base=pos_base))
    objective = StaleObjective(hinge_weight=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        frames, h, w, b = TRAIN[int(torch.randint(len(TRAIN), (1,), generator=g))]
        x, y = render(b, frames, h, w, g)
        loss = objective(model, x, y, 2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"pos_base": pos_base, "seed": seed, "train_s": round(time.time() - t0, 1),
            **{name: round(flow_loss(model, shape), 4) for name, shape in EVAL.items()}}


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 600
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(1)
    rows = [train(base, steps, s) for s in range(seeds) for base in (None, 4)]
    print(json.dumps(rows, indent=1))
    print("| variant | " + " | ".join(EVAL) + " |")
    for base in (None, 4):
        mine = [r for r in rows if r["pos_base"] == base]
        cells = [f"{sum(r[k] for r in mine) / len(mine):.4f}" for k in EVAL]
        print(f"| {'integer sin-cos' if base is None else f'scaled sin-cos (base {base})'} | " + " | ".join(cells) + " |")
