"""LightningDataModule that streams mp4 clips from WebDataset tar shards (docs/data.md).

`data=shards data.shards=<pattern>`: local paths, brace patterns, lists, folders, globs and `pipe:` commands;
shards written by `stale-shards` and by video2dataset train as they are. The stream is stale/data/loader.py, the
shard reading and sample checks stale/data/reader.py, bad-sample counting stale/data/health.py. Batches are uint8
(B, C, T, H, W) plus int64 labels; scaling to [-1, 1] happens on the device.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import lightning as L
import torch

from stale.data import buckets as bucketing
from stale.data.captions import MISSING
from stale.data.health import DataHealth
from stale.data.latent_cache import TEXT_MEMBERS, cache_buckets, cache_info, check_cache_clip, load_empty_text
from stale.data.loader import TrainLoader, ValLoader, VideoStream
from stale.data.reader import LatentSpec, expand_shards
from stale.data.video_io import ClipSpec
from stale.utils.ranks import data_parallel_rank_world

log = logging.getLogger(__name__)


def _rank_world(trainer) -> tuple[int, int]:
    """The data-parallel rank and size: the trainer's when attached (the ranks of one sequence-parallel group read
    the same clips: stale/parallel/mesh.py), else torch.distributed's, else env."""
    if trainer is not None:
        return data_parallel_rank_world(trainer)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class VideoDataModule(L.LightningDataModule):
    """Streams (video, label) batches from WebDataset shards of mp4 clips."""

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        frames: int = 8,  # frames per clip
        size: int = 16,  # clip height = width (short side resized to it, then cropped)
        batch_size: int = 16,
        val_batch_size: int | None = None,  # None: batch_size
        num_workers: int = 1,
        shuffle_buffer: int = 512,  # samples per worker; 0 or 1 disables shuffling
        seed: int = 0,
        num_classes: int = 4,
        label_key: str | None = "label",  # .json field with the integer label; None: every clip is class 0
        pin_memory: bool = False,
        prefetch_factor: int = 2,  # batches each worker prepares ahead
        frame_stride: int = 1,  # take every n-th stored frame ...
        fps: float | None = None,  # ... or resample the clip to this frame rate (overrides frame_stride)
        train_start: str = "random",  # random | center | first: clip start in the stored video
        val_start: str = "center",
        train_crop: str = "random",  # random | center
        hflip: bool = False,  # random horizontal flips in training
        decode_threads: int = 1,  # PyAV threads per decode: 1 = none (workers are the parallelism), 0 = auto
        epoch_batches: int = 1000,  # batches per epoch on every rank (WebDataset's with_epoch)
        mix_workers: bool = True,  # mix each round of worker batches in the main process
        persistent_workers: bool = True,
        max_skip_rate: float = 0.05,  # stop training when more of the samples are skipped (DataHealthMonitor)
        skip_rate_min_samples: int = 100,  # ... once at least this many samples were seen
        buckets=None,  # None: every clip is frames x size x size; a preset name or a list (stale/data/buckets.py)
        bucket_max_crop: float = 0.25,  # a clip fits a bucket when its crop loses at most this share ...
        bucket_max_upscale: float = 1.0,  # ... and it is scaled up at most this much
        image_share: float | None = None,  # with buckets: the share of training clips that are images (T = 1)
        bucket_scan: bool = True,  # read the shards' .json once at start: clips per bucket, warnings, image_share
        bucket_batch_max: int
        | None = None,  # caps every bucket's batch size (debug=smoke: a few steps see every bucket)
        captions: bool = False,  # read each clip's caption too (stale-train sets it with model.cond=text)
        missing_caption: str = "skip",  # a clip without a caption: skip (counted) | empty (counted, kept with "")
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_urls = expand_shards(shards, "data.shards")
        self.val_urls = expand_shards(val_shards, "data.val_shards") if val_shards else None
        if label_key is None and num_classes < 1:
            raise ValueError(f"data.num_classes={num_classes} must be >= 1")
        self.train_spec = ClipSpec(frames, size, frame_stride, fps, train_start, train_crop, hflip, decode_threads)
        self.val_spec = ClipSpec(frames, size, frame_stride, fps, val_start, "center", False, decode_threads)
        self.health = DataHealth(max_skip_rate, skip_rate_min_samples)
        if missing_caption not in MISSING:
            raise ValueError(f"data.missing_caption={missing_caption!r} is not one of {MISSING}")
        self.text_members = None  # a stale-encode cache with caption embeddings names its members here
        self.buckets = bucketing.parse_buckets(buckets)
        if self.buckets and bucket_batch_max is not None:
            if bucket_batch_max < 1:
                raise ValueError(f"data.bucket_batch_max={bucket_batch_max} must be >= 1 (or null)")
            self.buckets = [
                dataclasses.replace(b, batch_size=min(b.batch_size, bucket_batch_max)) for b in self.buckets
            ]
        if image_share is not None and not (self.buckets and bucket_scan and 0 <= image_share <= 1):
            raise ValueError(
                f"data.image_share={image_share} needs data.buckets, data.bucket_scan=true and a value in [0, 1]"
            )
        bucketing.check_rule(bucket_max_crop, bucket_max_upscale)
        self.bucket_scan: bucketing.Scan | None = None
        self.bucket_specs = None  # per bucket: None = the clip spec at the bucket's shape (a latent cache sets its own)
        if self.buckets:
            self.health.bucket_names = [b.name for b in self.buckets]

    def assigner(self, train: bool = True) -> bucketing.Assigner | None:
        """The bucket rule of this run; scans the training shards the first time (data.bucket_scan). Validation
        keeps every clip (no image_share thinning)."""
        hp = self.hparams
        if not self.buckets:
            return None
        rule = dict(stride=hp.frame_stride, max_crop=hp.bucket_max_crop, max_upscale=hp.bucket_max_upscale)
        if hp.bucket_scan and self.bucket_scan is None:
            self.bucket_scan = bucketing.scan(self.train_urls, bucketing.Assigner(self.buckets, **rule))
            self._report_scan()
        return bucketing.Assigner(self.buckets, keep=self._image_keep(train), **rule)

    def _image_keep(self, train: bool) -> tuple[float, float]:
        """image_share's (p keep an image, p keep a video) from the scan's counts; validation keeps every clip."""
        share = self.hparams.image_share
        if share is None or not train:
            return 1.0, 1.0
        return bucketing.share_keep(self.bucket_scan.images, self.bucket_scan.videos, share)

    def _report_scan(self) -> None:
        """Log the clips per bucket and warn of starved buckets (rank 0)."""
        rank, _ = _rank_world(self.trainer)
        if rank == 0:
            found = self.bucket_scan
            log.info(
                "buckets: %d clips (%d images, %d videos) in data.shards; largest bucket each fits: %s",
                found.clips,
                found.images,
                found.videos,
                ", ".join(f"{n}={c}" for n, c in found.per_bucket.items()),
            )
            for warning in bucketing.report(found, self.buckets):
                log.warning("%s", warning)

    def _stream(self, train: bool) -> VideoStream:
        hp = self.hparams
        rank, world = _rank_world(self.trainer)
        return VideoStream(
            self.train_urls if train else self.val_urls,
            self.train_spec if train else self.val_spec,
            train=train,
            batch_size=hp.batch_size if train else (hp.val_batch_size or hp.batch_size),
            num_classes=hp.num_classes,
            label_key=hp.label_key,
            shuffle_buffer=hp.shuffle_buffer,
            seed=hp.seed,
            rank=rank,
            world_size=world,
            buckets=self.buckets,
            assigner=self.assigner(train),
            captions=hp.missing_caption if hp.captions else None,
            text_members=self.text_members,
            bucket_specs=self.bucket_specs,
        )

    def _loader(self, cls, train: bool, **kwargs):
        hp = self.hparams
        return cls(self._stream(train=train), self.health, hp.num_workers, hp.pin_memory, hp.prefetch_factor, **kwargs)

    def train_dataloader(self) -> TrainLoader:
        hp = self.hparams
        kw = dict(persistent_workers=hp.persistent_workers, epoch_batches=hp.epoch_batches, mix=hp.mix_workers)
        return self._loader(TrainLoader, True, **kw)

    def val_dataloader(self) -> ValLoader | list:
        return self._loader(ValLoader, False, persistent_workers=False) if self.val_urls else []


