"""Variable shapes (docs/buckets.md): stale-shards keeps aspect and length, buckets form by the documented rule,
the loader makes one-shape batches and resumes with partly filled buckets, DDP ranks take equal steps, the model
and sampler take any (T, H, W) the patch divides. All data is made here: PyAV encodes 16:9, 9:16 and square
clips of 12 to 60 frames, Pillow writes the still images."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from helpers import (
    BUCKET_RUN,
    MIXED_IMAGES,
    MIXED_VIDEOS,
    RecordBatches,
    captioned_manifest,
    compose_train,
    fit_steps,
    mixed_shape_folder,
    no_synthetic_keys,
    run_cli,
)
from stale.data.buckets import Assigner, Bucket, BucketError, fits, parse_buckets, share_keep
from stale.data.datamodule import VideoDataModule
from stale.data.shards import ShardsConfig, convert
from stale.diffusion import flow
from stale.diffusion.generate import generate
from stale.models.stale_transformer import Attention, StaleConfig, StaleTransformer

# (height, width, frames) of the videos and (height, width) of the images mixed_shape_folder writes, and the
# shapes stale-shards must keep at size=16 grid=4 (about 256 pixels, sides multiples of 4): worked out by hand,
# 160x90 -> scale sqrt(256 / 14400) = 0.133 -> 21.3 x 12 -> 20 x 12; 120x120 -> 16 x 16.
KEPT = {(90, 160): (12, 20), (160, 90): (20, 12), (120, 120): (16, 16)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed folder converted with stale-shards' aspect-keeping defaults at 16 px: {folder, summary}."""
    base = tmp_path_factory.mktemp("mixed-shapes")
    folder = mixed_shape_folder(base / "media", videos=MIXED_VIDEOS, images=MIXED_IMAGES)
    summary = convert(
        ShardsConfig(
            input=str(folder),
            out=str(base / "shards"),
            size=16,
            grid=4,
            maxcount=4,
            split={"train": 1.0},
            progress=False,
        )
    )
    return {"folder": folder, "summary": summary, "pattern": summary["splits"]["train"]["pattern"]}


def _metas(pattern: str) -> list[dict]:
    import webdataset as wds

    return [json.loads(s["json"]) for s in wds.WebDataset(pattern, shardshuffle=False)]


def test_shards_keep_aspect_length_and_take_images(mixed):
    metas = _metas(mixed["pattern"])
    assert len(metas) == len(MIXED_VIDEOS) + len(
        MIXED_IMAGES
    )  # every video is one clip (all <= max_frames=64), every image one
    for m in metas:
        w, h = (int(v) for v in Path(m["source"]).stem.split("_")[-1].split("x")[:2])
        assert (m["height"], m["width"]) == KEPT[(h, w)], m
        if "image" in m["source"]:
            assert m["frames"] == 1
        else:
            assert m["frames"] == int(Path(m["source"]).stem.split("x")[-1])  # the video's own length
            assert m["duration"] == pytest.approx(m["frames"] / m["fps"])
    assert {m["frames"] for m in metas} == {1, 12, 16, 20, 24, 36, 40, 60}


def test_square_mode_stays_available(tmp_path):
    folder = mixed_shape_folder(tmp_path / "m", videos=((90, 160, 12),), images=((160, 90),))
    s = convert(
        ShardsConfig(
            input=str(folder),
            out=str(tmp_path / "o"),
            resize="square",
            size=16,
            frames=8,
            split={"train": 1.0},
            progress=False,
        )
    )
    metas = _metas(s["splits"]["train"]["pattern"])
    assert sorted((m["frames"], m["height"], m["width"]) for m in metas) == [(1, 16, 16), (8, 16, 16)]


