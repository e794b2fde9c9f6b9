"""The synthetic data set and a smoke run end to end: shards and splits, the model's shapes, every config group
composing, every output `stale-train debug=smoke` writes, and bad input stopping before training."""

import csv
import json
import tarfile

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from helpers import run_cli
from stale.data.datamodule import VideoDataModule
from stale.data.reader import ShardError
from stale.data.synthetic import SyntheticSpec, ensure_synthetic, make_clip, split_pattern
from stale.data.video_io import decode_mp4
from stale.models import build_model

# the label colours of the synthetic data set (stale/data/synthetic.py), typed here: red, green, blue, yellow
LABEL_RGB = np.array([[230, 60, 50], [60, 200, 80], [60, 110, 240], [245, 210, 50]], dtype=np.float32)


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    spec = SyntheticSpec(counts={"train": 24, "val": 8, "test": 8}, per_shard=10)
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), spec), spec


def test_shards_round_trip(small_synthetic):
    """Clips written as mp4 in tar shards come back with the right shape, dtype, label and pixels."""
    folder, spec = small_synthetic
    train = sorted(folder.glob("train-*.tar"))
    assert len(train) == 3  # 24 clips at 10 per shard
    with tarfile.open(train[0]) as tar:
        names = tar.getnames()
        assert {"train0000000.mp4", "train0000000.json", "train0000000.cls"} <= set(names)
        meta = json.loads(tar.extractfile("train0000000.json").read())
        video = decode_mp4(tar.extractfile("train0000000.mp4").read())
    assert video.shape == (spec.frames, spec.size, spec.size, 3) and video.dtype == np.uint8
    # regenerate the same clip from the same seed: H.264 at low CRF must stay close to the source
    rng = np.random.default_rng([1, spec.size, spec.frames, spec.num_classes])
    label = int(rng.integers(spec.num_classes))
    assert meta["label"] == label and meta["key"] == "train0000000"
    source = make_clip(rng, spec, label)
    other = make_clip(np.random.default_rng(99), spec, label)
    # yuv420p halves chroma resolution, which costs ~4/255 on 16 px edges; another clip is far off
    assert np.abs(video.astype(int) - source.astype(int)).mean() < 8
    assert np.abs(video.astype(int) - other.astype(int)).mean() > 15

    dm = VideoDataModule(
        shards=split_pattern(folder, "train"),
        val_shards=split_pattern(folder, "val"),
        frames=spec.frames,
        size=spec.size,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
    )
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, spec.frames, spec.size, spec.size) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(spec.num_classes))
    seen = sum(len(b[1]) for b in dm.val_dataloader())
    assert seen == 8  # the finite validation stream yields every clip once


def test_splits_do_not_share_clips(small_synthetic):
    folder, _ = small_synthetic

    def digests(split):
        out = set()
        for shard in folder.glob(f"{split}-*.tar"):
            with tarfile.open(shard) as tar:
                out |= {hash(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".mp4")}
        return out

    assert not digests("train") & digests("val") and not digests("train") & digests("test")


def test_simple_style_has_one_colour_per_class_and_one_background():
    spec = SyntheticSpec(style="simple")
    for label in range(spec.num_classes):
        clips = [make_clip(np.random.default_rng(seed), spec, label).astype(int) for seed in range(3)]
        for clip in clips:
            pixels, counts = np.unique(clip.reshape(-1, 3), axis=0, return_counts=True)
            assert (pixels[counts.argmax()] == [40, 40, 48]).all()  # the background: the commonest pixel
            brightest = pixels[pixels.sum(1).argmax()]
            assert np.abs(brightest - LABEL_RGB[label]).max() <= 1  # the shape's fully covered pixels
        # same draws as "varied": the motion is the same, only colours differ
        varied = make_clip(np.random.default_rng(0), SyntheticSpec(), label)
        assert ((varied != varied[0, 0, 0]).any(-1) == (clips[0] != clips[0][0, 0, 0]).any(-1)).mean() > 0.9
    assert SyntheticSpec(style="simple").fingerprint() != SyntheticSpec().fingerprint()
    with pytest.raises(ValueError, match="data.style='plain' is not one of"):
        SyntheticSpec(style="plain")


