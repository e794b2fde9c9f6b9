#!/usr/bin/env python
"""The measurements of docs/finetune.md: video continuation with and without frame conditioning, and LoRA against
full fine-tuning from a model trained on half of the classes to the other half.

    .venv/bin/python experiments/finetune.py                  # the numbers in docs/finetune.md (2 CPU cores)
    .venv/bin/python experiments/finetune.py --steps 4000     # a longer run

A plain loop of stale-bench's training step (stale.bench.step: StaleSystem's loss and AdamW, 50 warmup steps,
clipping at 1) over the library's own parts (StaleTransformer, StaleObjective, apply_finetune, generate), on
clips of the embedded synthetic data drawn in memory (style "simple": 8 x 16 x 16, one shape and colour per class,
moving and bouncing), with an EMA of the weights (decay 0.995) for sampling, like stale-train. One thread.

Continuation: each test clip gives its first K frames; the model generates the rest with the null label, so the
colour, shape and position can only come from the given frames. Scored against the real continuation: the object
is the pixels far from the background colour; its centroid is tracked over frames.
  seam px      centroid distance, first generated frame vs the real clip's same frame
  track px     mean centroid distance over all generated frames
  direction    cosine between the generated and the real mean displacement per frame
  colour       mean RGB distance of the generated object's pixels from the given object's colour
  found        share of generated frames with an object at all
  head agrees  share of clips whose generated frames the model's hinge head (label-free, t = 0.9) puts in the
               given clip's class (the shape, since every class is one shape)
LoRA: a base trained on classes {0, 1}, then fine-tuned on {2, 3} for equal steps, fully or with LoRA adapters
(plus the label table, whose rows for 2 and 3 the base never trained). Scored on held-out clips of {2, 3}.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stale.bench.step import TrainStep, make_system
from stale.data.media import contact_sheet
from stale.data.synthetic import COLOURS, SIMPLE_BACKGROUND, SyntheticSpec, make_clip
from stale.diffusion import flow
from stale.diffusion.generate import generate
from stale.diffusion.hinge import predict
from stale.diffusion.objective import StaleObjective
from stale.models import build_model
from stale.models.finetune import Finetune, apply_finetune, merged
from stale.system.schedules import Constant
from stale.system.stale_system import validation_losses

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(frames=8, size=16, num_classes=4, style="simple")


def clips(n: int, seed: int, classes=(0, 1, 2, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.asarray(classes)[rng.integers(len(classes), size=n)]
    video = np.stack([make_clip(rng, SPEC, int(y)) for y in labels])  # (N, T, H, W, C)
    return torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous(), torch.from_numpy(labels).long()


def train(model, objective, data, steps: int, lr: float, seed: int, batch: int = 8, log_every: int = 100):
    """`steps` training steps on random batches of `data`; returns the EMA model (eval mode) and the seconds."""
    video, labels = data
    schedule = Constant(warmup=min(50, steps - 1))  # a toy run of a few steps warms up less
    system = make_system(model, lr=lr, objective=objective, schedule=schedule, seed=seed)
    step = TrainStep(system, steps=steps)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.995), use_buffers=False)  # as StaleEMA
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    for i in range(steps):
        idx = torch.randint(len(video), (batch,), generator=g)
        losses.append(float(step((video[idx], labels[idx]))))
        ema.update_parameters(model)
        if (i + 1) % log_every == 0:
            print(
                f"  step {i + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
    return ema.module.eval(), time.time() - t0


# ------------------------------------------------------------------------------------------- scoring
def object_mask(frames: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 -> bool: pixels far from the simple style's background colour."""
    return np.linalg.norm(frames.astype(np.float32) - SIMPLE_BACKGROUND, axis=-1) > 60