def test_fit_rule_as_documented():
    land, square = Bucket(8, 12, 20, 2), Bucket(8, 16, 16, 2)
    assert fits(land, 8, 12, 20) and not fits(square, 8, 12, 20)  # a 16:9 clip would lose 40% in a square
    assert fits(square, 8, 16, 16) and not fits(land, 8, 16, 16)  # a square scaled up 1.25x: not by default
    assert fits(land, 8, 48, 80) and fits(land, 8, 45, 80)  # scaled down; 45x80 -> 12x21.3, crops 6%
    assert not fits(land, 7, 12, 20)  # too few frames
    assert not fits(land, 12, 12, 20, stride=2) and fits(land, 15, 12, 20, stride=2)  # (8 - 1) x 2 + 1 = 15
    # largest bucket first; the smallest that fits always takes the clip
    a = Assigner([Bucket(1, 12, 20, 8), Bucket(4, 12, 20, 4), Bucket(8, 12, 20, 2)])
    assert a.assign(20, 12, 20, random.Random(0)) == 2 and a.assign(5, 12, 20, random.Random(0)) == 1
    assert a.assign(1, 12, 20, random.Random(0)) == 0  # an image: T = 1 buckets only
    assert a.assign(20, 16, 16, random.Random(0)) is None  # fits none
    # keep_prob 0.25 on the largest: about 3/4 of the clips fall to the next bucket
    b = Assigner([Bucket(4, 12, 20, 4), Bucket(8, 12, 20, 2, keep_prob=0.25)])
    rng = random.Random(1)
    kept = Counter(b.assign(20, 12, 20, rng) for _ in range(4000))
    assert 0.22 < kept[1] / 4000 < 0.28 and kept[0] + kept[1] == 4000


def test_bucket_lists_are_checked():
    assert len(parse_buckets("smoke")) == 9
    with pytest.raises(BucketError, match="not a preset"):
        parse_buckets("defualt")
    with pytest.raises(BucketError, match=r"not divisible by model.patch=\[1, 4, 4\]"):
        parse_buckets([[8, 14, 20, 2]], patch=(1, 4, 4))
    with pytest.raises(BucketError, match="keep_prob"):
        parse_buckets([[8, 12, 20, 2, 0.0]])
    with pytest.raises(BucketError, match="twice"):
        parse_buckets([[8, 12, 20, 2], [8, 12, 20, 4]])


def test_image_share_thins_the_kind_in_excess():
    p_img, p_vid = share_keep(images=300, videos=100, share=0.5)  # 75% images -> keep a third of them
    assert p_vid == 1.0 and 300 * p_img / (300 * p_img + 100) == pytest.approx(0.5)
    p_img, p_vid = share_keep(images=100, videos=300, share=0.5)
    assert p_img == 1.0 and 100 / (100 + 300 * p_vid) == pytest.approx(0.5)


def test_loader_batches_have_one_shape_and_count_buckets(mixed, caplog):
    dm = VideoDataModule(mixed["pattern"], buckets="smoke", num_workers=2, shuffle_buffer=8, epoch_batches=24)
    with caplog.at_level("WARNING"):
        loader = dm.train_dataloader()
    try:
        shapes = Counter(tuple(v.shape[2:]) for v, _ in loader)
    finally:
        loader.close()
    assert sum(shapes.values()) == 24
    smoke = {(b.frames, b.height, b.width): b.batch_size for b in parse_buckets("smoke")}
    assert set(shapes) <= set(smoke)
    assert {(h, w) for _, h, w in shapes} == {(12, 20), (20, 12), (16, 16)}  # every aspect trained
    assert {t for t, *_ in shapes} == {1, 8}  # images and videos in one run
    assert sum(dm.health.buckets.values()) == dm.health.clips["train"]
    # the 4-frame buckets are nobody's largest: reported at the start, not silently starved
    assert "no clip has 4x16x16, 4x12x20, 4x20x12 as its largest bucket" in caplog.text


def test_clips_that_fit_no_bucket_are_counted(mixed):
    dm = VideoDataModule(mixed["pattern"], buckets=[[8, 12, 20, 2]], num_workers=0, shuffle_buffer=4, epoch_batches=3)
    batches = list(dm.train_dataloader())
    assert all(v.shape[1:] == (3, 8, 12, 20) for v, _ in batches)
    assert dm.health.reasons["train"]["no_bucket"] > 0 and dm.health.skipped("train") == 0  # outside the rate