@pytest.mark.parametrize("name,shape", [("tiny", (2, 3, 8, 16, 16)), ("tiny", (1, 3, 4, 32, 16))])
def test_model_shapes(name, shape):
    model = build_model(name, num_classes=4)
    x = torch.randn(shape)
    v, scores = model(x, torch.rand(shape[0]), torch.randint(0, 5, (shape[0],)))
    assert v.shape == x.shape and scores.shape == (shape[0], 4)
    assert "joy_token" in dict(model.named_buffers()) and "joy_token" not in dict(model.named_parameters())


def test_missing_and_empty_shards_named(tmp_path):
    with pytest.raises(ShardError, match="nope-000000.tar"):
        VideoDataModule(shards=str(tmp_path / "nope-{000000..000001}.tar"))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match="empty.tar"):
        VideoDataModule(shards=str(empty))
    with pytest.raises(ShardError, match="data.shards"):
        VideoDataModule(shards="")


def test_configs_compose():
    """Every documented config group value composes."""
    with initialize_config_module("stale.conf", version_base="1.3"):
        for override in [
            "model=s",
            "model=xl",
            "data=shards",
            "diffusion.prior=gaussian",
            "schedule=cosine",
            "schedule=wsd",
            "schedule=constant",
            "logger=csv",
            "logger=none",
            "trainer=gpu",
            "trainer=ddp",
            "trainer=fsdp",
            "debug=smoke",
        ]:
            cfg = compose("train", overrides=[override], return_hydra_config=True)
            key, value = override.split("=")
            chosen = cfg.hydra.runtime.choices.get(key, OmegaConf.select(cfg, key))
            assert str(chosen) == value, override  # the override took effect


def test_smoke_train_writes_every_output(tmp_path):
    """`stale-train debug=smoke` end to end: checkpoint, samples, contact sheet, GIF, CSV, W&B offline."""
    out = tmp_path / "run"
    proc = run_cli("stale-train", "debug=smoke", f"hydra.run.dir={out}", timeout=180)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    mp4s = sorted((out / "samples").glob("sample_*.mp4"))
    assert len(mp4s) == 4
    clip = decode_mp4(mp4s[0].read_bytes())
    assert clip.shape == (8, 16, 16, 3)
    sheet = Image.open(out / "samples" / "contact_sheet.png")
    gif = Image.open(out / "samples" / "grid.gif")
    assert sheet.size[0] > sheet.size[1]  # 8 frame columns, 4 sample rows
    # 8 frames of 125 ms (Pillow merges identical consecutive frames and adds up their durations: a smoke model
    # barely trained can draw still clips)
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    # GIF delays are centiseconds: 125 ms is stored as 12 (Pillow 13 truncates) or 13 cs
    assert 1 <= gif.n_frames <= 8 and sum(durations) in (8 * 120, 8 * 130)
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    for name in ("checkpoint", "contact sheet", "gif grid", "metrics csv", "wandb run"):
        assert name in proc.stdout, f"the run's final summary does not say where the {name} is"
    # the summary prints the first and last logged training loss, as the CSV has them
    assert f"{losses[0]:.4g} at step 0 -> {losses[-1]:.4g} at step 5" in proc.stdout
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "current_model_state" in ckpt  # EMA weights in state_dict, raw weights kept beside them


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model=huge", "model"),
        ("data=shards", "data.shards"),
        # brace patterns must be quoted for Hydra's override parser, as the README shows
        ("data=shards data.shards='/definitely/missing-{000000..000003}.tar'", "/definitely/missing-000000.tar"),
        ("diffusion.prior=laplace", "laplace"),
        ("data.size=18", "data.size=18"),
    ],
)
def test_bad_input_stops_before_training(tmp_path, override, needle):
    out = tmp_path / "bad"
    proc = run_cli("stale-train", "debug=smoke", f"hydra.run.dir={out}", *override.split(), check=False, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    assert not (out / "checkpoints").exists()  # nothing trained