def centroids(video: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> (T, 2) centroid (y, x) of the object per frame, NaN where there is none."""
    out = np.full((len(video), 2), np.nan)
    for i, m in enumerate(object_mask(video)):
        if m.sum() >= 2:
            yy, xx = np.nonzero(m)
            out[i] = yy.mean(), xx.mean()
    return out


def head_class(model, videos: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = flow.to_unit_range(videos)
    z = flow.sample_prior(x.shape, "uniform", generator=g)
    t = torch.full((len(x),), 0.9)
    with torch.no_grad():
        _, scores = model(flow.interpolate(z, x, t), t, torch.full((len(x),), model.config.num_classes))
    return predict(scores)


def score_continuation(model, real: torch.Tensor, labels: torch.Tensor, generated: torch.Tensor, k: int) -> dict:
    seam, track, cosine, colour, found = [], [], [], [], []
    for r, gen in zip(real.permute(0, 2, 3, 4, 1).numpy(), generated.permute(0, 2, 3, 4, 1).numpy()):
        cr, cg = centroids(r), centroids(gen)
        present = ~np.isnan(cg[k:, 0])
        found.append(present.mean())
        if not np.isnan(cg[k, 0]) and not np.isnan(cr[k, 0]):
            seam.append(np.linalg.norm(cg[k] - cr[k]))
        both = present & ~np.isnan(cr[k:, 0])
        if both.any():
            track.append(np.linalg.norm(cg[k:][both] - cr[k:][both], axis=1).mean())
        dg, dr = np.nanmean(np.diff(cg[k - 1 :], axis=0), axis=0), np.nanmean(np.diff(cr[k - 1 :], axis=0), axis=0)
        if np.all(np.isfinite(dg)) and np.linalg.norm(dg) > 1e-6 and np.linalg.norm(dr) > 1e-6:
            cosine.append(float(dg @ dr / np.linalg.norm(dg) / np.linalg.norm(dr)))
        given = r[:k][object_mask(r[:k])].astype(np.float32).mean(0)
        obj = gen[k:][object_mask(gen[k:])]
        if len(obj):
            colour.append(np.linalg.norm(obj.astype(np.float32).mean(0) - given))
    agree = (head_class(model, generated) == labels).float().mean().item()
    return {
        "seam_px": float(np.mean(seam)) if seam else None,
        "track_px": float(np.mean(track)) if track else None,
        "direction_cos": float(np.mean(cosine)) if cosine else None,
        "colour_rgb": float(np.mean(colour)) if colour else None,
        "found": float(np.mean(found)),
        "head_agrees": agree,
        "n": len(real),
    }


def colour_class(videos: torch.Tensor) -> np.ndarray:
    """The class whose colour is nearest to the generated object's mean colour (simple style: colour = class)."""
    out = []
    for v in videos.permute(0, 2, 3, 4, 1).numpy():
        obj = v[object_mask(v)]
        out.append(
            -1
            if len(obj) == 0
            else int(np.argmin(np.linalg.norm(COLOURS[:4] - obj.astype(np.float32).mean(0), axis=1)))
        )
    return np.asarray(out)


def save_sheet(rows: list[torch.Tensor], path: Path) -> None:
    arr = torch.cat(rows).permute(0, 2, 3, 4, 1).numpy()
    Image.fromarray(contact_sheet(arr, scale=4)).save(path)


def size_of(state: dict) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes


# ------------------------------------------------------------------------------------------- experiments
def continuation(args, out: Path) -> dict:
    data = clips(2048, seed=1)
    test_video, test_labels = clips(args.test_clips, seed=3)
    k = args.context_frames
    results, models = {}, {}
    for name, prob in (("context", args.context_prob), ("no_context", 0.0)):
        print(f"continuation: training {name} ({args.steps} steps)", flush=True)
        torch.manual_seed(0)
        model = build_model("tiny", frames=8, size=16, num_classes=4, prediction="data")
        objective = StaleObjective(context_frames=k, context_prob=prob)
        models[name], seconds = train(model, objective, data, args.steps, args.lr, seed=0)
        results[f"{name}_train_s"] = round(seconds, 1)
    null = torch.full((len(test_labels),), 4)
    given = test_video[:, :, :k].contiguous()
    rows = {"real": test_video}
    for name, model, ctx in (
        ("context", models["context"], given),
        ("no_context + given frames", models["no_context"], given),
        ("no_context, no frames", models["no_context"], None),
    ):
        videos = generate(model, null, steps=args.sample_steps, seed=11, context=ctx)
        # the context model's head judges every arm (the same judge for all rows)
        results[name] = score_continuation(models["context"], test_video, test_labels, videos, k)
        rows[name] = videos
        print(f"  {name}: {results[name]}", flush=True)
    real_scores = score_continuation(models["context"], test_video, test_labels, test_video, k)
    results["real clips (reference)"] = real_scores
    save_sheet([rows[n][:4] for n in rows], out / "continuation_sheet.png")
    return results


def lora_vs_full(args, out: Path) -> dict:
    base_data = clips(2048, seed=1, classes=(0, 1))
    new_data = clips(2048, seed=4, classes=(2, 3))
    val_video, val_labels = clips(args.test_clips, seed=5, classes=(2, 3))
    objective = StaleObjective()
    print(f"lora: training the base on classes 0, 1 ({args.base_steps} steps)", flush=True)
    torch.manual_seed(0)
    base, base_s = train(
        build_model("tiny", frames=8, size=16, num_classes=4, prediction="data"),
        objective,
        base_data,
        args.base_steps,
        args.lr,
        seed=0,
    )
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    results = {"base_train_s": round(base_s, 1)}

    def evaluate(model) -> dict:
        model = merged(model).eval() if any(".lora_" in n for n, _ in model.named_parameters()) else model.eval()
        with torch.no_grad():
            val = torch.stack(validation_losses(model, "uniform", val_video, val_labels, 0, (0.1, 0.3, 0.5, 0.7, 0.9)))
        videos = generate(model, val_labels[:16], steps=args.sample_steps, guidance=3.0, seed=11)
        return {
            "val_loss": round(float(val.mean()), 4),
            "colour_agrees": float((colour_class(videos) == val_labels[:16].numpy()).mean()),
            "head_agrees": float((head_class(model, val_video) == val_labels).float().mean()),
            "videos": videos,
        }

    arms = {
        "base (no fine-tuning)": None,
        "full": Finetune(name="full"),
        f"lora r={args.rank}": Finetune(name="lora", rank=args.rank, alpha=float(args.rank), train=["y_embed.*"]),
    }
    sheets = []
    for name, ft in arms.items():
        model = build_model("tiny", frames=8, size=16, num_classes=4, prediction="data")
        model.load_state_dict(base_state)
        row = {}
        if ft is not None:
            apply_finetune(model, ft)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            row["trainable_params"] = sum(p.numel() for p in trainable.values())
            row["checkpoint_bytes"] = size_of({n: p.detach() for n, p in trainable.items()})
            print(
                f"lora: fine-tuning '{name}' on classes 2, 3 ({args.ft_steps} steps, "
                f"{row['trainable_params']:,} trainable)",
                flush=True,
            )
            model, row["train_s"] = train(model, objective, new_data, args.ft_steps, args.lr, seed=1)
            row["train_s"] = round(row["train_s"], 1)
        scores = evaluate(model)
        sheets.append(scores.pop("videos")[:4])
        row.update(scores)
        results[name] = row
        print(f"  {name}: {row}", flush=True)
    save_sheet(sheets, out / "lora_sheet.png")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="training steps per continuation arm")
    ap.add_argument("--base-steps", type=int, default=800, help="steps of the base model on classes 0, 1")
    ap.add_argument("--ft-steps", type=int, default=300, help="fine-tuning steps per arm on classes 2, 3")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--context-frames", type=int, default=2)
    ap.add_argument("--context-prob", type=float, default=0.5)
    ap.add_argument("--test-clips", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--only", choices=["continuation", "lora"], default=None)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "finetune")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.only in (None, "continuation"):
        results["continuation"] = continuation(args, args.out)
    if args.only in (None, "lora"):
        results["lora"] = lora_vs_full(args, args.out)
    (args.out / f"results_{args.only or 'all'}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