def test_resume_with_partly_filled_buckets_gives_the_same_losses(mixed, tmp_path):
    kw = dict(buckets="smoke", num_workers=2, shuffle_buffer=8, epoch_batches=6)
    full = RecordBatches()
    straight = fit_steps(
        tmp_path,
        9,
        [full, ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")],
        VideoDataModule(mixed["pattern"], **kw),
    )
    ckpt = tmp_path / "ckpt" / "step=4.ckpt"
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert any(state["round_pending"]), state  # clips were waiting in partly filled buckets
    resumed = RecordBatches()
    again = fit_steps(tmp_path, 9, [resumed], VideoDataModule(mixed["pattern"], **kw), ckpt=ckpt)
    assert sorted(resumed.seen) == [4, 5, 6, 7, 8]
    for step in resumed.seen:
        assert torch.equal(resumed.seen[step], full.seen[step]), step
        assert again.losses[step] == straight.losses[step]
    assert len({tuple(full.seen[s].shape) for s in full.seen}) > 1  # it did mix shapes


def test_changed_bucket_list_on_resume_is_stated(mixed, tmp_path, caplog):
    kw = dict(num_workers=0, shuffle_buffer=8, epoch_batches=6)
    fit_steps(
        tmp_path,
        3,
        [ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, filename="last")],
        VideoDataModule(mixed["pattern"], buckets="smoke", **kw),
    )
    dm = VideoDataModule(mixed["pattern"], buckets=[[8, 12, 20, 2], [8, 20, 12, 2], [8, 16, 16, 2]], **kw)
    with caplog.at_level("WARNING"):
        fit_steps(tmp_path, 5, [], dm, ckpt=tmp_path / "ckpt" / "last.ckpt")
    assert "The bucket list or its rule changed" in caplog.text and "start of the next epoch" in caplog.text


def test_single_token_attention_is_the_value_path():
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=True)
    x = torch.randn(6, 1, 32)
    fast = attn(x)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    assert torch.allclose(fast, attn.proj(v), atol=1e-6)  # softmax over one key is 1: the output is the value
    fast.sum().backward()  # every parameter gets a gradient (DDP needs one on every rank)
    assert all(p.grad is not None for p in attn.parameters())


def test_model_and_sampler_take_any_shape_the_patch_divides():
    model = StaleTransformer(StaleConfig(dim=32, depth=2, heads=2, frames=4, size=8, num_classes=2))
    for t, h, w in ((1, 12, 20), (4, 20, 12), (3, 8, 8)):
        v, _ = model(torch.zeros(2, 3, t, h, w), torch.rand(2), torch.zeros(2, dtype=torch.long))
        assert v.shape == (2, 3, t, h, w)
    videos = generate(model, torch.tensor([0, 1]), steps=2, frames=4, height=20, width=12)
    assert videos.shape == (2, 3, 4, 20, 12) and videos.dtype == torch.uint8
    with pytest.raises(ValueError, match="not divisible by its patch"):
        generate(model, torch.tensor([0]), steps=1, height=18, width=12)


def test_time_shift_follows_the_token_count():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert flow.token_shift(4096, None) == 1.0
    assert flow.token_shift(4 * 1024, 1024) == pytest.approx(2.0)  # sqrt(4)
    # SD3: sigma' = s sigma / (1 + (s - 1) sigma) with sigma = 1 - t; at s = 3, sigma 0.5 -> 0.75, t' = 0.25
    assert torch.allclose(flow.shift_time(t, 3.0), torch.tensor([0.0, 0.25, 1.0]))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_with_unevenly_filled_buckets_takes_equal_steps(mixed, tmp_path):
    """Each rank draws its own stream, so its buckets fill in another order; both must take every step."""
    run = tmp_path / "run"
    proc = run_cli(
        "stale-train",
        "debug=smoke",
        "trainer=ddp_cpu",
        "data=shards",
        f"data.shards='{mixed['pattern']}'",
        "data.num_classes=2",
        "data.buckets=smoke",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        *BUCKET_RUN,
        *no_synthetic_keys(),
        f"hydra.run.dir={run}",
        "+callbacks.steps._target_=test_buckets.RankSteps",
        f"+callbacks.steps.folder={tmp_path}",
        env={"PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"},
        timeout=400,
    )
    assert "stale-train finished" in proc.stdout
    steps = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert steps[0]["steps"] == steps[1]["steps"] == 6
    assert steps[0]["shapes"] != steps[1]["shapes"]  # the ranks' buckets really filled differently


