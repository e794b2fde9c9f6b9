"""The data stream inside Lightning: skip counts logged, the skip-rate stop naming the worst shards,
mid-epoch resume from a Lightning checkpoint, and stale-shards -> stale-train end to end."""

from __future__ import annotations

import csv
import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from helpers import no_synthetic_keys, read_samples, real_shards, relabelled, run_cli, write_shard
from stale.data.datamodule import VideoDataModule
from stale.data.health import DataHealthError, DataHealthMonitor


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return real_shards(tmp_path_factory)


class Mean(L.LightningModule):
    """The smallest real LightningModule: one weight fitted to the mean pixel of each batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        video, label = batch
        return (self.w - video.float().mean() / 255).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Record(Callback):
    """What each training step saw, by global step."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        video, label = batch
        self.seen[trainer.global_step] = (video.clone(), label.clone())


def trainer(tmp_path, steps, callbacks, **kw):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        **kw,
    )


def data(shards, **kw):
    args = dict(frames=8, size=16, num_classes=2, batch_size=4, num_workers=0, shuffle_buffer=8, seed=0)
    return VideoDataModule(shards, **{**args, **kw})


@pytest.fixture(scope="module")
def mixed(real, tmp_path_factory):
    """3 good shards and 1 shard of which most samples are corrupt."""
    root = tmp_path_factory.mktemp("mixed")
    good = read_samples(real["summary"]["splits"]["train"]["pattern"])
    for i in range(3):
        write_shard(root / f"good-{i}.tar", relabelled(good, f"g{i}_", 8, seed=i))
    bad = relabelled(good, "b", 8, seed=9)
    for s in bad[:6]:
        s["mp4"] = s["mp4"][: len(s["mp4"]) // 3]  # truncated mp4
    write_shard(root / "bad.tar", bad)
    return [str(root / f"good-{i}.tar") for i in range(3)] + [str(root / "bad.tar")]


def test_skips_are_counted_logged_and_the_run_finishes(mixed, tmp_path):
    dm = data(mixed, max_skip_rate=0.5, skip_rate_min_samples=10)
    t = trainer(tmp_path, 12, [DataHealthMonitor()])
    t.fit(Mean(), datamodule=dm)
    assert t.global_step == 12
    skipped = dm.health.reasons["train"]["corrupt_video"]
    assert skipped > 0 and set(dm.health.reasons["train"]) == {"corrupt_video"}
    assert dm.health.worst_shards("train")[0][0] == mixed[3]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    logged = [float(r["data/skipped_corrupt_video"]) for r in rows if r.get("data/skipped_corrupt_video")]
    assert logged and max(logged) == skipped  # the counts reach the logger
    assert any(float(r["data/train_skip_rate"]) > 0 for r in rows if r.get("data/train_skip_rate"))


def test_skip_rate_above_the_threshold_stops_training_naming_the_shard(mixed, tmp_path):
    dm = data(mixed, max_skip_rate=0.01, skip_rate_min_samples=10)
    t = trainer(tmp_path, 50, [DataHealthMonitor()])
    with pytest.raises(DataHealthError) as err:
        t.fit(Mean(), datamodule=dm)
    message = str(err.value)
    assert "data.max_skip_rate=0.01" in message and mixed[3] in message and "corrupt_video=" in message
    for good in mixed[:3]:
        assert good not in message
    assert t.global_step < 50


def test_lightning_checkpoint_resumes_the_stream_mid_epoch(real, tmp_path):
    shards = real["summary"]["splits"]["train"]["pattern"]
    kw = dict(num_workers=2, epoch_batches=4)
    full = Record()
    trainer(
        tmp_path / "a",
        7,
        [full, ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")],
    ).fit(Mean(), datamodule=data(shards, **kw))
    ckpt = tmp_path / "ckpt" / "step=3.ckpt"
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["epoch"] == 0 and state["batches"] == 3 and state["round_yielded"] == 1  # mid-epoch, mid-round
    resumed = Record()
    trainer(tmp_path / "b", 7, [resumed]).fit(Mean(), datamodule=data(shards, **kw), ckpt_path=ckpt)
    assert sorted(resumed.seen) == [3, 4, 5, 6]  # the second epoch starts at step 4
    for step in resumed.seen:
        assert torch.equal(resumed.seen[step][0], full.seen[step][0]), step
        assert torch.equal(resumed.seen[step][1], full.seen[step][1]), step


def test_stale_shards_then_stale_train_on_real_videos(real, tmp_path):
    out = tmp_path / "shards"
    proc = run_cli(
        "stale-shards",
        f"input={real['folder']}",
        f"out={out}",
        "size=16",
        "frames=8",
        "fps=8",
        "maxcount=4",
        "split.train=0.6",
        "split.val=0.4",
        "split.test=0",
        "workers=2",
        timeout=300,
    )
    assert "train with: stale-train" in proc.stdout and "video/s" in proc.stderr  # summary and progress bar
    info = json.loads((out / "info.json").read_text())
    assert info["splits"]["train"]["shards"] >= 2 and info["num_classes"] == 2
    train, val = info["splits"]["train"]["pattern"], info["splits"]["val"]["pattern"]
    run = tmp_path / "run"
    proc = run_cli(
        "stale-train",
        "debug=smoke",
        "data=shards",
        f"data.shards='{train}'",
        f"data.val_shards='{val}'",
        "data.num_classes=2",
        "logger=csv",
        f"hydra.run.dir={run}",
        *no_synthetic_keys(),
        timeout=600,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert "stale-train finished" in proc.stdout
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    clips = [float(r["data/train_clips"]) for r in rows if r.get("data/train_clips")]
    assert clips and max(clips) >= 4 * 6  # 6 smoke steps of 4 clips, all decoded from the real videos
    assert [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert os.path.isfile(run / "checkpoints" / "last.ckpt")
