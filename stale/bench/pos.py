"""Positional code benchmark (`stale-bench sections=pos`): sin-cos and 3D RoPE, each plain and resolution-scaled, measured.

Tiny models that differ only in `model.pos` / `model.pos_base` are trained in lockstep: the same seed, the same
initial weights where they share them, and at every step the same batch, drawn from a mix of shapes (a
data.buckets list or preset, by default `smoke`: 16x16, 12x20 and 20x12 frames, images and 4- and 8-frame clips)
of procedural clips (a bright disc moving over a class-coloured gradient; the content scales with the frame).
Then each model's flow loss is measured on fixed noise and fixed times (t = 0.1, 0.3, ..., 0.9) at shapes it
trained on and at shapes it never saw (larger, wider, twice the side, twice the frames): what extrapolation costs
each code. Steps are timed in alternation (the variants take turns within every step, the order rotating), so
the steps/s ratios share the machine's load. Every step is stale.bench.step's (flow loss only, clipping, AdamW).
Two or more seeds give the spread the differences must beat.
"""

from __future__ import annotations

import math
import time

import torch

from stale.bench import median, torch_threads
from stale.bench.step import TrainStep, make_system
from stale.diffusion import flow
from stale.diffusion.objective import StaleObjective

VARIANTS = {  # name -> StaleConfig overrides; the first is the reference of the ratios
    "sincos": {},
    "sincos_scaled": {"pos_base": 4},  # the 16 px training grid's side with patch 4
    "rope": {"pos": "rope"},
    "rope_scaled": {"pos": "rope", "pos_base": 4},  # RoPE with position interpolation over the frame
}
EVAL = {  # name -> (T, H, W)
    "trained 8x16x16": (8, 16, 16),
    "trained 8x12x20": (8, 12, 20),
    "unseen 8x24x24": (8, 24, 24),
    "unseen 8x16x32": (8, 16, 32),
    "unseen 8x32x32": (8, 32, 32),
    "unseen 16x16x16": (16, 16, 16),
}


def render(b: int, t: int, h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 clips (B, 3, T, H, W), labels (B,)): class 0 red-ish, class 1 blue-ish gradient; a disc moves."""
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
    return flow.to_uint8(out * 2 - 1), y


def flow_loss(model, shape: tuple, clips: int = 8, seed: int = 123) -> float:
    """Velocity MSE on `clips` fixed clips of `shape`, fixed uniform-prior noise, t = 0.1, 0.3, ..., 0.9 (mean)."""
    g = torch.Generator().manual_seed(seed)
    video, y = render(clips, *shape, g)
    x = flow.to_unit_range(video)
    losses = []
    with torch.no_grad():
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            z = torch.rand(x.shape, generator=g) * 2 - 1
            v, _ = model((1 - t) * z + t * x, torch.full((clips,), t), y)
            losses.append(float((v - (x - z)).pow(2).mean()))
    return sum(losses) / len(losses)


def train(variants: dict, buckets, steps: int, seed: int, model_kw: dict, lr: float) -> dict:
    """Train one model per variant in lockstep on the same batches; returns {name: (model, seconds per step list)}."""
    from stale.data.buckets import parse_buckets
    from stale.models.stale_transformer import StaleConfig, StaleTransformer

    objective = StaleObjective(hinge_weight=0.0)  # the flow loss alone: what the positional code changes
    trainers = {}
    for name, over in variants.items():
        torch.manual_seed(seed)  # same draw order: the variants start from the same weights (none are pos-specific)
        model = StaleTransformer(StaleConfig(**{**model_kw, **over}))
        # one system seed: at every step each variant draws the same noise and times (stale.bench.step)
        trainers[name] = TrainStep(make_system(model, lr=lr, objective=objective, seed=seed))
    shapes = parse_buckets(buckets, model.config.patch, key="pos.buckets")
    g = torch.Generator().manual_seed(seed)
    times = {name: [] for name in variants}
    names = list(variants)
    for step in range(steps):
        bucket = shapes[int(torch.randint(len(shapes), (1,), generator=g))]
        batch = render(bucket.batch_size, bucket.frames, bucket.height, bucket.width, g)
        for name in names[step % len(names) :] + names[: step % len(names)]:  # rotate who goes first
            t0 = time.perf_counter()
            trainers[name](batch)
            times[name].append(time.perf_counter() - t0)
    return {name: (trainers[name].system.model.eval(), times[name]) for name in variants}


def run(
    steps: int = 1500,
    seeds: int = 2,
    buckets="smoke",
    variants: dict | None = None,
    evals: dict | None = None,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    lr: float = 2e-3,
    eval_clips: int = 8,
    threads: int | None = 1,
    seed: int = 0,
    **_,
) -> dict:
    variants = variants or VARIANTS
    evals = {k: tuple(v) for k, v in (evals or EVAL).items()}
    model_kw = dict(dim=dim, depth=depth, heads=heads, frames=8, size=16, num_classes=2, patch=(1, 4, 4))
    per_seed = []
    with torch_threads(threads):
        for s in range(seed, seed + seeds):
            trained = train(variants, buckets, steps, s, model_kw, lr)
            for name, (model, times) in trained.items():
                per_seed.append(
                    {
                        "variant": name,
                        "seed": s,
                        "step_ms": round(1e3 * median(times[2:] or times), 2),
                        **{k: round(flow_loss(model, shape, eval_clips), 4) for k, shape in evals.items()},
                    }
                )
    ref = next(iter(variants))
    rows = []
    for name in variants:
        mine = [r for r in per_seed if r["variant"] == name]
        row = {"variant": name, **{k: round(sum(r[k] for r in mine) / len(mine), 4) for k in evals}}
        row["step_ms"] = round(median([r["step_ms"] for r in mine]), 2)
        ref_rows = [r for r in per_seed if r["variant"] == ref]
        # steps/s over the reference's, per seed (the two were timed step by step in the same run), then the median
        row["steps_per_s_vs_" + ref] = round(median([b["step_ms"] / a["step_ms"] for a, b in zip(mine, ref_rows)]), 3)
        rows.append(row)
    trained_keys = [k for k in evals if k.startswith("trained")]
    unseen_keys = [k for k in evals if not k.startswith("trained")]

    def mean(row, keys):
        return sum(row[k] for k in keys) / max(1, len(keys))

    summary = {
        "best_trained": min(rows, key=lambda r: mean(r, trained_keys))["variant"],
        "best_unseen": min(rows, key=lambda r: mean(r, unseen_keys))["variant"],
        "mean_trained": {r["variant"]: round(mean(r, trained_keys), 4) for r in rows},
        "mean_unseen": {r["variant"]: round(mean(r, unseen_keys), 4) for r in rows},
        # how much the seeds disagree: the largest spread of one variant's loss over seeds at one shape
        "seed_spread": round(
            max(
                (max(r[k] for r in per_seed if r["variant"] == v) - min(r[k] for r in per_seed if r["variant"] == v))
                for v in variants
                for k in evals
            ),
            4,
        ),
    }
    notes = [
        f"{steps} steps x {seeds} seed(s) per variant, dim {dim}, depth {depth}, heads {heads}, AdamW lr {lr}, "
        f"buckets {buckets}; losses are means over seeds of the flow MSE on fixed noise (lower is better)",
        "steps_per_s ratio > 1: faster than the reference; variants alternate step by step in one process",
    ]
    return {"rows": rows, "summary": summary, "notes": notes, "per_seed": per_seed}
