"""A quiet console (issue 33, item 8): a training run prints each log line once and still writes it to its
train.log, prints no library advert or library-internal deprecation warning, and sums up the buckets short of
data in one line; the filters stay narrow (the same warning raised elsewhere is still shown)."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from helpers import MIXED_IMAGES, MIXED_VIDEOS, TINY_RUN, mixed_shape_folder, run_cli
from stale.cli import quiet_console
from stale.data.datamodule import VideoDataModule
from stale.data.shards import ShardsConfig, convert


@pytest.fixture
def lightning_loggers():
    """quiet_console() changes Lightning's loggers of this test process: put them back afterwards."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero")
    saved = {
        n: (logging.getLogger(n).propagate, list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters))
        for n in names
    }
    yield
    for n, (propagate, handlers, filters) in saved.items():
        logger = logging.getLogger(n)
        logger.propagate, logger.handlers, logger.filters = propagate, handlers, filters


def test_a_training_run_prints_each_line_once_and_no_library_noise(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "stale-train", *TINY_RUN, "sample.num_videos=1", "sample.steps=1", f"hydra.run.dir={run}", timeout=400
    )  # the default loggers: CSV and W&B (offline)
    console = proc.stdout + proc.stderr
    logged = [line.split("] - ", 1)[1] for line in (run / "train.log").read_text().splitlines() if "] - " in line]
    assert "Seed set to 0" in logged and any(m.startswith("GPU available") for m in logged)  # Lightning's lines
    assert any(m.startswith("model debug") for m in logged)  # and stale's
    for message in logged:
        assert console.count(message) == 1, message
    assert "litlogger" not in console  # Lightning's advert
    assert "LeafSpec" not in console  # Lightning's own use of a deprecated torch class
    assert "anonymous setting" not in console  # W&B on the settings WandbLogger passes
    assert not re.search(r"Warning\b", proc.stderr), proc.stderr  # no Python warning at all on this run
    assert "stale-train finished" in proc.stdout


def test_the_warning_filters_match_only_the_library_that_raises_them(lightning_loggers):
    """The LeafSpec message raised by Lightning's module is filtered; the same message and category from any
    other module (a user's code) is still shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()
        message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(message, FutureWarning, "mine.py", 1, module="mine")
        warnings.warn_explicit(
            "something else", FutureWarning, "_pytree.py", 22, module="lightning.pytorch.utilities._pytree"
        )
    assert [(str(w.message), w.filename) for w in caught] == [(message, "mine.py"), ("something else", "_pytree.py")]


def test_lightning_adverts_are_dropped_and_its_other_lines_kept(lightning_loggers, caplog):
    quiet_console()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_buckets_short_of_data_are_summed_up_in_one_warning(tmp_path, caplog):
    """The smoke preset on 6 videos (12 frames or more, two of each aspect) and 3 images (one of each): the 4-frame
    buckets are nobody's largest fit, each image bucket gets 1 clip of its batch of 8, the 8-frame buckets 2 of 2.
    Six buckets are short of data: one warning names them all."""
    folder = mixed_shape_folder(tmp_path / "media", videos=MIXED_VIDEOS[:6], images=MIXED_IMAGES[:3])
    convert(
        ShardsConfig(
            input=str(folder), out=str(tmp_path / "shards"), size=16, grid=4, progress=False, split={"train": 1.0}
        )
    )
    dm = VideoDataModule(
        str(tmp_path / "shards" / "train-000000.tar"), buckets="smoke", num_workers=0, shuffle_buffer=4, epoch_batches=2
    )
    with caplog.at_level(logging.WARNING, logger="stale.data.datamodule"):
        dm.train_dataloader()
    warned = [r.getMessage() for r in caplog.records if r.name == "stale.data.datamodule"]
    assert len(warned) == 1, warned
    assert "6 of 9 buckets have less data than one batch" in warned[0]
    assert "no clip has 4x16x16, 4x12x20, 4x20x12 as its largest bucket" in warned[0]
    assert (
        "fewer clips than one batch fit 1x16x16 (1 of a batch of 8), 1x12x20 (1 of a batch of 8), 1x20x12 (1 of "
        "a batch of 8)"
    ) in warned[0]