class RankSteps(Callback):
    """Each rank writes its optimiser steps and the batch shapes it trained on."""

    def __init__(self, folder: str):
        self.folder, self.shapes = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(list(batch[0].shape))

    def on_train_end(self, trainer, pl_module):
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"steps": trainer.global_step, "shapes": self.shapes})
        )


@pytest.mark.slow
def test_acceptance_shards_train_every_shape_sample_portrait(tmp_path):
    """stale-shards over a manifest of landscape, portrait and square videos of 12-60 frames and still images ->
    stale-train with buckets logs clips per bucket for every shape -> stale-sample writes a portrait video."""
    folder = mixed_shape_folder(tmp_path / "media", videos=MIXED_VIDEOS, images=MIXED_IMAGES)
    manifest = tmp_path / "manifest.csv"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in files))
    out = tmp_path / "shards"
    run_cli(
        "stale-shards",
        f"input={manifest}",
        f"out={out}",
        "size=16",
        "grid=4",
        "split.train=1.0",
        "split.val=0",
        "split.test=0",
        timeout=300,
    )
    assert {(m["height"], m["width"]) for m in _metas(str(out / "train-000000.tar"))} == set(KEPT.values())
    run = tmp_path / "run"
    run_cli(
        "stale-train",
        "debug=smoke",
        "data=shards",
        f"data.shards='{out / 'train-000000.tar'}'",
        "data.num_classes=2",
        "data.buckets=smoke",
        "trainer.max_steps=10",
        "trainer.limit_val_batches=0",
        *BUCKET_RUN,
        *no_synthetic_keys(),
        f"hydra.run.dir={run}",
        env={"OMP_NUM_THREADS": "1"},
        timeout=400,
    )
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    last = {k: float(v) for r in rows for k, v in r.items() if k.startswith("data/bucket_") and v}
    got = {k.removeprefix("data/bucket_") for k, v in last.items() if v > 0}
    assert {n.split("x", 1)[1] for n in got} == {"16x16", "12x20", "20x12"}  # every shape trained
    assert {n.split("x", 1)[0] for n in got} == {"1", "8"}  # images and videos
    ckpt = run / "checkpoints" / "last.ckpt"
    run_cli(
        "stale-sample",
        f"ckpt={ckpt}",
        f"out={tmp_path / 's'}",
        "height=20",
        "width=12",
        "frames=8",
        "num_videos=2",
        "steps=2",
        "progress=false",
        timeout=300,
    )
    import av

    with av.open(str(tmp_path / "s" / "sample_000.mp4")) as c:
        s = c.streams.video[0]
        assert (s.height, s.width) == (20, 12)  # portrait


@pytest.mark.parametrize("h,w", [(12, 20), (20, 12), (48, 80), (12, 24)])
def test_unscaled_decode_of_odd_widths_equals_rgb24(h, w):
    """FFmpeg's planar gbrp output left columns past 16 unwritten at widths 20, 24, 40, 56: landscape buckets
    decoded garbage that changed from run to run until _rgb_planes took packed rgb24 there."""
    import io

    import av
    import numpy as np

    from stale.data.video_io import ClipSpec, decode_clip, encode_mp4

    clip = np.random.default_rng(0).integers(0, 255, (3, h, w, 3), dtype=np.uint8)
    data = encode_mp4(clip)
    with av.open(io.BytesIO(data)) as c:
        ref = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # (T, H, W, 3)
    spec = ClipSpec(frames=3, size=None, height=h, width=w, start="first", crop="center")
    out = np.zeros((3, 3, h, w), np.uint8)
    decode_clip(data, spec, random.Random(0), out=out)
    assert np.array_equal(out, ref.transpose(3, 0, 1, 2))


