"""A stale-encode cache of clips of many shapes (stale-encode buckets=...) and latent training from it in batches of
one shape per bucket (docs/latent.md, docs/buckets.md). Real mp4 shards (stale-shards over real H.264 videos and
images) and a real tiny diffusers autoencoder saved with save_pretrained and loaded by path; nothing is mocked.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from helpers import (
    BUCKET_RUN,
    MeanPixel,
    RecordBatches,
    captioned_manifest,
    fit_steps,
    mixed_shards_64,
    no_synthetic_keys,
    tiny_vae,
)
from stale.data.buckets import BucketError
from stale.data.reader import SkipCounter, decode_sample, expand_shards, read_shard
from stale.data.shards import ShardsConfig, convert
from stale.data.video_io import ClipSpec
from stale.latent.autoencoder import AutoencoderError
from stale.latent.cache import CacheError, encode_shards
from stale.train import ConfigError, build_system, check_config, train

# Pixel buckets of stale-shards' 64 px shapes with 1 + 4k frames; through the tiny Wan autoencoder (8x space, 4x
# time, 4 channels: moments of 8) the latent clips (T', H', W') beside them, worked out by hand. The image bucket
# takes batches of 1: it gets one clip (the square image), so that a few steps fill every bucket.
BUCKETS = [[1, 64, 64, 1], [9, 48, 80, 2], [9, 80, 48, 2], [9, 64, 64, 2]]
GRIDS = {"1x64x64": (1, 8, 8), "9x48x80": (3, 6, 10), "9x80x48": (3, 10, 6), "9x64x64": (3, 8, 8)}
# The largest bucket each clip fits, by hand: at size=64 grid=16 stale-shards keeps 160x90 as 80x48, 90x160 as
# 48x80 and 120x120 as 64x64. The six videos (12-60 frames) fit their aspect's 9-frame bucket; of the images only
# the square one fits a bucket (the 1x64x64 one: the others would be upscaled), the two others fit none.
CLIPS = {"1x64x64": 1, "9x48x80": 2, "9x80x48": 2, "9x64x64": 2}
# info.json's keys without buckets, as they were before buckets existed (a cache without buckets must not change)
PLAIN_KEYS = {
    "format",
    "format_version",
    "vae",
    "frames",
    "size",
    "fps",
    "frame_stride",
    "latent_dtype",
    "label_key",
    "latent_shape",
    "members",
    "clips",
    "skipped",
    "shards",
    "inputs_done",
    "stats",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """mp4 shards of the mixed shapes (3 shards of <= 4 clips), the tiny Wan autoencoder and a bucketed cache."""
    base = tmp_path_factory.mktemp("latent-buckets")
    shards = mixed_shards_64(base)
    vae = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    result = encode_shards(
        shards,
        base / "cache",
        {"pretrained": str(vae)},
        frames=9,
        size=64,
        batch_size=3,
        buckets=BUCKETS,
        progress=False,
    )
    return {"shards": shards, "vae": vae, "cache": base / "cache", "info": result["info"]}


def _samples(folder: Path) -> list[dict]:
    return [s for url in sorted(folder.glob("*.tar")) for s in read_shard(str(url), SkipCounter("t"))]


def _cfg(out: Path, data: dict, *extra: str, source: tuple | None = None):
    """stale-train's config on the cache (source: other data overrides, e.g. the mp4 shards)."""
    from hydra import compose, initialize_config_module

    source = source or ("data=latents", f"data.shards=[{data['cache']}]")
    drop = no_synthetic_keys()  # composes a config itself: not inside the block below
    with initialize_config_module("stale.conf", version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "debug=smoke",
                *source,
                "data.num_classes=2",
                "vae=diffusers",
                f"vae.pretrained={data['vae']}",
                "model.patch=[1,2,2]",
                f"paths.output_dir={out}",
                "threads=1",
                *BUCKET_RUN,
                *drop,
                *extra,
            ],
        )


