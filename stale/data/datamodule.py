"""LightningDataModule that streams mp4 clips from WebDataset tar shards.

Training: an endless resampled stream (each rank and worker draws shards with its own seed, so no
splitter is needed and no worker ever runs dry), shuffled in a buffer, decoded by PyAV.
Validation: each shard read once, split by node and by worker, so every clip is seen once.
Batches are uint8 (B, C, T, H, W) plus int64 labels; scaling to [-1, 1] happens on the device.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from stale.data.video_io import VideoDecodeError, decode_mp4

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """Bad shard configuration: the message names the pattern or file."""


def expand_shards(shards: str | list[str]) -> list[str]:
    """Expand brace patterns and check that local shards exist and are non-empty, before training starts."""
    if shards is None or (isinstance(shards, str) and not shards.strip()):
        raise ShardError("data.shards is empty: set data.shards=/path/to/train-{000000..000009}.tar")
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        urls.extend(wds.shardlists.expand_urls(str(pattern)))
    if not urls:
        raise ShardError(f"data.shards={shards!r} expands to no shard")
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            continue  # remote or piped: can only be checked by reading it
        if not os.path.exists(url):
            raise ShardError(f"shard not found: {url} (from data.shards={shards!r})")
        if os.path.getsize(url) == 0:
            raise ShardError(f"shard is empty (0 bytes): {url}")
    return urls


@dataclass
class ClipSpec:
    """How a decoded video becomes a training clip."""

    frames: int = 8
    size: int = 16  # output height = width
    random_start: bool = True  # random temporal offset for training, first frames for validation


class DecodeClip:
    """Turns a raw WebDataset sample into (uint8 (C, T, H, W) tensor, label); counts what it skips."""

    def __init__(self, spec: ClipSpec, label_key: str = "label", train: bool = True):
        self.spec, self.label_key, self.train = spec, label_key, train
        self.skipped: Counter = Counter()

    def __call__(self, sample: dict):
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        if "mp4" not in sample:
            raise VideoDecodeError(f"{name}: no .mp4 member")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        label = meta.get(self.label_key, int(sample["cls"]) if "cls" in sample else 0)
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
            raise VideoDecodeError(f"{name}: label {label!r} is not an integer")
        video = decode_mp4(sample["mp4"], name=name)  # (T, H, W, 3)
        video = self._clip(video, name)
        return torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2), int(label)  # (C, T, H, W)

    def _clip(self, video: np.ndarray, name: str) -> np.ndarray:
        t, h, w, _ = video.shape
        s = self.spec
        if t < s.frames:
            raise VideoDecodeError(f"{name}: {t} frames, need {s.frames}")
        start = np.random.randint(0, t - s.frames + 1) if (self.train and s.random_start) else 0
        video = video[start : start + s.frames]
        if (h, w) != (s.size, s.size):
            video = _resize_crop(video, s.size)
        return video


def _resize_crop(video: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to `size` (area-averaging) and centre-crop to size x size."""
    frames = torch.from_numpy(video).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    frames = torch.nn.functional.interpolate(frames, size=(nh, nw), mode="area" if scale < 1 else "bilinear")
    top, left = (nh - size) // 2, (nw - size) // 2
    frames = frames[..., top : top + size, left : left + size]
    return frames.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def _skip_and_count(exn: Exception) -> bool:
    """WebDataset handler: log the bad sample by name and keep going (no sleep)."""
    log.warning("skipping bad sample: %s", exn)
    return True


class VideoDataModule(L.LightningDataModule):
    """Streams (video, label) batches from WebDataset shards of mp4 clips."""

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        frames: int = 8,
        size: int = 16,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        shuffle_buffer: int = 512,
        seed: int = 0,
        num_classes: int = 4,
        label_key: str = "label",
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_urls = expand_shards(shards)
        self.val_urls = expand_shards(val_shards) if val_shards else None

    def _pipeline(self, train: bool) -> wds.DataPipeline:
        hp = self.hparams
        decode = DecodeClip(ClipSpec(hp.frames, hp.size, random_start=train), hp.label_key, train=train)
        if train:
            stages = [wds.ResampledShards(self.train_urls, seed=hp.seed, deterministic=True),
                      wds.tarfile_to_samples(handler=_skip_and_count),
                      wds.shuffle(hp.shuffle_buffer, initial=hp.shuffle_buffer // 2)]
        else:
            stages = [wds.SimpleShardList(self.val_urls), wds.split_by_node, wds.split_by_worker,
                      wds.tarfile_to_samples(handler=_skip_and_count)]
        stages.append(wds.map(decode, handler=_skip_and_count))
        return wds.DataPipeline(*stages)

    def _loader(self, train: bool) -> DataLoader:
        hp = self.hparams
        workers = hp.num_workers
        if not train:
            workers = min(workers, len(self.val_urls))  # a worker without a shard would idle
        return DataLoader(
            self._pipeline(train),
            batch_size=hp.batch_size if train else (hp.val_batch_size or hp.batch_size),
            num_workers=workers,
            pin_memory=hp.pin_memory,
            persistent_workers=workers > 0 and train,
            prefetch_factor=hp.prefetch_factor if workers > 0 else None,
            worker_init_fn=_seed_worker,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(train=False) if self.val_urls else []


def _seed_worker(worker_id: int) -> None:
    # numpy's global RNG (random clip starts) is otherwise identical in every forked worker
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
