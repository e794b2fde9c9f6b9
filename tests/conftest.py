"""Shared test set-up: an isolated data cache, W&B offline, CPU only."""

import os

import pytest
import torch

import helpers


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Every test writes its data cache and W&B files under pytest's tmp dir, never in $HOME or the repo."""
    os.environ["STALE_CACHE"] = str(tmp_path_factory.mktemp("stale-cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # One torch thread per process: tests start several processes (CLI runs, DDP ranks, loader workers) on a
    # 2-core machine, and oversubscribed OpenMP threads ran a step up to 30x slower there.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield


@pytest.fixture
def compose_train():
    """compose_train(*overrides) -> the stale-train config as Hydra's compose API builds it from the packaged
    conf/ (what `stale-train OVERRIDES...` runs, without starting an app): helpers.compose_train, which functions
    outside a test import from there."""
    return helpers.compose_train


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> dict:
    """Real mp4 WebDataset shards of synthetic clips: 4 train shards and 2 validation shards (one per rank);
    {folder, overrides} (the overrides that train on them). The DDP and sweep tests' data."""
    from stale.data.synthetic import SyntheticSpec, ensure_synthetic, split_pattern

    spec = SyntheticSpec(counts={"train": 32, "val": 16, "test": 8}, per_shard=8)
    folder = ensure_synthetic(tmp_path_factory.mktemp("ddp-shards"), spec)
    return {
        "folder": folder,
        "overrides": [
            "data=shards",
            f"data.shards='{split_pattern(folder, 'train')}'",
            f"data.val_shards='{split_pattern(folder, 'val')}'",
        ],
    }
