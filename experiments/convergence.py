"""The paper's claim, measured: does the reverse process from a uniform prior recover the data, and how fast?

Drives the exact oracle v* (stale/diffusion/oracle.py) of a finite 2-D data set with the project's
samplers and writes a table (docs/convergence.md) and a plot (docs/convergence.png):

    .venv/bin/python experiments/convergence.py            # about 8 minutes on one core (measured, shared machine)
    .venv/bin/python experiments/convergence.py --grid 32 --max-steps 64 --out /tmp/conv   # a quick look

Prior draws are a deterministic quadrature, not random: the midpoints u of a K x K grid on [0, 1]^2,
mapped to z = 2u - 1 (uniform prior) or z = Phi^-1(u) (Gaussian prior), each with mass 1/K^2. Both priors
therefore use the same points u, and no Monte Carlo noise enters the comparison.

Metrics of the sampled distribution P_n against the data distribution P (N points, mass 1/N each):
  near   = E ||x - nearest data point||               (how far samples are from the data points)
  mass   = W1 between the nearest-point masses and 1/N  (how wrong the mass of each data point is)
  W1     = near + mass: an upper bound on the Wasserstein-1 distance W1(P_n, P) (move every sample to its
           nearest point, then rebalance the masses). It is exact once samples sit on the data points,
           and W1(P_n, P) >= max(near, mass - near).
  traj   = E ||x_n(z) - x_ref(z)||, the error of each trajectory against a fine reference solution from
           the same z (Heun with --ref-steps steps): no quadrature floor.
The quadrature itself has an error (basin boundaries cut grid cells): the W1 of the reference run is
that floor, and orders are fitted only where a metric is at least 3x its floor.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linprog

from stale.diffusion import flow
from stale.diffusion.guidance import classifier_guided, input_gradient
from stale.diffusion.oracle import Oracle
from stale.diffusion.samplers import EVALS_PER_STEP, SAMPLERS, time_grid

REPO = Path(__file__).resolve().parents[1]
TRAJ_FLOOR = 1e-10  # below this a trajectory error is rounding: every sample ends on the reference's point


def make_data(n: int, d: int, seed: int) -> torch.Tensor:
    """n points in [-0.8, 0.8]^d (inside the uniform prior's support), float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64) * 1.6 - 0.8


def prior_grid(k: int, prior: str) -> torch.Tensor:
    """K^2 stratified prior points (2-D): the same grid midpoints u mapped through each prior's inverse CDF."""
    u = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    uu = torch.cartesian_prod(u, u)
    return uu * 2 - 1 if prior == "uniform" else torch.special.ndtri(uu)


def mass_w1(mass: np.ndarray, data: np.ndarray) -> float:
    """W1 between sum_j mass_j delta_{y_j} and the uniform measure on the same points (an N x N LP)."""
    n = len(data)
    cost = np.linalg.norm(data[:, None] - data[None], axis=-1).ravel()
    rows = np.zeros((2 * n, n * n))
    for i in range(n):
        rows[i, i * n : (i + 1) * n] = 1  # row sums: the sampled masses
        rows[n + i, i::n] = 1  # column sums: 1/N each
    b = np.concatenate([mass, np.full(n, 1.0 / n)])
    res = linprog(cost, A_eq=rows[:-1], b_eq=b[:-1], bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"transport LP failed: {res.message}")
    return float(res.fun)


def metrics(x: torch.Tensor, data: torch.Tensor, ref: torch.Tensor | None) -> dict:
    dist = torch.cdist(x, data, compute_mode="donot_use_mm_for_euclid_dist")  # (M, N), exact distances
    near, idx = dist.min(dim=1)
    mass = (torch.bincount(idx, minlength=len(data)).double() / len(x)).numpy()
    out = {
        "near": near.mean().item(),
        "mass": mass_w1(mass, data.numpy()),
        "tv": 0.5 * float(np.abs(mass - 1 / len(data)).sum()),
    }
    out["w1"] = out["near"] + out["mass"]
    out["traj"] = float("nan") if ref is None else (x - ref).norm(dim=1).mean().item()
    return out


def fit_order(steps: list, values: list, floor: float) -> tuple[float, list]:
    """Least-squares slope p of log(value) = c - p log(steps), from 16 steps up to (not including) the first
    value below 3x the floor or equal to 0: the asymptotic range before the quadrature floor."""
    use = []
    for s, v in zip(steps, values):
        if s < 16:
            continue
        if not v > 0 or v < 3 * floor:
            break
        use.append((s, v))
    if len(use) < 3:
        return float("nan"), [s for s, _ in use]
    s, v = np.log([u[0] for u in use]), np.log([u[1] for u in use])
    return float(-np.polyfit(s, v, 1)[0]), [u[0] for u in use]


def guidance_check(seed: int, n: int = 2000) -> dict:
    """Classifier guidance with the exact log p(y | x_t) vs the exact class-conditional oracle.

    Data: 6 points in 3-D, classes {0,0,0,1,1,1}; (x_t, t) on class 1's paths, t in [0.2, 0.9].
    Returns, per prior, max |v_guided - v_cond| and max |v_plain - v_cond| (what guidance had to fix).
    """
    data = make_data(6, 3, seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    out = {}
    for prior in ("uniform", "gaussian"):
        full, cond = Oracle(data, prior), Oracle(data[labels == 1], prior)
        log_p = lambda x, t: full.weights(x, t)[:, labels == 1].sum(1).clamp_min(1e-300).log()  # noqa: E731
        guided = classifier_guided(full, input_gradient(log_p), scale=1.0)
        g = torch.Generator().manual_seed(seed + 1)
        t = torch.rand(n, generator=g, dtype=torch.float64) * 0.7 + 0.2
        z = flow.sample_prior((n, 3), prior, generator=g, dtype=torch.float64)
        x = flow.interpolate(z, data[3 + torch.randint(0, 3, (n,), generator=g)], t)
        vc = cond(x, t)
        out[prior] = ((guided(x, t) - vc).abs().max().item(), (full(x, t) - vc).abs().max().item())
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    data = make_data(args.points, 2, args.seed)
    steps_list = [2**e for e in range(2, int(math.log2(args.max_steps)) + 1)]
    results, refs, samples = {}, {}, {}
    for prior in ("uniform", "gaussian"):
        oracle, z, clamp = Oracle(data, prior), prior_grid(args.grid, prior), prior == "uniform"
        t0 = time.time()
        ref = SAMPLERS["heun"](oracle, z, time_grid(args.ref_steps).double(), clamp=clamp)
        refs[prior] = metrics(ref, data, None)
        print(
            f"{prior} reference (heun, {args.ref_steps} steps): W1 {refs[prior]['w1']:.3e} ({time.time() - t0:.0f}s)",
            flush=True,
        )
        for name in args.samplers:
            for steps in steps_list:
                t0 = time.time()
                x = SAMPLERS[name](oracle, z, time_grid(steps).double(), clamp=clamp)
                results[prior, name, steps] = m = metrics(x, data, ref)
                if steps == 8:
                    samples[prior, name] = x
                print(
                    f"{prior:8s} {name:5s} {steps:5d}  W1 {m['w1']:.3e}  near {m['near']:.2e}  "
                    f"mass {m['mass']:.2e}  traj {m['traj']:.2e}  ({time.time() - t0:.1f}s)",
                    flush=True,
                )
    return {
        "data": data,
        "steps": steps_list,
        "results": results,
        "refs": refs,
        "samples": samples,
        "guidance": guidance_check(args.seed),
    }


def orders(out: dict, samplers: list) -> dict:
    fits = {}
    for prior in ("uniform", "gaussian"):
        for name in samplers:
            r = [out["results"][prior, name, s] for s in out["steps"]]
            fits[prior, name, "w1"] = fit_order(out["steps"], [m["w1"] for m in r], out["refs"][prior]["w1"])
            fits[prior, name, "traj"] = fit_order(out["steps"], [m["traj"] for m in r], TRAJ_FLOOR)
    return fits


def plot(out: dict, fits: dict, samplers: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = {"uniform": "tab:red", "gaussian": "tab:blue"}
    styles = {"euler": "o-", "heun": "s--", "rk4": "^:"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    steps = np.array(out["steps"])
    panels = (
        (axes[0], "w1", "steps", "distance to the data distribution (W1 bound) vs steps"),
        (axes[1], "traj", "steps", f"trajectory error vs a {out['ref_steps']}-step Heun solution (< 1e-10 not drawn)"),
        (axes[2], "w1", "nfe", "W1 bound vs velocity evaluations (cost)"),
    )
    for ax, key, xaxis, title in panels:
        for prior in ("uniform", "gaussian"):
            for name in samplers:
                v = np.array([out["results"][prior, name, s][key] for s in steps])
                x = steps if xaxis == "steps" else EVALS_PER_STEP[name] * steps - (name != "euler")
                label = f"{prior} / {name}" + (f" (order {fits[prior, name, key][0]:.2f})" if xaxis == "steps" else "")
                keep = v > (TRAJ_FLOOR if key == "traj" else 0)  # below TRAJ_FLOOR: rounding, not drawn
                ax.loglog(x[keep], v[keep], styles.get(name, "x-"), color=colours[prior], ms=4, label=label)
            if key == "w1":
                ax.axhline(
                    out["refs"][prior]["w1"],
                    color=colours[prior],
                    lw=0.8,
                    alpha=0.5,
                    label=f"{prior}: quadrature floor",
                )
        if xaxis == "steps":
            top = max(out["results"][pr, n, steps[0]][key] for pr in ("uniform", "gaussian") for n in samplers)
            for p, ls in ((1, ":"), (2, "-.")):
                ax.loglog(steps, top * (steps / steps[0]) ** -p, ls, color="grey", lw=0.8, label=f"slope -{p}")
            ax.set_xticks(steps, [str(s) for s in steps])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("steps" if xaxis == "steps" else "velocity evaluations per sample")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(out: dict, fits: dict, samplers: list, args, seconds: float, path: Path, png: str) -> None:
    steps, res, refs = out["steps"], out["results"], out["refs"]
    lines = [
        "# Convergence of oracle sampling: uniform vs Gaussian prior",
        "",
        "Regenerate (table and plot) with one command: `.venv/bin/python experiments/convergence.py`",
        f"(this run: `--grid {args.grid} --points {args.points} --seed {args.seed} --max-steps {args.max_steps} "
        f"--ref-steps {args.ref_steps} --samplers {' '.join(samplers)}`, {seconds / 60:.1f} min on "
        f"{args.threads} CPU thread(s) of a shared machine).",
        "",
        'The paper claims its reverse process from a uniform prior "in infinite time recovers samples from',
        'the original data distribution". Here the velocity is the exact optimum v* for a finite data set',
        "(`stale/diffusion/oracle.py`), so every error below is the sampler's, not a network's.",
        "",
        f"- Data: N = {args.points} points in [-0.8, 0.8]^2 (seed {args.seed}), mass 1/N each.",
        f"- Prior draws: a {args.grid} x {args.grid} quadrature (grid midpoints u mapped by each prior's inverse "
        "CDF), identical u for both priors: no Monte Carlo noise.",
        "- Uniform prior: x clamped to [-1, 1] after every step and stage (a reflected process); the oracle "
        "falls back to the nearest box when no box holds x. Gaussian prior: no clamping.",
        "- Samplers never evaluate t = 1 (v* is singular there): the last step of Heun is an Euler step, that of",
        "  RK4 is Ralston's third-order method (each keeps the global order; tests/test_samplers.py).",
        "- W1 = near + mass, an upper bound on the Wasserstein-1 distance to the data distribution, exact once",
        "  samples sit on data points; near = mean distance to the nearest data point; mass = W1 between the",
        "  nearest-point masses and 1/N; TV = total variation of those masses; traj = mean distance to the",
        f"  same z's endpoint under a {args.ref_steps}-step Heun reference. NFE = velocity evaluations per sample.",
        "",
        "![convergence](" + png + ")",
        "",
        "## Fitted convergence order",
        "",
        "Least-squares slope of log(metric) against log(steps), from 16 steps up to the first value below 3x",
        "its floor (W1: the W1 of the reference run, i.e. the quadrature's own error; traj: 1e-10). With the",
        "uniform prior every method is first order, so the reference is too: at 4096 steps its error should",
        "be about a quarter of a 1024-step run's, so traj values near 1024 steps are partly the reference's.",
        'nan: fewer than 3 points in that range. "W1 <= 3x floor from": the fewest steps that reach the floor.',
        "",
        "| prior | sampler | order (W1) | fitted on steps | order (traj) | fitted on steps | W1 floor | "
        "W1 <= 3x floor from |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for prior in ("uniform", "gaussian"):
        for name in samplers:
            (pw, sw), (pt, st) = fits[prior, name, "w1"], fits[prior, name, "traj"]
            rng = lambda s: f"{s[0]}-{s[-1]}" if s else "-"  # noqa: E731
            lines.append(
                f"| {prior} | {name} | {pw:.2f} | {rng(sw)} | {pt:.2f} | {rng(st)} | "
                f"{refs[prior]['w1']:.1e} | {reach(out, prior, name)} |"
            )
    lines += [
        "",
        "## Table",
        "",
        "| prior | sampler | steps | NFE | W1 | near | mass | TV | traj |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for prior in ("uniform", "gaussian"):
        for name in samplers:
            for s in steps:
                m = res[prior, name, s]
                nfe = EVALS_PER_STEP[name] * s - (name != "euler")  # the last step has one stage fewer
                lines.append(
                    f"| {prior} | {name} | {s} | {nfe} | {m['w1']:.2e} | {m['near']:.1e} | "
                    f"{m['mass']:.1e} | {m['tv']:.1e} | {m['traj']:.1e} |"
                )
    lines += ["", "## What this run shows", ""] + summary(out, fits, samplers) + [""]
    gu, ga = out["guidance"]["uniform"], out["guidance"]["gaussian"]
    lines += [
        "## Classifier guidance against the exact oracle",
        "",
        "With a Gaussian prior, Tweedie's identity ties velocity and score, v = (x + (1 - t) grad log p_t) / t,",
        "so classifier guidance v + (1 - t) / t grad log p(y | x_t) is exact. With the uniform prior p_t is a",
        "mixture of boxes: its score is 0 almost everywhere while v* is not, and p(y | x_t) is piecewise",
        "constant. Measured here with the exact log p(y | x_t) of 6 points in 3-D (2 classes, 2000 points on",
        "class 1's paths, t in [0.2, 0.9]):",
        "",
        "| prior | max abs(guided - conditional v*) | max abs(unguided - conditional v*) |",
        "|---|---|---|",
        f"| gaussian | {ga[0]:.1e} | {ga[1]:.2f} |",
        f"| uniform | {gu[0]:.2f} | {gu[1]:.2f} |",
        "",
        "So the sampler's classifier guidance (`sample.classifier_guidance`, the hinge head's margin gradient",
        "in place of log p(y | x_t), `stale/diffusion/guidance.py`) is a heuristic twice over with the uniform",
        "prior: the margin is not a log-probability, and even the exact log-probability would not guide.",
        "Classifier-free guidance does not depend on this identity and is the recommended control.",
        "",
    ]
    path.write_text("\n".join(lines))


def reach(out: dict, prior: str, name: str) -> str:
    """The fewest steps (of those run) whose W1 is within 3x the floor, as text."""
    floor = out["refs"][prior]["w1"]
    hit = [s for s in out["steps"] if out["results"][prior, name, s]["w1"] <= 3 * floor]
    return f"{hit[0]} steps" if hit else f"not by {out['steps'][-1]}"


def summary(out: dict, fits: dict, samplers: list) -> list:
    """Sentences computed from this run's numbers, so that they stay true when the script is rerun."""
    res, steps, refs = out["results"], out["steps"], out["refs"]
    lo, hi = steps[0], steps[-1]
    cases = [(p, n) for p in ("uniform", "gaussian") for n in samplers]
    near = max(res[c + (hi,)]["near"] for c in cases)
    w1_hi = max(res[c + (hi,)]["w1"] for c in cases)
    tv_hi = max(res[c + (hi,)]["tv"] for c in cases)
    worst_floor = max(res[c + (hi,)]["w1"] / refs[c[0]]["w1"] for c in cases)
    lines = [
        f"- **The claim holds for the exact field.** After {hi} steps, with either prior and every sampler, the "
        f"samples sit on the data points (mean distance to the nearest one at most {near:.0e}), each point "
        f"holds 1/N of the mass up to a total variation of {tv_hi:.1e}, and the W1 distance to the data "
        f"distribution is at most {w1_hi:.1e} (from {min(res[c + (lo,)]['w1'] for c in cases):.2f}-"
        f"{max(res[c + (lo,)]['w1'] for c in cases):.2f} at {lo} steps), within {worst_floor:.1f}x of the "
        'quadrature floor. More steps, less error: "infinite time" is the limit of a convergent sampler.',
    ]
    uni = [fits["uniform", n, "traj"][0] for n in samplers]
    if all(0.7 <= p <= 1.4 for p in uni):
        lines.append(
            "- **Uniform prior: first order, whatever the method** (trajectory orders "
            + ", ".join(f"{n} {p:.2f}" for n, p in zip(samplers, uni))
            + "). The exact field jumps where a data point's box enters or leaves the active set, and "
            "clamping reflects at the faces, so Heun and RK4 lose their higher order, as METHOD.md "
            "predicts. They still have smaller constants per step."
        )
    else:
        lines.append("- Uniform prior, trajectory orders: " + ", ".join(f"{n} {p:.2f}" for n, p in zip(samplers, uni)))
    gau = ", ".join(
        f"{n} {fits['gaussian', n, 'traj'][0]:.2f} (steps {fits['gaussian', n, 'traj'][1][0]}-"
        f"{fits['gaussian', n, 'traj'][1][-1]})"
        if fits["gaussian", n, "traj"][1]
        else f"{n} -"
        for n in samplers
    )
    fast = [n for n in samplers if not fits["gaussian", n, "traj"][0] == fits["gaussian", n, "traj"][0]]  # nan
    fast_txt = "".join(
        f" {n}: trajectory error "
        + ", ".join(f"{res['gaussian', n, s]['traj']:.0e} at {s}" for s in steps[2:5])
        + " steps."
        for n in fast
    )
    lines.append(
        f"- **Gaussian prior: the higher-order methods pay off.** Trajectory orders {gau}."
        + (
            f"{fast_txt} An order is not defined there: once every trajectory ends in the reference's "
            "basin, what is left is rounding."
            if fast
            else ""
        )
        + " W1 reaches 3x its floor at "
        + ", ".join(f"{n} {reach(out, 'gaussian', n)}" for n in samplers)
        + " (uniform prior: "
        + ", ".join(f"{n} {reach(out, 'uniform', n)}" for n in samplers)
        + ")."
    )
    mid = 128 if 128 in steps else steps[len(steps) // 2]
    lines.append(
        f"- **Uniform vs Gaussian.** With Euler the two priors converge alike (W1 at {hi} steps "
        f"{res['uniform', samplers[0], hi]['w1']:.1e} vs {res['gaussian', samplers[0], hi]['w1']:.1e}). "
        "With a higher-order method the Gaussian prior is far ahead: trajectory error at "
        f"{mid} steps "
        + ", ".join(
            f"{n} {res['uniform', n, mid]['traj']:.1e} (uniform) vs {res['gaussian', n, mid]['traj']:.1e} (gaussian)"
            for n in samplers[1:]
        )
        + ". The uniform prior's price is a first-order sampler."
    )
    budget = []
    for prior in ("uniform", "gaussian"):
        parts = []
        for n in samplers:
            s = hi // EVALS_PER_STEP[n]
            if s in steps:
                parts.append(f"{n} {s} steps {res[prior, n, s]['w1']:.1e}")
        budget.append(f"{prior}: " + ", ".join(parts))
    lines.append(f"- **At equal cost** (about {hi} velocity evaluations), W1: " + "; ".join(budget) + ".")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, default=128, help="K: K x K quadrature points of the prior")
    ap.add_argument("--points", type=int, default=8, help="N data points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=1024, help="steps run: 4, 8, ..., max-steps")
    ap.add_argument("--ref-steps", type=int, default=4096, help="steps of the Heun reference solution")
    ap.add_argument("--samplers", nargs="+", default=["euler", "heun", "rk4"], choices=sorted(SAMPLERS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small tensors: 1 is fastest)")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="folder for convergence.md and .png")
    ap.add_argument(
        "--raw",
        type=Path,
        default=None,
        help="also save the raw results here (torch.save); with --replot, read them instead of running",
    )
    ap.add_argument("--replot", action="store_true", help="redraw the table and plot from --raw, no sampling")
    args = ap.parse_args()
    t0 = time.time()
    if args.replot:
        if args.raw is None or not args.raw.is_file():
            ap.error(f"--replot needs --raw pointing to a saved results file, got {args.raw}")
        out = torch.load(args.raw, weights_only=False)
    else:
        out = run(args)
        out["ref_steps"], out["seconds"] = args.ref_steps, time.time() - t0
        out["args"] = {
            k: getattr(args, k) for k in ("grid", "points", "seed", "max_steps", "ref_steps", "samplers", "threads")
        }
        if args.raw is not None:
            torch.save(out, args.raw)
    run_args = argparse.Namespace(**out["args"])  # what was sampled (with --replot: the saved run's)
    fits = orders(out, run_args.samplers)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(out, fits, run_args.samplers, args.out / "convergence.png")
    write_markdown(
        out, fits, run_args.samplers, run_args, out["seconds"], args.out / "convergence.md", "convergence.png"
    )
    print(f"wrote {args.out / 'convergence.md'} and {args.out / 'convergence.png'}")


if __name__ == "__main__":
    main()