class LatentDataModule(VideoDataModule):
    """Streams (posterior moments, label) batches from a stale-encode cache (docs/latent.md): float32
    (B, 2C, T', H', W'). The clip shapes come from the cache's info.json; the system draws the latent from the
    moments and normalises it (stale.latent.autoencoder), as it does for clips it encodes itself.

    A cache encoded with buckets (stale-encode buckets=...) trains with its bucket list: each sample's .json names
    its bucket (no fit rule at train time), each bucket's batches are of its latent shape. `buckets` (data.buckets)
    may only repeat the cache's list; `image_share` counts the clips of one-frame buckets as the images."""

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        frames: int | None = None,
        size: int | None = None,
        buckets=None,
        **loader_kwargs,
    ):
        info, path = cache_info(shards, "data.shards")
        check_cache_clip(info, path, frames, size)
        buckets = cache_buckets(info, path, buckets)  # a local again: save_hyperparameters records it
        if val_shards:
            val_info, val_path = cache_info(val_shards, "data.val_shards")
            if (
                val_info["latent_shape"] != info["latent_shape"]
                or val_info["vae"] != info["vae"]
                or val_info.get("buckets") != info.get("buckets")
            ):
                raise ValueError(
                    f"data.val_shards: {val_path} was encoded differently from {path} "
                    "(autoencoder, clip shape or buckets)"
                )
        super().__init__(shards, val_shards, frames=info["frames"], size=info["size"], buckets=buckets, **loader_kwargs)
        c, t, h, w = info["latent_shape"]
        self.info = info
        if info.get("text_encoder"):  # captions encoded once by stale-encode: the loader reads them, never the text
            self.text_members, self.text_info = TEXT_MEMBERS, info["text_encoder"]
            self.empty_text = load_empty_text(path.parent)
        self.train_spec = self.val_spec = LatentSpec((2 * c, t, h, w))
        # each bucket's moments: (2C, T', H', W') of its latent clip (data.bucket_batch_max kept names)
        if self.buckets:
            shapes = [info["per_bucket"][b.name]["latent_shape"] for b in self.buckets]
            self.bucket_specs = [LatentSpec((2 * s[0], *s[1:])) for s in shapes]

    def assigner(self, train: bool = True) -> bucketing.CacheAssigner | None:
        """The cache's buckets, named by each sample's .json; the cache's counts stand in for the scan (its .json
        records no pixel shape to fit again), and give image_share's thinning in training (as the scan does)."""
        if not self.buckets:
            return None
        if self.bucket_scan is None:
            per = {b.name: self.info["per_bucket"][b.name]["clips"] for b in self.buckets}
            images = sum(n for b, n in zip(self.buckets, per.values()) if b.frames == 1)  # clips trained as images
            self.bucket_scan = bucketing.Scan(per, 0, images, sum(per.values()) - images, sum(per.values()))
            self._report_scan()
        return bucketing.CacheAssigner(self.buckets, keep=self._image_keep(train))
