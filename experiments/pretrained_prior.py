"""docs/pretrained.md "Measured": how a pretrained backbone's loss recovers when fine-tuning switches it from the
family's Gaussian prior to stale's uniform prior.

A tiny random-init WanTransformer3DModel (pixel space: 3 channels, patch 1x2x2, width 64, 4 blocks) with a tiny T5
text encoder is first trained on the captioned synthetic clips with the Gaussian prior (the "pretrained" model), then
fine-tuned from that checkpoint (init_from) for a few hundred steps with each prior, two seeds each:

    gaussian   the native objective: the ceiling (no prior shift)
    uniform    stale's prior U[-1, 1]^d on pixels (variance 1/3, the pixel range)
    uniform_v1 U[-sqrt 3, sqrt 3]^d: the Gaussian's variance, as on normalised latents
    scratch    the uniform prior from a random init at the same steps: the floor

Each fine-tune is scored by its train/loss (under its own prior) over step windows, and by its validation loss
under the Gaussian prior's and its own prior's fixed noise, all as mean +- standard error over the two seeds.

    .venv/bin/python experiments/pretrained_prior.py --out docs/results/pretrained_prior.md
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny text encoder (helpers.save_tiny_t5)

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from helpers import save_tiny_t5  # noqa: E402
from stale.train import train  # noqa: E402

WINDOWS = ((0, 10), (10, 50), (50, None))
PRIORS = {
    "gaussian": ["diffusion.prior=gaussian"],
    "uniform": ["diffusion.prior=uniform", "diffusion.prior_scale=1.0"],
    "uniform_v1": ["diffusion.prior=uniform", f"diffusion.prior_scale={math.sqrt(3):.6f}"],
}


def base_folder(root: Path) -> tuple[Path, Path]:
    """A random-init Wan transformer folder and a tiny T5 folder."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=3,
        out_channels=3,
        text_dim=16,
        ffn_dim=128,
        num_layers=4,
        rope_max_seq_len=64,
    ).save_pretrained(str(root / "wan"))
    return root / "wan", save_tiny_t5(root / "t5")


def run(out: Path, wan: Path, t5: Path, steps: int, seed: int, *overrides: str) -> list[dict]:
    args = [
        "model=diffusers",
        f"model.pretrained={wan}",
        "model.subfolder=null",
        "text_encoder=hf",
        f"text_encoder.pretrained={t5}",
        "text_encoder.max_length=16",
        "data.style=captioned",
        "data.frames=8",
        "data.size=16",
        "data.batch_size=8",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"schedule.warmup={min(100, steps // 4)}",
        "sample.num_videos=2",
        "sample.steps=10",
        "sample_every_n_steps=0",
        "threads=1",
        f"seed={seed}",
        f"paths.output_dir={out}",
        *overrides,
    ]
    with initialize_config_module("stale.conf", version_base="1.3"):
        cfg = compose("train", overrides=args)
    train(cfg)
    with open(out / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def window_means(rows: list[dict]) -> list[float]:
    loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    picked = [[v for s, v in loss.items() if s >= a and (b is None or s < b)] for a, b in WINDOWS]
    return [statistics.mean(v) if v else float("nan") for v in picked]


def mean_se(values: list[float]) -> str:
    m = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{m:.4f} +- {se:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--ft-steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "pretrained_prior.md")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wan, t5 = base_folder(root)
        run(root / "base", wan, t5, a.base_steps, 0, *PRIORS["gaussian"])
        base = root / "base" / "checkpoints" / "last.ckpt"
        results: dict[str, list[list[float]]] = {}
        for name, overrides in {**PRIORS, "scratch": PRIORS["uniform"]}.items():
            init = [] if name == "scratch" else [f"init_from={base}"]
            for seed in a.seeds:
                rows = run(root / f"{name}-{seed}", wan, t5, a.ft_steps, seed, *overrides, *init)
                results.setdefault(name, []).append(window_means(rows))
    head = " | ".join(f"train/loss steps {lo}-{'end' if hi is None else hi - 1}" for lo, hi in WINDOWS)
    lines = [
        "# Switching a pretrained backbone's prior: the loss over the first fine-tuning steps",
        "",
        f"`{' '.join(['experiments/pretrained_prior.py', *sys.argv[1:]])}`; base: {a.base_steps} steps with the "
        f"Gaussian prior; each fine-tune {a.ft_steps} steps, seeds {a.seeds}, mean +- standard error over seeds. "
        "Each loss is under the run's own prior (the uniform prior's velocity target x - z has another variance on "
        "pixels: compare a run with its own scratch row, and the Gaussian rows with each other).",
        "",
        f"| fine-tune | {head} |",
        "|---|" + "---|" * len(WINDOWS),
    ]
    for name, per_seed in results.items():
        cells = [mean_se([s[i] for s in per_seed]) for i in range(len(WINDOWS))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
