#!/usr/bin/env python
"""Where stale's step time goes against diffusers' Latte (BENCHMARKS.md, "against the peer"): one interleaved run
of stale, stale without QK-norm, without the joy token, without both, and Latte, on the batch and step of
`stale-bench sections=peer` (stale.bench.peer: the measured step, velocity loss, steps alternating one by one).

    .venv/bin/python experiments/peer_decomposition.py --case tiny --rounds 30    # one JSON line on stdout
    .venv/bin/python experiments/peer_decomposition.py --case s --rounds 30

Without the joy token (the model has no switch for it, and gets none): `without_joy` wraps the model's first and
last blocks, so that each frame's joy token (the last of its N = H'W' + 1 tokens) is set aside before the first
block and put back after the last. Every block then attends over the H'W' patches alone, and the head and the final
layer find the tokens where they expect them (the head reads the joy token as it entered the blocks: a linear map
of B x T' x D, next to nothing). Sin-cos positions only: RoPE's tables give the joy token a place of its own.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from stale.bench import build, random_batches
from stale.bench.peer import alternate, matched_latte, ratio_rows

CASES = {  # name -> (model, frames, size, batch size, StaleConfig overrides), as conf/bench.yaml's peer cases
    "tiny": ("tiny", 8, 16, 8, {}),
    "s": ("s", 16, 32, 1, {"depth": 4}),
}


class JoyAside(nn.Module):
    """One block of a model without the joy token: `first` sets each frame's joy token aside before the block,
    `last` puts it back after it; the blocks in between see only the patches."""

    def __init__(self, block: nn.Module, aside: dict, first: bool, last: bool):
        super().__init__()
        self.block, self.aside, self.first, self.last = block, aside, first, last

    def forward(self, tokens: torch.Tensor, *args) -> torch.Tensor:  # tokens: (B, T', N, D), joy last
        if self.first:
            tokens, self.aside["joy"] = tokens[:, :, :-1], tokens[:, :, -1:]
        tokens = self.block(tokens, *args)
        return torch.cat([tokens, self.aside.pop("joy")], dim=2) if self.last else tokens


def without_joy(model: nn.Module) -> nn.Module:
    """`model` with its blocks running on the H'W' patches of each frame only (in place; returns it)."""
    if model.config.pos == "rope":
        raise ValueError("without_joy needs model.pos=sincos: RoPE's spatial tables hold the joy token's place")
    aside, n = {}, len(model.blocks)
    model.blocks = nn.ModuleList(JoyAside(b, aside, i == 0, i == n - 1) for i, b in enumerate(model.blocks))
    return model


def decomposition(case: str, rounds: int, warmup: int = 3, seed: int = 0) -> dict:
    name, frames, size, batch_size, overrides = CASES[case]
    models = {}
    for label, qk_norm, joy in (
        ("stale", True, True),
        ("no_qk", False, True),
        ("no_joy", True, False),
        ("no_joy_no_qk", False, False),
    ):
        torch.manual_seed(seed)
        model = build(name, frames, size, prediction="velocity", qk_norm=qk_norm, **overrides)
        models[label] = model if joy else without_joy(model)
    models["latte"] = matched_latte(models["stale"], batch_size, seed)
    cfg = models["stale"].config
    batch = random_batches(1, batch_size, frames, size, cfg.num_classes, seed=seed, channels=cfg.in_channels)[0]
    times = alternate(models, batch, rounds, warmup, seed)
    return {
        "case": f"{case} {frames}x{size}x{size} b{batch_size}",
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "rows": ratio_rows(case, models, times),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), default="tiny")
    ap.add_argument("--rounds", type=int, default=30, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(json.dumps(decomposition(a.case, a.rounds, a.warmup, a.seed)))


if __name__ == "__main__":
    main()
