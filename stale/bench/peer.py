"""Against the peer (issue 21): the Stale Transformer's training step vs diffusers' LatteTransformer3DModel.

Latte (Ma et al. 2024) is the anchor of stale's alternating architecture; diffusers ships it. Both models are
built at matched width, depth, heads, patch and clip from random init, and each runs the same plain training
step on the same batch: forward, MSE loss against the flow-matching velocity, backward, AdamW (fused, as
StaleSystem's). Neither the hinge branch of stale's objective nor classifier-free label dropout is run: the
step is the one both architectures share.

Matching: Latte's `num_layers` counts (spatial, temporal) pairs, stale's `depth` counts single blocks, so
num_layers = depth / 2. Latte's blocks are as in its released config (ada_norm_single, gelu-approximate MLP of
4x width, attention bias, no affine on the norms, eps 1e-6), patch (1, p, p) as stale's packaged configs.
Latte is text-conditioned; stale is class-conditioned and has no cross-attention, so the matched Latte has
cross_attention_dim=None (no cross-attention in its blocks) and gets a dummy caption of one token of width D
(caption_channels = D), which its caption projection maps and no block reads. `cross_attention=true` adds
Latte's cross-attention to that caption (the released model's setting) for a second comparison.

Timing: this machine is shared, so only in-process ratios mean anything. The two steps alternate one by one
(which one goes first alternates too), every round measures each once, and the result is the median of the
per-round ratios stale / latte with its spread (half the inter-quartile range over the median).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from stale.bench import build, median, random_batches, spread


def latte_model(dim: int, depth: int, heads: int, patch: int, channels: int, frames: int, size: int,
                cross_attention: bool = False):
    """diffusers' LatteTransformer3DModel at stale's width/depth/heads/patch, random init from a config."""
    from diffusers import LatteTransformer3DModel

    if depth % 2:
        raise ValueError(f"depth={depth} is odd: Latte's layers are (spatial, temporal) pairs")
    return LatteTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=channels, out_channels=channels,
        num_layers=depth // 2, cross_attention_dim=dim if cross_attention else None, attention_bias=True,
        sample_size=size, patch_size=patch, activation_fn="gelu-approximate", norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=dim, video_length=frames)


class _Step:
    """forward + MSE to the velocity target + backward + AdamW for one model; `forward(xt, t, y)` -> v."""

    def __init__(self, model, forward):
        self.model, self.forward = model, forward
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as StaleSystem's

    def __call__(self, batch) -> float:
        xt, t, y, target = batch
        t0 = time.perf_counter()
        loss = F.mse_loss(self.forward(xt, t, y), target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def flow_batch(video: torch.Tensor, label: torch.Tensor, seed: int):
    """(x_t, t, y, velocity target) of a uint8 batch, drawn once: both models see exactly the same numbers."""
    g = torch.Generator().manual_seed(seed)
    x1 = video.float() / 127.5 - 1
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(x1.shape[0], generator=g)
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * x1
    return xt, t, label, x1 - x0


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def compare(model: str, frames: int, size: int, batch_size: int, rounds: int, warmup: int, seed: int,
            cross_attention: bool = False, variants: dict | None = None, **overrides) -> dict:
    """One case: both models (and stale `variants`: name -> StaleConfig overrides) built, warmed up, then timed
    step by step in alternation."""
    torch.manual_seed(seed)
    stale = build(model, frames, size, prediction="velocity", **overrides)
    cfg = stale.config
    if cfg.patch[0] != 1 or cfg.patch[1] != cfg.patch[2] or set(cfg.pattern) != {"spatial", "temporal"}:
        raise ValueError(f"Latte needs patch (1, p, p) and the alternating pattern; model {model} has "
                         f"patch {list(cfg.patch)}, pattern {list(cfg.pattern)}")
    latte = latte_model(cfg.dim, cfg.depth, cfg.heads, cfg.patch[1], cfg.in_channels, frames, size, cross_attention)
    caption = torch.randn(batch_size, 1, cfg.dim, generator=torch.Generator().manual_seed(seed))  # (B, 1, D), dummy

    def latte_forward(xt, t, y):  # Latte's timestep is DiT's 0..1000 scale, as stale's TimestepEmbedder uses
        return latte(xt, timestep=t * 1000, encoder_hidden_states=caption, return_dict=False)[0]

    steps = {"stale": _Step(stale, lambda xt, t, y: stale(xt, t, y)[0]), "latte": _Step(latte, latte_forward)}
    for name, extra in (variants or {}).items():  # ablations, e.g. {"no qk_norm": {"qk_norm": False}}
        torch.manual_seed(seed)
        m = build(model, frames, size, prediction="velocity", **{**overrides, **extra})
        steps[f"stale {name}"] = _Step(m, (lambda m: lambda xt, t, y: m(xt, t, y)[0])(m))
    batch = flow_batch(*random_batches(1, batch_size, frames, size, cfg.num_classes, seed=seed, channels=cfg.in_channels)[0], seed)
    for _ in range(warmup):
        for step in steps.values():
            step(batch)
    times = {name: [] for name in steps}
    for r in range(rounds):  # alternate the order: a load change mid-round hits every position equally
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            times[name].append(steps[name](batch))
    ratios = {name: [s / l for s, l in zip(ts, times["latte"])] for name, ts in times.items()}
    label = (f"{model}{'' if 'depth' not in overrides else '-d' + str(cfg.depth)} {frames}x{size}x{size} b{batch_size}"
             + (" +xattn" if cross_attention else ""))
    rows = [{"case": label, "model": name, "params": n_params(steps[name].model),
             "step_ms": round(1e3 * median(ts), 2), "step_spread": round(spread(ts), 3)} for name, ts in times.items()]
    for row in rows:
        if row["model"] != "latte":
            row["stale_over_latte"] = round(median(ratios[row["model"]]), 3)
            row["ratio_spread"] = round(spread(ratios[row["model"]]), 3)
            row["params_vs_latte"] = round(row["params"] / rows[1]["params"], 3)
    return {"rows": rows, "ratio": median(ratios["stale"]), "ratios": ratios["stale"]}


def run(cases=({"model": "tiny", "frames": 8, "size": 16, "batch_size": 8},
               {"model": "s", "depth": 4, "frames": 16, "size": 32, "batch_size": 1}),
        rounds: int = 30, warmup: int = 3, cross_attention: bool = False, variants: dict | None = None,
        threads: int | None = None, device: str = "cpu", seed: int = 0) -> dict:
    """cases: (model, frames, size, batch_size [, any StaleConfig override]) each; rounds: timed steps per model;
    variants: extra stale models timed in the same rounds, name -> StaleConfig overrides (ablations)."""
    if not str(device).startswith("cpu"):
        return {"rows": [{"case": "not measured (a CPU section; this run's device is CUDA)"}]}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        results = [compare(**dict(case), rounds=rounds, warmup=warmup, seed=seed, cross_attention=cross_attention,
                           variants=variants) for case in cases]
    finally:
        torch.set_num_threads(previous)
    return {"rows": [row for res in results for row in res["rows"]],
            "summary": {res["rows"][0]["case"]: res["rows"][0]["stale_over_latte"] for res in results},
            "notes": ["stale_over_latte: median over rounds of (stale step time / Latte step time) in the same round; "
                      "< 1 means stale is faster. Steps alternate one by one, the order flips every round.",
                      f"{rounds} rounds after {warmup} warm-up steps each; step = forward + MSE to the flow velocity "
                      "+ backward + fused AdamW; torch threads: "
                      f"{threads or previous}",
                      "Latte: diffusers LatteTransformer3DModel, num_layers = depth/2, ada_norm_single, "
                      "gelu-approximate, " + ("cross-attention to" if cross_attention else "no cross-attention; ")
                      + " a dummy 1-token caption of width D"]}