def test_bench_section_measures_buckets_against_padding():
    from stale.bench.buckets import run

    out = run(
        mix=[[1, 8, 8, 4, 1], [4, 8, 12, 2, 1], [4, 12, 8, 2, 1]], rounds=1, loader=False, image_size=8, image_batch=2
    )
    assert out["image_step"]["sdpa_over_one_token"] > 0
    rows = {r["variant"]: r for r in out["rows"] if "T=1" not in r["variant"]}
    assert set(rows) == {"buckets", "pad_to_largest", "crop_to_common"}
    # useful tokens in patches of 1 x 4 x 4 (the tiny model's): 4 clips x 1 x (2 x 2) + 2 x 2 clips x 4 x (2 x 3) = 112
    assert rows["buckets"]["useful_tokens"] == rows["pad_to_largest"]["useful_tokens"] == 112
    assert out["train"]["largest_shape"] == [4, 12, 12] and out["train"]["common_shape"] == [1, 8, 8]
    assert rows["crop_to_common"]["content_kept"] < 1 and out["train"]["buckets_over_padding"] > 0


def test_check_config_names_a_bucket_the_patch_does_not_divide():
    from stale.train import ConfigError, check_config

    cfg = compose_train("data=shards", "data.shards=x", "data.buckets=[[8,14,20,2]]")
    ok = compose_train("data=shards", "data.shards=x", "data.buckets=smoke", "model.pos_base=4")
    with pytest.raises(ConfigError, match=r"data.buckets\[0\]: the bucket 8x14x20 is not divisible by model.patch"):
        check_config(cfg)
    check_config(ok)


def test_image_share_zero_and_one_in_the_loader(mixed):
    """image_share=0: no image batch at all; 1: only image batches (the scan found both kinds)."""
    for share, frames in ((0.0, {8}), (1.0, {1})):
        dm = VideoDataModule(
            mixed["pattern"], buckets="smoke", num_workers=0, shuffle_buffer=8, epoch_batches=6, image_share=share
        )
        assert {v.shape[2] for v, _ in dm.train_dataloader()} == frames
    assert mixed["summary"]["command"].endswith("data.buckets=smoke")  # the preset made for size=16 grid=4


