"""Draw docs/schedules.png: the four learning-rate schedules, and arctan at several sharpness values.

    .venv/bin/python scripts/plot_schedules.py [--out docs/schedules.png]

Uses the schedule functions the trainer uses (stale.system.schedules), with the defaults of conf/schedule/*.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stale.system.schedules import SCHEDULES, lr_multiplier, schedule_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "schedules.png"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    steps = range(args.steps + 1)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name in SCHEDULES:
        f = lr_multiplier(name, args.warmup, args.steps, **schedule_params(name))
        ax1.plot(steps, [f(s) for s in steps], label=name, lw=2 if name == "arctan" else 1.3)
    ax1.set_title(f"schedules (warmup {args.warmup}, {args.steps} steps, min_ratio 0.1)")
    ax1.set_xlabel("optimiser step")
    ax1.set_ylabel("lr / optim.lr")
    ax1.legend()

    for a in (0.5, 2.0, 5.0, 20.0):
        f = lr_multiplier("arctan", args.warmup, args.steps, min_ratio=0.1, sharpness=a)
        ax2.plot(steps, [f(s) for s in steps], label=f"sharpness a = {a:g}" + (" (default)" if a == 5.0 else ""))
    mid = args.warmup + (args.steps - args.warmup) / 2
    ax2.plot([mid], [0.55], "k+", ms=12, label="centre of symmetry")
    ax2.set_title("arctan: point-symmetric about the middle of the decay")
    ax2.set_xlabel("optimiser step")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.05)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
