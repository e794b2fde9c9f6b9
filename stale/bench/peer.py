"""Against the peer (issue 21): the Stale Transformer's training step vs diffusers' LatteTransformer3DModel.

Latte (Ma et al. 2024) is the anchor of stale's alternating architecture. Both models are built at matched width,
depth (Latte's `num_layers` = depth / 2: each layer is a spatial + a temporal block), heads, patch and clip from
random init, and run stale.bench.step's training step on the same batch inside a StaleSystem (LatteAsStale), with
hinge_weight=0 and label_dropout=0: the step both architectures share. The matched Latte has no cross-attention
and a dummy one-token caption (`cross_attention=true` adds the released model's cross-attention). The steps
alternate one by one; the result is the median of the per-round ratios stale / latte with its spread
(BENCHMARKS.md has the matching in full).
"""

from __future__ import annotations

import torch
from torch import nn

from stale.bench import build, median, random_batches, spread, take_turns, torch_threads
from stale.bench.step import TrainStep, make_system
from stale.diffusion.objective import StaleObjective


def latte_model(
    dim: int, depth: int, heads: int, patch: int, channels: int, frames: int, size: int, cross_attention: bool = False
):
    """diffusers' LatteTransformer3DModel at stale's width/depth/heads/patch, random init from a config."""
    from diffusers import LatteTransformer3DModel

    if depth % 2:
        raise ValueError(f"depth={depth} is odd: Latte's layers are (spatial, temporal) pairs")
    return LatteTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=channels,
        out_channels=channels,
        num_layers=depth // 2,
        cross_attention_dim=dim if cross_attention else None,
        attention_bias=True,
        sample_size=size,
        patch_size=patch,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=dim,
        video_length=frames,
    )


class LatteAsStale(nn.Module):
    """Latte behind the Stale Transformer's interface, so that StaleSystem and the measured step train it:
    forward(x, t, y) -> (velocity, None) with `config` the matched stale model's and a fixed dummy caption."""

    def __init__(self, latte: nn.Module, config, caption: torch.Tensor):
        super().__init__()
        self.latte, self.config = latte, config
        self.register_buffer("caption", caption)  # (B, 1, D): one token, the same every step

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        # Latte's timestep is DiT's 0..1000 scale, as stale's TimestepEmbedder uses; the label is not Latte's input
        return self.latte(x, timestep=t * 1000, encoder_hidden_states=self.caption, return_dict=False)[0], None


def matched_latte(stale: nn.Module, batch_size: int, seed: int, cross_attention: bool = False) -> LatteAsStale:
    """The Latte of `stale`'s width, depth, heads, patch and clip, with a (batch_size, 1, D) dummy caption."""
    cfg = stale.config
    if cfg.patch[0] != 1 or cfg.patch[1] != cfg.patch[2] or set(cfg.pattern) != {"spatial", "temporal"}:
        raise ValueError(
            f"Latte needs patch (1, p, p) and the alternating pattern; this model has "
            f"patch {list(cfg.patch)}, pattern {list(cfg.pattern)}"
        )
    latte = latte_model(
        cfg.dim, cfg.depth, cfg.heads, cfg.patch[1], cfg.in_channels, cfg.frames, cfg.size, cross_attention
    )
    caption = torch.randn(batch_size, 1, cfg.dim, generator=torch.Generator().manual_seed(seed))
    return LatteAsStale(latte, cfg, caption)


def shared_step(model: nn.Module, seed: int) -> TrainStep:
    """The measured step on the loss both architectures share: the velocity MSE (no hinge branch, no label dropout)."""
    objective = StaleObjective(hinge_weight=0.0, label_dropout=0.0)
    return TrainStep(make_system(model, objective=objective, seed=seed))