def test_each_batch_counts_the_flops_of_its_own_shape(tmp_path):
    """Buckets give batches of different shapes: the FLOPs that the compute budget and ThroughputMonitor count for
    a batch (StaleSystem.flops_per_batch) are those of its shape, within 5% of what FlopCounterMode counts in the
    real training step, hinge branch included (math SDPA, which the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from stale.train import build_system

    cfg = compose_train(
        "debug=smoke",
        "model.dim=64",
        "model.depth=2",
        "model.heads=4",
        "data.frames=4",
        "data.size=8",
        f"paths.output_dir={tmp_path}",
    )
    system = build_system(cfg)  # with its clip_flops, as stale-train builds it
    counted = {}
    for shape in [(4, 8, 8), (2, 8, 16), (1, 16, 8)]:  # square, landscape, a portrait image
        video = torch.randint(0, 256, (4, 3, *shape), dtype=torch.uint8)
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            system.training_step((video, torch.tensor([0, 1, 2, 0])), 0).backward()
        assert abs(system.flops_per_batch / counter.get_total_flops() - 1) < 0.05, (
            shape,
            system.flops_per_batch,
            counter.get_total_flops(),
        )
        counted[shape] = system.flops_per_batch
    assert len(set(counted.values())) == 3


# --- latents of every shape: buckets through a pretrained autoencoder, encoded on the fly -------------------------
# Pixel buckets of stale-shards' 64 px shapes with 1 + 4k frames, as a causal video autoencoder takes them; through
# the tiny Wan autoencoder (8x space, 4x time) they are the latent clips (T', H', W') beside them, worked out by hand.
LATENT_BUCKETS = {"1x64x64": (1, 8, 8), "9x48x80": (3, 6, 10), "9x80x48": (3, 10, 6), "9x64x64": (3, 8, 8)}


def _latent_cfg(tmp_path, shards: str, vae, buckets, *extra: str):
    drop = no_synthetic_keys()
    return compose_train(
        "debug=smoke",
        "data=shards",
        f"data.shards='{shards}'",
        "data.num_classes=2",
        "data.frames=9",
        "data.size=64",
        "vae=diffusers",
        f"vae.pretrained={vae}",
        f"data.buckets={buckets}",
        "model.patch=[1,2,2]",
        f"paths.output_dir={tmp_path}",
        "threads=1",
        *BUCKET_RUN,
        *drop,
        *extra,
    )


def test_latent_training_with_buckets_encodes_every_shape(tmp_path, tmp_path_factory):
    """vae=diffusers with data.buckets: every bucket is checked against the autoencoder's shape rules and the
    latent patch before training (naming the bucket), then each batch is encoded at its own shape and trained:
    every bucket's clips reach the model, and the final samples decode to pixels."""
    from helpers import mixed_shards_64, tiny_vae
    from stale.train import ConfigError, check_config, train

    vae = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    shards = mixed_shards_64(tmp_path)
    # the default preset's 8-frame buckets are not 1 + 4k frames: the error names the bucket and the nearest counts
    with pytest.raises(
        ConfigError,
        match=r"data.buckets\[3\] frames=8: .*1 \+ 4k frames.*nearest valid: "
        r"data.buckets\[3\] frames=5 or 9 \(the bucket 8x64x64\)",
    ):
        check_config(_latent_cfg(tmp_path / "a", shards, vae, "default"))
    # 9 x 48 x 80 pixels is the latent 3 x 6 x 10, which a 4 x 4 patch does not divide
    with pytest.raises(
        ConfigError,
        match=r"data.buckets\[0\]: the bucket 9x48x80 is the latent clip 3x6x10 .*"
        r"model.patch=\[1, 4, 4\] does not divide",
    ):
        check_config(_latent_cfg(tmp_path / "b", shards, vae, "[[9,48,80,2]]", "model.patch=[1,4,4]"))
    buckets = "[" + ",".join(f"[{n.replace('x', ',')},2]" for n in LATENT_BUCKETS) + "]"
    metrics = train(
        _latent_cfg(
            tmp_path / "run",
            shards,
            vae,
            buckets,
            "trainer.max_steps=8",
            "trainer.limit_val_batches=0",
            "data.image_share=0.5",
        )
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    delivered = {
        k.removeprefix("data/bucket_"): float(v)
        for r in rows
        for k, v in r.items()
        if k.startswith("data/bucket_") and v
    }  # the last row: clips each bucket delivered in the run
    assert set(delivered) == set(LATENT_BUCKETS) and min(delivered.values()) > 0, delivered  # every shape trained
    import av

    with av.open(str(tmp_path / "run" / "samples" / "sample_000.mp4")) as c:  # decoded by the autoencoder
        s = c.streams.video[0]
        assert (s.frames, s.height, s.width) == (9, 64, 64)


def test_captions_ride_with_bucketed_batches(tmp_path):
    """model.cond=text with data.buckets: each one-shape batch carries its clips' captions (the bucketed loader
    dropped them, and text training stopped at its first step with 'the batch has no captions')."""
    out = convert(
        ShardsConfig(
            input=str(captioned_manifest(tmp_path)),
            out=str(tmp_path / "shards"),
            size=16,
            grid=4,
            maxcount=8,
            split={"train": 1.0},
            progress=False,
        )
    )["splits"]["train"]["pattern"]
    dm = VideoDataModule(
        out, frames=8, size=16, num_classes=2, buckets="smoke", num_workers=0, captions=True, bucket_batch_max=2
    )
    import webdataset as wds

    by_key = {s["__key__"]: s["txt"].decode() for s in wds.WebDataset(out, shardshuffle=False)}
    seen = 0
    for video, label, meta in dm.train_dataloader().iter_meta():
        assert meta["text"] is not None and len(meta["text"]) == video.shape[0] == len(meta["keys"])
        assert meta["text"] == [by_key[k] for k in meta["keys"]]  # each clip with its own caption
        seen += 1
        if seen == 6:
            break
    assert seen == 6
    run_cli(
        "stale-train",
        "debug=smoke",
        "data=shards",
        f"data.shards='{out}'",
        "data.num_classes=2",
        "data.buckets=smoke",
        "model.cond=text",
        "text_encoder=learned",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
        *BUCKET_RUN,
        *no_synthetic_keys(),
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"OMP_NUM_THREADS": "1"},
        timeout=400,
    )
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    assert any(r.get("train/hinge_acc") for r in rows)  # the caption-match head trained on the batches' captions
