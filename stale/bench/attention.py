"""Alternating (spatial / temporal) versus full space-time attention as the clip length T grows.

Each row is one training step configuration (model, T, attention pattern), measured in a fresh process so
that peak memory is that configuration's alone: median time of stale.bench.step's training step (the system's
loss, hinge branch included, backward, clipping, AdamW) over a few steps after warm-up, and peak memory during
those steps above the memory held before the first step (stale.bench.memory.PeakMemory: CUDA's
max_memory_allocated, or the process's peak resident set size). With it,
the analytic training FLOPs per clip (stale.models.flops) and the FLOP rate they imply.

    python -m stale.bench.attention --threads 1   # a small model on the CPU; prints a Markdown table

Callers that use run(isolate=True) from a script need the usual `if __name__ == "__main__":` guard, since
the measurement processes are spawned and re-import the calling script.
    python -m stale.bench.attention --size s --image 32 --patch 1 2 2 --batch 8 --device cuda

Step time is the point on a CPU: scaled_dot_product_attention's CPU and CUDA kernels (flash / memory
efficient) never hold the L x L attention matrix, so memory grows linearly in T for both patterns, while
full attention's compute grows quadratically. Timings on a shared machine are noisy: compare ratios
taken within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics

import torch

from stale.bench import random_batches, timed, torch_threads
from stale.bench.memory import PeakMemory
from stale.bench.step import TrainStep, make_system
from stale.models import build_model
from stale.models.flops import count_parameters, training_flops_per_clip

PATTERNS = ("alternating", "full")


def measure(
    frames: int,
    pattern: str,
    model_size: str = "tiny",
    image: int = 16,
    patch=(1, 4, 4),
    model_overrides: dict | None = None,
    batch: int = 2,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """One training-step measurement in this process (threads: torch's, given back after). Returns one result row."""
    with torch_threads(threads):  # leave the process as it was (matters when not isolated)
        torch.manual_seed(seed)
        model = build_model(
            model_size, frames=frames, size=image, patch=tuple(patch), pattern=pattern, **(model_overrides or {})
        )
        cfg = model.config
        step = TrainStep(make_system(model), device)
        clips = random_batches(1, batch, frames, image, cfg.num_classes, seed=seed, channels=cfg.in_channels)[0]
        meter = PeakMemory(device)
        base = meter.reset()
        for _ in range(warmup):
            step(clips)
        times = [timed(lambda: step(clips), device) for _ in range(steps)]
        n_threads = torch.get_num_threads()
    peak = meter.peak()
    step_s = statistics.median(times)
    flops = training_flops_per_clip(cfg)
    pt, ph, pw = cfg.patch
    return {
        "frames": frames,
        "pattern": pattern,
        "model": model_size,
        "dim": cfg.dim,
        "depth": cfg.depth,
        "image": image,
        "patch": list(cfg.patch),
        "batch": batch,
        "tokens": (frames // pt) * ((image // ph) * (image // pw) + 1),  # per clip, joy tokens included
        "params": count_parameters(model),
        "device": str(device),
        "threads": n_threads,
        "step_s": step_s,
        "peak_mem_mb": max(0, peak - base) / 2**20,
        "train_gflop_per_clip": flops / 1e9,
        "gflop_per_s": flops * batch / step_s / 1e9,
    }


def run(
    frames=(8, 16, 32, 64),
    patterns=PATTERNS,
    model_size: str = "tiny",
    image: int = 16,
    patch=(1, 4, 4),
    model_overrides: dict | None = None,
    batch: int = 2,
    steps: int = 3,
    warmup: int = 1,
    device: str | None = None,
    threads: int | None = None,
    isolate: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Measure every (T, pattern); rows in that order, full rows with their ratio to alternating at that T.

    The default model is small enough for a CPU: tiny with width 64 and 4 blocks, 16x16 clips, 4x4 patches
    (17 tokens per frame). `isolate` runs each row in a fresh spawned process (needed for CPU peak memory).
    `threads` sets torch's intra-op threads; on a shared CPU use 1: with more threads than idle cores,
    OpenMP barriers wait on descheduled threads (we saw 2 threads run 30x slower than 1 on 2 busy cores).
    A configuration that fails (e.g. out of memory) gives a row with an `error` instead of numbers.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_overrides is None and model_size == "tiny":
        model_overrides = {"dim": 64, "depth": 4, "heads": 4}
    rows = []
    for T in frames:
        for pattern in patterns:
            kwargs = dict(
                frames=T,
                pattern=pattern,
                model_size=model_size,
                image=image,
                patch=tuple(patch),
                model_overrides=model_overrides,
                batch=batch,
                steps=steps,
                warmup=warmup,
                device=device,
                threads=threads,
                seed=seed,
            )
            try:
                if isolate:
                    with mp.get_context("spawn").Pool(1) as pool:
                        row = pool.apply(measure, kwds=kwargs)
                else:
                    row = measure(**kwargs)
            except Exception as e:  # noqa: BLE001 - a failed configuration is a result, not a crash
                row = {"frames": T, "pattern": pattern, "error": " ".join(f"{type(e).__name__}: {e}".split())[:200]}
            rows.append(row)
    by_key = {(r["frames"], r["pattern"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["frames"], "alternating"))
        if "error" not in r and ref and "error" not in ref:
            r["time_vs_alternating"] = r["step_s"] / ref["step_s"]
            r["mem_vs_alternating"] = r["peak_mem_mb"] / ref["peak_mem_mb"] if ref["peak_mem_mb"] else float("nan")
    first = {p: next((r for r in rows if r["pattern"] == p and "error" not in r), None) for p in patterns}
    for r in rows:  # growth relative to the shortest clip of the same pattern
        f = first.get(r["pattern"])
        if "error" not in r and f:
            r["time_vs_shortest"] = r["step_s"] / f["step_s"]
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| T | pattern | tokens/clip | step (s) | x shortest T | x alternating | peak mem (MiB) "
        "| mem x alternating | train GFLOP/clip | GFLOP/s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['frames']} | {r['pattern']} | | error: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['frames']} | {r['pattern']} | {r['tokens']} | {r['step_s']:.3f} | {r['time_vs_shortest']:.2f} "
            f"| {r.get('time_vs_alternating', 1.0):.2f} | {r['peak_mem_mb']:.0f} "
            f"| {r.get('mem_vs_alternating', 1.0):.2f} | {r['train_gflop_per_clip']:.2f} | {r['gflop_per_s']:.1f} |"
        )
    return head + "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--size", default="tiny", help="model size: tiny, s, b, l, xl")
    p.add_argument("--image", type=int, default=16, help="clip height = width")
    p.add_argument("--patch", type=int, nargs=3, default=[1, 4, 4])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared CPU)")
    a = p.parse_args(argv)
    rows = run(
        frames=tuple(a.frames),
        model_size=a.size,
        image=a.image,
        patch=tuple(a.patch),
        batch=a.batch,
        steps=a.steps,
        device=a.device,
        threads=a.threads,
    )
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
