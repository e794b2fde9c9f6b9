"""Sampler overhead and the cost of classifier-free guidance (docs/bench/overhead.md).

Overhead: a round times `nfe` back-to-back forwards of the velocity generate() integrates, then one sampling run of
`steps` steps; overhead = sampling / forwards - 1 (nfe counted with a counting closure), `per_step_ratio` =
sampling / (steps x one forward). Guidance: generate()'s one forward over the doubled batch against two forwards of
batch B, in wall and process CPU time. Rounds alternate the timings; the headline is the median over rounds.
"""

from __future__ import annotations

import time

import torch

from stale.bench import build, median, timed
from stale.diffusion import flow
from stale.diffusion.generate import generate, guided_velocity
from stale.diffusion.guidance import cfg_combine
from stale.diffusion.samplers import get_sampler, sample_euler, time_grid

TARGET_OVERHEAD = 0.05  # issue 11: sampler overhead <= 5%


def _count_nfe(sampler, velocity, x, ts, clamp: bool) -> int:
    calls = [0]

    def counting(x_t, t):
        calls[0] += 1
        return velocity(x_t, t)

    sampler(counting, x, ts, clamp=clamp, progress=False)
    return calls[0]


@torch.no_grad()
def run(
    model: str = "tiny",
    frames: int = 8,
    size: int = 16,
    batch_size: int = 4,
    steps: int = 20,
    samplers=("euler", "heun"),
    rounds: int = 5,
    system_sample: bool = True,
    cfg_weight: float = 3.0,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    if steps < 1 or rounds < 1:
        raise ValueError(f"sampler: steps={steps} and rounds={rounds} must be >= 1")
    torch.manual_seed(seed)
    net = build(model, frames, size).to(device).eval()
    labels = (torch.arange(batch_size) % net.config.num_classes).to(device)
    x0 = flow.sample_prior(
        (batch_size, net.config.in_channels, frames, size, size),
        "uniform",
        generator=torch.Generator().manual_seed(seed),
    ).to(device)
    ts = time_grid(steps, device)
    velocity = guided_velocity(net, labels)  # guidance 1: one forward per evaluation

    def forwards(n: int):
        t = ts[0].expand(batch_size)
        for _ in range(n):
            velocity(x0, t)

    plans = []  # (row name, callable running one sampling, nfe)
    for name in samplers:
        fn = get_sampler(name)  # an unknown name is an error naming sample.sampler, not a row
        nfe = _count_nfe(fn, velocity, x0, ts, clamp=True)
        plans.append((name, lambda fn=fn: fn(velocity, x0, ts, clamp=True, progress=False), nfe))
    if system_sample:  # the user-facing path: prior draw, sampler, uint8 conversion
        from stale.bench.step import make_system

        system = make_system(net, 1e-3).to(device)
        plans.append(
            ("StaleSystem.sample(euler)", lambda: system.sample(labels, steps=steps, sampler="euler", seed=seed), steps)
        )

    rows = []
    for name, sample, nfe in plans:
        forwards(1)  # warm up (allocator, lazy inits)
        sample()
        ratios, sample_s, fwd_s = [], [], []
        for _ in range(rounds):
            f = timed(lambda: forwards(nfe), device)
            s = timed(sample, device)
            ratios.append(s / f)
            sample_s.append(s)
            fwd_s.append(f / nfe)
        one = median(fwd_s)
        rows.append(
            {
                "sampler": name,
                "status": "measured",
                "steps": steps,
                "nfe": nfe,
                "forward_ms": round(1e3 * one, 3),
                "sample_ms": round(1e3 * median(sample_s), 3),
                "per_step_ratio": round(median(sample_s) / (steps * one), 4),
                "overhead": round(median(ratios) - 1, 4),
                "meets_target": median(ratios) - 1 <= TARGET_OVERHEAD,
            }
        )
    summary = {
        "target": TARGET_OVERHEAD,
        "worst_overhead": max(r["overhead"] for r in rows),
        "meets_target": all(r["meets_target"] for r in rows),
    }
    if cfg_weight != 1.0:
        cfg_rows, ratio = _guidance_rows(net, labels, x0, ts, cfg_weight, rounds, device, seed)
        rows, summary = rows + cfg_rows, {**summary, **ratio}
    return {
        "rows": rows,
        "summary": summary,
        "setup": {
            "model": model,
            "clip": [frames, size, size],
            "batch_size": batch_size,
            "steps": steps,
            "rounds": rounds,
            "cfg_weight": cfg_weight,
            "device": device,
        },
        "notes": [
            "overhead = median over rounds of sampling time / (nfe back-to-back forwards) - 1; "
            "per_step_ratio = sampling time / (steps x one forward)",
            "cfg_ratio = batched-CFG sampling time / two-pass CFG sampling time (Euler, same prior); "
            "per video = sample_ms / batch_size",
        ],
    }


def _guidance_rows(net, labels, x0, ts, weight: float, rounds: int, device: str, seed: int):
    """Euler at guidance `weight`: generate() (one batched forward per step) against two forwards per step."""
    null = torch.full_like(labels, net.config.num_classes)
    two_pass = lambda x, t: cfg_combine(net(x, t, labels)[0], net(x, t, null)[0], weight)  # noqa: E731 (before)
    before, after = "cfg two passes (euler)", "cfg batched, generate() (euler)"
    plans = {
        before: lambda: sample_euler(two_pass, x0, ts),
        after: lambda: generate(net, labels, steps=len(ts) - 1, guidance=weight, seed=seed),
    }
    wall, cpu = {name: [] for name in plans}, {name: [] for name in plans}
    for name, fn in plans.items():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in plans.items():
            c0 = time.process_time()
            wall[name].append(timed(fn, device))
            cpu[name].append(time.process_time() - c0)
    b = len(labels)
    rows = [
        {
            "sampler": name,
            "status": "measured",
            "steps": len(ts) - 1,
            "guidance": weight,
            "nfe": 2 * (len(ts) - 1),
            "sample_ms": round(1e3 * median(wall[name]), 3),
            "ms_per_video": round(1e3 * median(wall[name]) / b, 3),
            "cpu_ms_per_video": round(1e3 * median(cpu[name]) / b, 3),
        }
        for name in plans
    ]
    return rows, {
        "cfg_ratio_wall": round(median(wall[after]) / median(wall[before]), 4),
        "cfg_ratio_cpu": round(median(cpu[after]) / median(cpu[before]), 4),
    }