def alternate(models: dict, batch, rounds: int, warmup: int, seed: int) -> dict[str, list[float]]:
    """Seconds of each model's step per round: the steps alternate one by one, the order rotating every round (a
    load change mid-round hits every position equally); the same seed gives every model the same noise."""
    steps = {name: shared_step(m, seed) for name, m in models.items()}
    for _ in range(warmup):
        for step in steps.values():
            step(batch)
    return take_turns({name: lambda step=step: step(batch) for name, step in steps.items()}, rounds)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ratio_rows(case: str, models: dict, times: dict[str, list[float]]) -> list[dict]:
    """One row per model: step time and spread; for the stale models the median per-round ratio to Latte."""
    rows = [
        {
            "case": case,
            "model": name,
            "params": n_params(models[name]),
            "step_ms": round(1e3 * median(ts), 2),
            "step_spread": round(spread(ts), 3),
        }
        for name, ts in times.items()
    ]
    for row in rows:
        if row["model"] != "latte":
            ratios = [s / lt for s, lt in zip(times[row["model"]], times["latte"])]
            row["stale_over_latte"] = round(median(ratios), 3)
            row["ratio_spread"] = round(spread(ratios), 3)
            row["params_vs_latte"] = round(row["params"] / n_params(models["latte"]), 3)
    return rows


def compare(
    model: str,
    frames: int,
    size: int,
    batch_size: int,
    rounds: int,
    warmup: int,
    seed: int,
    cross_attention: bool = False,
    variants: dict | None = None,
    **overrides,
) -> dict:
    """One case: stale, the matched Latte and stale `variants` (name -> StaleConfig overrides), built, warmed up,
    then timed step by step in alternation."""
    torch.manual_seed(seed)
    stale = build(model, frames, size, prediction="velocity", **overrides)
    models = {"stale": stale, "latte": matched_latte(stale, batch_size, seed, cross_attention)}
    for name, extra in (variants or {}).items():  # ablations, e.g. {"no qk_norm": {"qk_norm": False}}
        torch.manual_seed(seed)
        models[f"stale {name}"] = build(model, frames, size, prediction="velocity", **{**overrides, **extra})
    cfg = stale.config
    batch = random_batches(1, batch_size, frames, size, cfg.num_classes, seed=seed, channels=cfg.in_channels)[0]
    times = alternate(models, batch, rounds, warmup, seed)
    label = (
        f"{model}{'' if 'depth' not in overrides else '-d' + str(cfg.depth)} {frames}x{size}x{size} b{batch_size}"
        + (" +xattn" if cross_attention else "")
    )
    rows = ratio_rows(label, models, times)
    return {"rows": rows, "ratio": rows[0]["stale_over_latte"]}


def run(
    cases=(
        {"model": "tiny", "frames": 8, "size": 16, "batch_size": 8},
        {"model": "s", "depth": 4, "frames": 16, "size": 32, "batch_size": 1},
    ),
    rounds: int = 30,
    warmup: int = 3,
    cross_attention: bool = False,
    variants: dict | None = None,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """cases: (model, frames, size, batch_size [, any StaleConfig override]) each; rounds: timed steps per model;
    variants: extra stale models timed in the same rounds, name -> StaleConfig overrides (ablations)."""
    if not str(device).startswith("cpu"):
        return {"rows": [{"case": "not measured (a CPU section; this run's device is CUDA)"}]}
    with torch_threads(threads) as previous:
        results = [
            compare(
                **dict(case),
                rounds=rounds,
                warmup=warmup,
                seed=seed,
                cross_attention=cross_attention,
                variants=variants,
            )
            for case in cases
        ]
    return {
        "rows": [row for res in results for row in res["rows"]],
        "summary": {res["rows"][0]["case"]: res["rows"][0]["stale_over_latte"] for res in results},
        "notes": [
            "stale_over_latte: median over rounds of (stale step time / Latte step time) in the same round; "
            "< 1 means stale is faster. Steps alternate one by one, the order rotates every round.",
            f"{rounds} rounds after {warmup} warm-up steps each; step = stale.bench.step (velocity MSE, "
            "backward, clipping, fused AdamW); torch threads: "
            f"{threads or previous}",
            "Latte: diffusers LatteTransformer3DModel, num_layers = depth/2, ada_norm_single, "
            "gelu-approximate, "
            + ("cross-attention to" if cross_attention else "no cross-attention; ")
            + " a dummy 1-token caption of width D",
        ],
    }
