"""What pays on a CPU for the default run's step (issue 16): torch threads and torch.compile, compile time included.

The default `stale-train` run is the tiny model on 8 x 16 x 16 clips in batches of 8, trained against a
deadline on a 2-core machine, so a faster step is more steps, and more steps are better samples. Each
variant runs the same training step (stale.bench.step: the system's loss, backward, clipping, AdamW) on
the same in-memory batches; variants take turns round by round so that a change in the machine's load
reaches all of them. Compile time is the extra wall time of the compiled variant's first steps, and
`break_even_steps` is how many steps it takes for the faster step to pay it back.
"""

from __future__ import annotations

import itertools

import torch

from stale.bench import build, median, random_batches, timed, torch_threads


def _variant_name(threads: int, compiled: bool, fused: bool) -> str:
    return (
        f"{threads} thread{'s' if threads > 1 else ''}, {'compiled' if compiled else 'eager'}, "
        f"{'fused' if fused else 'loop'} AdamW"
    )


def run(
    model: str = "tiny",
    frames: int = 8,
    size: int = 16,
    batch_size: int = 8,
    steps: int = 30,
    rounds: int = 3,
    threads=(1, 2),
    compile=(False, True),
    fused=(True, False),
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """fused: AdamW's one-kernel update (StaleSystem's choice) against torch's per-tensor loop (its CPU default)."""
    from stale.bench.gpu import train_step  # the measured step, compiled as stale-train compiles

    if not str(device).startswith("cpu"):
        return {"rows": [{"variant": "not measured (a CPU section; this run's device is CUDA)"}]}
    batches = random_batches(4, batch_size, frames, size, seed=seed)
    trainers, first_s, times = {}, {}, {}
    with torch_threads(None):  # each variant sets its own; the bench's count comes back after
        for r in range(rounds):
            for n_threads, compiled, fuse in itertools.product(threads, compile, fused):
                torch.set_num_threads(int(n_threads))
                name = _variant_name(int(n_threads), bool(compiled), bool(fuse))
                if name not in trainers:  # built and warmed up (compiled) in its first round
                    torch.manual_seed(seed)
                    trainers[name] = train_step(build(model, frames, size), "cpu", "32-true", bool(compiled))
                    if not fuse:  # the same AdamW on torch's per-tensor loop: the flag is read at every step
                        for group in trainers[name].optimizer.param_groups:
                            group["fused"] = None
                    first_s[name] = timed(lambda: [trainers[name](b) for b in batches[:2]], "cpu")
                cycle = itertools.cycle(batches)
                times.setdefault(name, []).append(timed(lambda: trainers[name](next(cycle)), "cpu", steps))
    base = _variant_name(int(max(threads)), False, bool(fused[0]))  # one thread per core (torch's default), eager
    rows = []
    for name, ts in times.items():
        step = median(ts)
        row = {
            "variant": name,
            "step_ms": round(1e3 * step, 2),
            "steps_per_s": round(1 / step, 2),
            "speed_vs_default": round(median(times[base]) / step, 3) if base in times else None,
            "first_2_steps_s": round(first_s[name], 2),
        }
        if "compiled" in name and name.replace("compiled", "eager") in times:
            eager = median(times[name.replace("compiled", "eager")])
            extra = first_s[name] - first_s[name.replace("compiled", "eager")]
            row["compile_s"] = round(extra, 1)
            row["break_even_steps"] = round(extra / (eager - step)) if eager > step else "never"
        rows.append(row)
    return {
        "rows": rows,
        "summary": {"default": base, "fastest": min(times, key=lambda k: median(times[k]))},
        "notes": [
            f"{model} model, {frames}x{size}x{size} clips, batch {batch_size}, {rounds} rounds x {steps} "
            "steps per variant (median step), variants interleaved; compile_s: extra wall time of the "
            "compiled variant's first 2 steps over eager's"
        ],
    }
