"""Measure prompt following of a text-conditioned checkpoint on the captioned synthetic data (docs/text.md).

    .venv/bin/python experiments/text_prompt_following.py --ckpt RUN/checkpoints/last.ckpt --out docs/text

Prompts: every (shape, colour, direction) combination of the 4 shapes, 4 colours and 4 directions: 56 seen in
training, 8 held out (stale.data.synthetic.held_out). Each prompt is sampled with --seeds seeds for each sampling
setting (classifier-free guidance w, classifier guidance from the joy head's caption-match score) and scored by
stale.eval.prompt_following; the same measures on real clips (train for seen, test for held-out combinations)
give their ceiling. Writes results.json, table.md and a contact sheet (held-out prompts, then seen ones).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stale.data.media import contact_sheet
from stale.data.reader import SkipCounter, expand_shards, read_shard
from stale.data.synthetic import CAPTION_COLOURS, DIRECTIONS, SyntheticSpec, caption, ensure_synthetic, held_out
from stale.data.synthetic_module import default_cache_root
from stale.data.video_io import ClipSpec, decode_clip
from stale.eval.prompt_following import ShapeReader, score
from stale.pipeline.sample_to_dir import load_pipeline


def real_clips(folder: Path, split: str):
    spec = ClipSpec(8, 16, start="first", crop="center")
    clips, labels, captions = [], [], []
    for url in expand_shards(str(folder / f"{split}-*.tar")):
        for s in read_shard(url, SkipCounter(split)):
            meta = json.loads(s["json"])
            clips.append(decode_clip(s["mp4"], spec, None, name=s["__key__"], format="mp4"))
            labels.append(meta["label"])
            captions.append(meta["caption"])
    return clips, labels, captions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--settings", default="3:0,1:0,3:2:1", help="w:classifier_guidance[:seeds] (seeds: --seeds)")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    folder = ensure_synthetic(default_cache_root(), SyntheticSpec(style="captioned"))
    t0 = time.time()
    train, train_labels, train_caps = real_clips(folder, "train")
    test, _, test_caps = real_clips(folder, "test")
    shapes = ShapeReader(4).fit(train[:1536], train_labels[:1536])
    results = {
        "checkpoint": args.ckpt,
        "label": args.label,
        "steps": args.steps,
        "seeds": args.seeds,
        "shape_reader_accuracy_real_train_holdout": shapes.accuracy(train[1536:], train_labels[1536:]),
        "real": {
            "seen (train clips)": score(train[1536:], train_caps[1536:], shapes)["rate"],
            "held-out (test clips)": score(test, test_caps, shapes)["rate"],
        },
        "settings": {},
    }
    combos = [(s, c, d) for s in range(4) for c in range(CAPTION_COLOURS) for d in range(len(DIRECTIONS))]
    prompts = {
        "held-out": [caption(*k) for k in combos if held_out(*k)],
        "seen": [caption(*k) for k in combos if not held_out(*k)],
    }
    pipe = load_pipeline(ckpt=args.ckpt, device="cpu")
    sheet = None
    for setting in args.settings.split(","):
        w, cg, *n = (float(v) for v in setting.split(":"))
        row = {}
        for group, ps in prompts.items():
            clips, asked = [], []
            for seed in range(int(n[0]) if n else args.seeds):
                v = pipe(
                    num_videos=len(ps), prompt=ps, steps=args.steps, guidance=w, classifier_guidance=cg, seed=seed
                )  # uint8 (B, C, T, H, W)
                clips += list(v.permute(0, 2, 3, 4, 1).numpy())
                asked += ps
                if sheet is None or (setting == args.settings.split(",")[0] and seed == 0 and group == "seen"):
                    sheet = (sheet or {}) | {group: v.permute(0, 2, 3, 4, 1).numpy()}
            row[group] = score(clips, asked, shapes)["rate"] | {"n": len(clips)}
        results["settings"][f"w={w:g}, classifier_guidance={cg:g}"] = row
        print(setting, json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    keys = ("shape", "colour", "direction", "all three")
    lines = ["| sampling | prompts | n | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for name, rate in results["real"].items():
        lines.append(
            f"| real clips (the measures' ceiling) | {name} | | " + " | ".join(f"{rate[k]:.2f}" for k in keys) + " |"
        )
    for setting, row in results["settings"].items():
        for group, rate in row.items():
            lines.append(f"| {setting} | {group} | {rate['n']} | " + " | ".join(f"{rate[k]:.2f}" for k in keys) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    first = np.concatenate([sheet["held-out"], sheet["seen"][:8]])
    Image.fromarray(contact_sheet(first, scale=4)).save(out / "contact_sheet.png")
    (out / "contact_sheet_prompts.txt").write_text("\n".join(prompts["held-out"] + prompts["seen"][:8]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