# --- stale-encode buckets=... --------------------------------------------------------------------------------------
def test_each_clip_is_stored_at_its_largest_buckets_latent_shape(data):
    info = data["info"]
    assert info["buckets"] == [[*b, 1.0] for b in BUCKETS]
    assert {n: b["latent_shape"] for n, b in info["per_bucket"].items()} == {n: [4, *g] for n, g in GRIDS.items()}
    assert {n: b["clips"] for n, b in info["per_bucket"].items()} == CLIPS
    assert info["clips"] == sum(CLIPS.values()) and info["skipped"] == {"no_bucket": 2}
    assert info["latent_shape"] == [4, 3, 8, 8]  # the square clip given as frames x size x size: the model's own
    samples = _samples(data["cache"])
    stored = Counter()
    for s in samples:
        meta, moments = json.loads(s["json"]), np.load(io.BytesIO(s["latent.npy"]))
        assert moments.shape == (8, *GRIDS[meta["bucket"]]) and meta["latent_shape"] == list(moments.shape), meta
        frames, height, width = (int(v) for v in meta["bucket"].split("x"))
        assert meta["clip"] == {"frames": frames, "height": height, "width": width}
        stored[meta["bucket"]] += 1
    assert stored == CLIPS


def test_a_bucket_the_autoencoder_cannot_take_fails_before_reading(data, tmp_path):
    # the input does not exist: reading it would fail differently, so the bucket check came first
    with pytest.raises(
        AutoencoderError,
        match=r"buckets\[1\] frames=8: .*1 \+ 4k frames.*nearest valid: "
        r"buckets\[1\] frames=5 or 9",
    ):
        encode_shards(
            str(tmp_path / "missing-000000.tar"),
            tmp_path / "out",
            {"pretrained": str(data["vae"])},
            frames=9,
            size=64,
            buckets=[[9, 64, 64, 2], [8, 64, 64, 2]],
            progress=False,
        )
    with pytest.raises(AutoencoderError, match=r"buckets\[0\] width=36: .*multiple of 8"):
        encode_shards(
            str(tmp_path / "missing-000000.tar"),
            tmp_path / "out",
            {"pretrained": str(data["vae"])},
            frames=9,
            size=64,
            buckets=[[9, 64, 36, 2]],
            progress=False,
        )
    # a bad list stops before the autoencoder loads (there is none at this path)
    with pytest.raises(BucketError, match=r"buckets='tall' is not a preset"):
        encode_shards(
            data["shards"],
            tmp_path / "out",
            {"pretrained": str(tmp_path / "no-vae")},
            frames=9,
            size=64,
            buckets="tall",
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_a_killed_bucketed_encode_resumes_and_other_buckets_are_refused(data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(data["cache"], cache)
    # a kill after two of the three input shards: the last one's outputs and progress line are gone
    lines = (cache / "progress.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for name in json.loads(lines[-1])["outputs"]:
        (cache / name).unlink()
    (cache / "progress.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    kw = dict(vae={"pretrained": str(data["vae"])}, frames=9, size=64, batch_size=3, progress=False)
    info = encode_shards(data["shards"], cache, buckets=BUCKETS, **kw)["info"]
    assert info["per_bucket"] == data["info"]["per_bucket"] and info["skipped"] == data["info"]["skipped"]
    assert sorted(f.name for f in cache.glob("*.tar")) == sorted(f.name for f in data["cache"].glob("*.tar"))
    with pytest.raises(CacheError, match=r"other settings \(buckets\)"):
        encode_shards(data["shards"], cache, buckets=BUCKETS[1:], **kw)
    with pytest.raises(CacheError, match=r"other settings \(buckets\)"):
        encode_shards(data["shards"], cache, **kw)  # no buckets on a bucketed cache


def test_keep_prob_does_not_apply_to_a_cache(data, tmp_path):
    # the square videos fit both buckets: a training draw would keep few in the 9-frame one; the cache keeps all
    info = encode_shards(
        data["shards"],
        tmp_path / "c",
        {"pretrained": str(data["vae"])},
        frames=9,
        size=64,
        buckets=[[9, 64, 64, 2, 0.01], [1, 64, 64, 1]],
        progress=False,
    )["info"]
    assert {n: b["clips"] for n, b in info["per_bucket"].items()} == {"9x64x64": 2, "1x64x64": 1}


def test_without_buckets_the_cache_is_as_before(data, tmp_path):
    plain = tmp_path / "plain"
    info = encode_shards(data["shards"], plain, {"pretrained": str(data["vae"])}, frames=9, size=64, progress=False)[
        "info"
    ]
    assert set(info) == PLAIN_KEYS and info["latent_shape"] == [4, 3, 8, 8]
    assert info["clips"] == 6 and info["skipped"] == {"too_short": 3}  # the videos at 9 x 64 x 64; images are short
    assert all(set(json.loads(s["json"])) == {"label", "source", "clip", "latent_shape"} for s in _samples(plain))
    with pytest.raises(CacheError, match=r"other settings \(bucket_max_crop, bucket_max_upscale, buckets\)"):
        encode_shards(
            data["shards"], plain, {"pretrained": str(data["vae"])}, frames=9, size=64, buckets=BUCKETS, progress=False
        )
    # and training asked for buckets on it is refused, naming the cache's one shape
    with pytest.raises(ConfigError, match=r"data.buckets=.*holds clips of one shape \(9 x 64 x 64 pixels\)"):
        check_config(_cfg(tmp_path / "run", {**data, "cache": plain}, "data.buckets=[[9,64,64,2]]"))


# --- stale-train data=latents on a bucketed cache -----------------------------------------------------------------
class Shapes(Callback):
    def __init__(self):
        self.shapes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append((batch[0].dtype, tuple(batch[0].shape)))


def test_training_on_the_cache_delivers_every_bucket(data, tmp_path):
    seen = Shapes()
    metrics = train(_cfg(tmp_path, data, "trainer.max_steps=8", "trainer.limit_val_batches=0"), callbacks=[seen])
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    moments = {(8, *g) for g in GRIDS.values()}
    assert all(dtype == torch.float32 and shape[1:] in moments for dtype, shape in seen.shapes), seen.shapes
    assert len({shape[1:] for _, shape in seen.shapes}) > 1
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    delivered = {
        k.removeprefix("data/bucket_"): float(v)
        for r in rows
        for k, v in r.items()
        if k.startswith("data/bucket_") and v
    }  # the last row: clips each bucket delivered in the run
    assert set(delivered) == set(GRIDS) and min(delivered.values()) > 0, delivered
    import av

    with av.open(str(tmp_path / "samples" / "sample_000.mp4")) as c:  # the final samples: the cache's frames x size
        s = c.streams.video[0]
        assert (s.frames, s.height, s.width) == (9, 64, 64)


def test_cached_and_freshly_encoded_bucket_give_the_same_loss(data, tmp_path):
    """Two 9 x 48 x 80 clips trained from the cache and encoded on the fly (the pixel bucketed loader's clip: centre
    start and crop at the bucket's shape, as validation cuts it) give the same loss at step 0."""
    cached = {
        json.loads(s["json"])["source"]: (np.load(io.BytesIO(s["latent.npy"])), json.loads(s["json"])["label"])
        for s in _samples(data["cache"])
        if json.loads(s["json"])["bucket"] == "9x48x80"
    }
    spec = ClipSpec(9, None, start="center", crop="center", height=48, width=80)
    sources = {
        f"{s['__url__']}:{s['__key__']}": s
        for url in expand_shards(data["shards"])
        for s in read_shard(url, SkipCounter("t"))
    }
    keys = sorted(cached)
    assert len(keys) == 2
    pixels = {k: decode_sample(sources[k], spec, random.Random(0))[0] for k in keys}
    video = torch.from_numpy(np.stack([pixels[k] for k in keys])).permute(0, 4, 1, 2, 3).contiguous()
    moments = torch.from_numpy(np.stack([cached[k][0] for k in keys]))
    label = torch.tensor([cached[k][1] for k in keys])
    losses = {}
    for name, source, batch in (
        (
            "pixels",
            (
                "data=shards",
                f"data.shards='{data['shards']}'",
                "data.frames=9",
                "data.size=64",
                "data.buckets=[[9,48,80,2]]",
            ),
            video,
        ),
        ("cache", None, moments),
    ):
        cfg = _cfg(tmp_path / name, data, source=source)
        run = check_config(cfg)
        torch.manual_seed(0)  # the same initial weights
        system = build_system(run)
        losses[name] = float(system.training_step((batch, label), 0))
    assert losses["pixels"] == pytest.approx(losses["cache"], rel=1e-5, abs=1e-6)


def test_data_buckets_must_repeat_the_caches(data, tmp_path):
    cfg = _cfg(tmp_path, data, "data.buckets=[[9,64,64,2]]")
    with pytest.raises(
        ConfigError,
        match=r"data.buckets=\[\[9, 64, 64, 2\]\] differs from the buckets the cache "
        r".*cache/info.json was encoded with: \[\[1, 64, 64, 1, 1.0\], ",
    ):
        check_config(cfg)
    same = _cfg(tmp_path, data, "data.buckets=" + json.dumps(BUCKETS).replace(" ", ""))
    check_config(same)  # the same list, written out: accepted
    check_config(_cfg(tmp_path, data, "data.image_share=0.5"))  # thins by the one-frame buckets (next test)
    # the cache's buckets go through the latent patch check, naming the bucket: 6 x 10 is not divisible by 4
    with pytest.raises(ConfigError, match=r"data.buckets\[1\]: the bucket 9x48x80 is the latent clip 3x6x10"):
        check_config(_cfg(tmp_path, data, "model.patch=[1,4,4]"))


def test_resume_on_the_cache_with_partly_filled_buckets_gives_the_same_batches(data, tmp_path):
    from stale.data.datamodule import LatentDataModule

    kw = dict(num_workers=1, shuffle_buffer=8, epoch_batches=6, num_classes=2)
    full = RecordBatches()
    straight = fit_steps(
        tmp_path,
        9,
        [full, ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")],
        LatentDataModule([str(data["cache"])], **kw),
        module=MeanPixel(),
    )

    def loader_state(step):
        return torch.load(tmp_path / "ckpt" / f"step={step}.ckpt", weights_only=False)["loops"]["fit_loop"][
            "state_dict"
        ]["combined_loader"][0]

    # the first checkpoint taken while clips were waiting in partly filled buckets
    step = next(s for s in range(1, 8) if any(loader_state(s)["round_pending"]))
    assert loader_state(step)["config"]["bucket_rule"] == ["cache", [1.0, 1.0]]  # no image_share thinning
    resumed = RecordBatches()
    again = fit_steps(
        tmp_path,
        9,
        [resumed],
        LatentDataModule([str(data["cache"])], **kw),
        ckpt=tmp_path / "ckpt" / f"step={step}.ckpt",
        module=MeanPixel(),
    )
    assert sorted(resumed.seen) == list(range(step, 9))
    for step in resumed.seen:
        assert torch.equal(resumed.seen[step], full.seen[step]), step
        assert again.losses[step] == straight.losses[step]
    assert {tuple(v.shape[1:]) for v in full.seen.values()} == {(8, *g) for g in GRIDS.values()}


def test_latent_loader_batches_are_the_cached_moments_of_one_bucket_capped_by_bucket_batch_max(data):
    from stale.data.datamodule import LatentDataModule

    stored = {}  # bucket -> the cached moments of its clips
    for s in _samples(data["cache"]):
        stored.setdefault(json.loads(s["json"])["bucket"], []).append(np.load(io.BytesIO(s["latent.npy"])))
    dm = LatentDataModule(
        [str(data["cache"])], num_classes=2, num_workers=0, shuffle_buffer=4, epoch_batches=12, bucket_batch_max=1
    )
    assert [b.batch_size for b in dm.buckets] == [1, 1, 1, 1]
    batches = list(dm.train_dataloader())
    assert len(batches) == 12
    for moments, _ in batches:
        assert moments.dtype == torch.float32 and moments.shape[0] == 1
        name = next(n for n, g in GRIDS.items() if moments.shape[1:] == (8, *g))
        assert any(np.array_equal(moments[0].numpy(), m) for m in stored[name]), name
    assert dm.health.buckets and set(dm.health.buckets) <= set(GRIDS)


def test_a_sample_that_does_not_match_its_bucket_is_a_counted_bad_latent(data, tmp_path, caplog):
    import webdataset as wds

    from stale.data.datamodule import LatentDataModule

    cache = tmp_path / "cache"
    shutil.copytree(data["cache"], cache)
    good = np.zeros((8, 3, 8, 8), np.float32)  # the moments of a 9x64x64 clip
    with wds.TarWriter(str(cache / "bad-000.tar")) as w:  # one bucket the cache does not list, one of another shape
        w.write({"__key__": "unknown", "latent.npy": good, "json": {"label": 0, "bucket": "5x64x64"}})
        w.write({"__key__": "reshaped", "latent.npy": good[:, :1], "json": {"label": 0, "bucket": "9x64x64"}})
    dm = LatentDataModule([str(cache)], num_classes=2, num_workers=0, shuffle_buffer=0, epoch_batches=40)
    with caplog.at_level("WARNING"):
        assert all(v.shape[1:] in {(8, *g) for g in GRIDS.values()} for v, _ in dm.train_dataloader())
    assert dm.health.reasons["train"]["bad_latent"] >= 2, dm.health.reasons
    assert "unknown: .json names the bucket '5x64x64', not one of the cache's" in caplog.text
    assert "reshaped: .latent.npy has shape [8, 1, 8, 8]" in caplog.text


def test_one_cache_holds_latents_of_every_shape_and_their_captions(tmp_path, tmp_path_factory):
    """stale-encode with buckets and text_encoder=hf: each bucket's batches carry the cached caption embeddings of
    exactly their clips (the text-to-video setup of Open-Sora: latents and captions encoded once, clips of many
    shapes), and a text model trains on them without running the text encoder."""
    from helpers import tiny_text_encoder
    from stale.latent.cache import TEXT_MEMBERS
    from stale.text.encoders import load_text_encoder

    shards = convert(
        ShardsConfig(
            input=str(captioned_manifest(tmp_path)),
            out=str(tmp_path / "shards"),
            size=64,
            grid=16,
            maxcount=4,
            split={"train": 1.0},
            progress=False,
        )
    )["splits"]["train"]["pattern"]
    vae, t5 = tiny_vae(tmp_path_factory, "AutoencoderKLWan"), tiny_text_encoder(tmp_path_factory, "t5")
    node = {"name": "hf", "pretrained": str(t5), "max_length": 16}
    info = encode_shards(
        shards,
        tmp_path / "cache",
        {"pretrained": str(vae)},
        frames=9,
        size=64,
        batch_size=3,
        buckets=BUCKETS,
        progress=False,
        text_encoder=node,
    )["info"]
    assert {n: b["clips"] for n, b in info["per_bucket"].items()} == CLIPS and info["text_encoder"]["sha256"]
    cached = {s["__key__"]: np.load(io.BytesIO(s[TEXT_MEMBERS[0]])) for s in _samples(tmp_path / "cache")}
    enc = load_text_encoder(node)
    caption = {s["__key__"]: s["txt"].decode() for s in _samples(tmp_path / "cache")}
    key = sorted(caption)[0]  # the cache's embedding is the encoder's of the clip's own caption
    np.testing.assert_allclose(cached[key], enc.encode([caption[key]])[0][0].numpy(), rtol=1e-5, atol=1e-6)

    text = ["model.cond=text", "text_encoder=hf", f"text_encoder.pretrained={t5}", "text_encoder.max_length=16"]
    cfg = _cfg(
        tmp_path / "run",
        {"cache": tmp_path / "cache", "vae": vae},
        *text,
        "trainer.max_steps=6",
        "trainer.limit_val_batches=0",
    )
    from hydra.utils import instantiate

    check_config(cfg)
    dm = instantiate(cfg.data, _convert_="all", captions=True)
    shapes = set()
    for n, (moments, _, meta) in enumerate(dm.train_dataloader().iter_meta()):
        emb, mask = meta["text"]
        assert emb.shape[0] == moments.shape[0] == len(meta["keys"]) and mask.dtype == torch.bool
        for j, k in enumerate(meta["keys"]):  # each clip with its own cached caption embedding
            assert np.array_equal(emb[j].numpy(), cached[k])
        shapes.add(tuple(moments.shape[2:]))
        if n == 7:
            break
    assert shapes == set(GRIDS.values())  # every bucket's shape, captions included
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and "train/hinge_acc" in metrics  # the caption-match head trained


def test_image_share_zero_and_one_on_a_cache(data):
    """image_share on a bucketed cache: the clips of one-frame buckets are the images; 0 keeps no image batch, 1
    only image batches, as on pixels (tests/test_buckets.py), from the cache's counts instead of a scan."""
    from stale.data.datamodule import LatentDataModule

    for share, frames in ((0.0, {3}), (1.0, {1})):  # latent frames: 9 pixel frames are 3, an image is 1
        dm = LatentDataModule(
            [str(data["cache"])], num_classes=2, num_workers=0, shuffle_buffer=4, epoch_batches=6, image_share=share
        )
        assert {m.shape[2] for m, _ in dm.train_dataloader()} == frames
        assert (dm.bucket_scan.images, dm.bucket_scan.videos) == (1, 6)  # CLIPS: one image, six videos
