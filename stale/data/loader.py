"""The streaming loader behind VideoDataModule: WebDataset tar shards of mp4 clips -> uint8 batches.

`VideoStream` runs inside each DataLoader worker: training draws shards with replacement seeded by (seed, epoch,
rank, worker), shuffles, decodes and batches (stale.data.reader); validation splits the shard list so every clip is
read once across ranks and workers. `TrainLoader` mixes each round of worker batches in the main process, strips the
metadata into `DataHealth`, and stops after `epoch_batches`. Its `state_dict` resumes mid-epoch without decoding the
replay, buckets included (docs/data.md "Mid-epoch resume" says why not torchdata's StatefulDataLoader;
docs/buckets.md "Workers and ranks stay in step").
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from collections import Counter
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stale.data import buckets as bucketing
from stale.data.buckets import Assigner, Bucket, CacheAssigner
from stale.data.captions import sample_caption
from stale.data.health import DataHealth, DataHealthError
from stale.data.reader import Skip, SkipCounter, all_skipped, decode_sample, read_shard
from stale.data.video_io import ClipSpec

log = logging.getLogger(__name__)

STALL_SAMPLES = 1000  # a worker that skipped this many samples in a row without one clip gives up
STALL_SHARDS = 50  # ... or opened this many shards in a row (at least 2 x the shard count) without a sample


def _seed(*parts: int) -> int:
    """One 32-bit seed from several integers (seed, tag, epoch, rank, worker, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, rank: int, worker: int, position: int) -> int:
    """The seed of one sample's clip sampling and augmentation: a function of its place in the stream only,
    stable across Python versions and processes (NumPy's SeedSequence, unlike hash()), so exact resume holds."""
    return _seed(seed, 4, epoch, rank, worker, position)


class VideoStream(IterableDataset):
    """Worker-side pipeline. Yields (uint8 (B, C, T, H, W), int64 (B,), meta) batches.

    captions (model.cond=text): None reads no captions; "skip" or "empty" (data.missing_caption) puts each clip's
    caption into meta["text"]: a list of strings, or, from a stale-encode cache with text (text_members), the
    cached embeddings and masks stacked as (float32 (B, L, D), bool (B, L)).
    """

    def __init__(
        self,
        urls: list[str],
        spec: ClipSpec,
        *,
        train: bool,
        batch_size: int,
        num_classes: int,
        label_key: str | None = "label",
        shuffle_buffer: int = 512,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        control: torch.Tensor | None = None,
        buckets: list[Bucket] | None = None,
        assigner: Assigner | CacheAssigner | None = None,
        captions: str | None = None,
        text_members: tuple[str, str] | None = None,
        bucket_specs: list | None = None,
    ):
        self.urls, self.spec, self.train = list(urls), spec, train
        self.buckets = buckets
        self.assigner = assigner or (Assigner(buckets, spec.stride) if buckets else None)
        # per bucket: the clip spec at its shape, or (a stale-encode cache) the LatentSpec of its moments
        self.bucket_specs = bucket_specs or (bucketing.bucket_specs(spec, buckets) if buckets else None)
        # shared int64 (workers, sum of batch sizes): stream positions of the clips in partly filled buckets at
        # the round start (-1 = none), written by TrainLoader before the workers start
        self.pending: torch.Tensor | None = None
        self.batch_size, self.num_classes, self.label_key = batch_size, num_classes, label_key
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.control = control  # shared int64 [epoch, skip for worker 0, skip for worker 1, ...] (training)
        self.released: torch.Tensor | None = None  # shared int64 (workers, RING): buffer generations handed back
        self.split = "train" if train else "val"
        self.captions, self.text_members = captions, text_members

    # -- samples -------------------------------------------------------------------------------------

    def _resampled(self, epoch: int, worker: int, counter: SkipCounter) -> Iterator[dict]:
        rng = random.Random(_seed(self.seed, 1, epoch, self.rank, worker))
        dry, limit = 0, max(STALL_SHARDS, 2 * len(self.urls))
        while True:
            url = rng.choice(self.urls)
            n = yield from read_shard(url, counter)
            dry = 0 if n else dry + 1
            if dry >= limit:
                raise DataHealthError(
                    f"rank {self.rank} worker {worker}: the last {dry} shards opened held no "
                    f"sample, e.g. {url}. Check data.shards (and pipe: commands by hand)."
                )

    def _validation(self, worker: int, workers: int, counter: SkipCounter) -> Iterator[dict]:
        slots, slot = self.world_size * workers, self.rank * workers + worker
        if len(self.urls) >= slots:  # split the shard list: each shard read by exactly one worker
            for url in self.urls[slot::slots]:
                yield from read_shard(url, counter)
        else:  # fewer shards than slots: everyone reads everything, keeps every slots-th sample
            i = 0
            for url in self.urls:
                for sample in read_shard(url, counter, count_shard_errors=slot == 0):
                    if i % slots == slot:
                        yield sample
                    i += 1

    # -- the stream ----------------------------------------------------------------------------------

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter(self.split)
        if self.train:
            epoch, skip = int(self.control[0]), int(self.control[1 + worker])
            samples = self._resampled(epoch, worker, counter)
            initial = max(1, self.shuffle_buffer // 2)
            rng = random.Random(_seed(self.seed, 2, epoch, self.rank, worker))
            if self.shuffle_buffer > 1:
                samples = wds.shuffle(self.shuffle_buffer, initial, rng=rng)(samples)
        else:
            epoch, skip = 0, 0
            samples = self._validation(worker, workers, counter)
        counter.muted = skip > 0  # replaying what was consumed before a resume: already counted
        if self.buckets:
            yield from self._bucketed(samples, worker, epoch, skip, counter)
            return
        b = self.batch_size
        ring = _Ring(self.released[worker] if self.released is not None and info is not None else None)
        video, slot = self._new_batch(ring)  # clips are decoded straight into it (None when the size is not fixed)
        clips, labels, keys, texts = [], [], [], []
        streak = Counter()  # skips by reason since the last clip that decoded
        for i, sample in enumerate(samples):
            if i < skip:
                counter.muted = i < skip - 1
                continue
            # per-sample RNG from the sample's position: skipping samples on resume leaves the rest as they were
            rng = random.Random(sample_seed(self.seed, epoch, self.rank, worker, i))
            try:
                text = self._text(sample, counter)  # before decoding: a clip skipped for its caption is not decoded
                clip, label = decode_sample(
                    sample,
                    self.spec,
                    rng,
                    self.label_key,
                    self.num_classes,
                    None if video is None else video[len(labels)].numpy(),
                )
            except Skip as e:
                self._skipped(counter, streak, e, sample, worker)
                continue
            streak.clear()
            if video is None:
                clips.append(clip)
            labels.append(label)
            keys.append(sample.get("__key__", "?"))
            texts.append(text)
            if len(labels) == b:
                yield self._batch(video, slot, clips, labels, keys, worker, epoch, i + 1, counter, texts)
                video, slot = self._new_batch(ring)
                clips, labels, keys, texts = [], [], [], []
        if labels or counter.reasons:  # finite (validation) stream: the rest, and the last counts
            yield self._batch(video, slot, clips, labels, keys, worker, epoch, -1, counter, texts)

    def _skipped(self, counter: SkipCounter, streak: Counter, e: Skip, sample: dict, worker: int) -> None:
        """Count a skipped sample; a training stream that only skips (STALL_SAMPLES in a row) stops with the reasons."""
        counter.skip(e.reason, sample.get("__url__", "?"), e)
        streak[e.reason] += 1
        if self.train and streak.total() >= STALL_SAMPLES:
            raise DataHealthError(
                all_skipped(f"rank {self.rank} worker {worker}", streak, e, "data.", self.label_key, in_a_row=True)
            ) from None

    def _text(self, sample: dict, counter: SkipCounter):
        """The clip's caption (a string), its cached (embedding, mask) arrays, or None without captions."""
        if self.captions is None:
            return None
        if self.text_members is None:
            return sample_caption(sample, self.captions, counter)
        try:
            return tuple(np.load(io.BytesIO(sample[m]), allow_pickle=False) for m in self.text_members)
        except (KeyError, ValueError, OSError, EOFError) as e:
            raise Skip(
                "bad_latent",
                f"{sample.get('__key__', '?')}: cached caption {self.text_members} "
                f"missing or unreadable ({type(e).__name__}: {e})",
            ) from None

    def _bucketed(self, samples, worker: int, epoch: int, skip: int, counter: SkipCounter):
        """One partly filled batch per bucket; yields whichever fills first. A finite (validation) stream ends with
        the partly filled ones."""
        resume = set()
        if skip and self.pending is not None:
            resume = {int(p) for p in self.pending[worker].tolist() if p >= 0}
        partial = {}  # bucket index -> (video, labels, keys, positions, captions)
        streak = Counter()
        for i, sample in enumerate(samples):
            counter.muted = i < skip - 1  # replayed samples were counted before the checkpoint
            if i < skip and i not in resume:  # consumed before the checkpoint and not in a partly filled bucket
                continue
            rng = random.Random(_seed(self.seed, 5, epoch, self.rank, worker, i))
            try:
                text = self._text(sample, counter)  # before decoding, as without buckets
                k = self.assigner.place(sample, rng, self.label_key, self.num_classes)
                if k == -1:  # thinned out by data.image_share
                    continue
                bucket = self.buckets[k]
                if k not in partial:
                    shape_out, dtype = batch_layout(self.bucket_specs[k], bucket.batch_size)
                    partial[k] = (
                        _shared(shape_out, dtype)
                        if get_worker_info() is not None
                        else torch.empty(shape_out, dtype=dtype),
                        [],
                        [],
                        [],
                        [],
                    )
                video, labels, keys, positions, texts = partial[k]
                clip_rng = random.Random(sample_seed(self.seed, epoch, self.rank, worker, i))
                _, label = decode_sample(
                    sample, self.bucket_specs[k], clip_rng, self.label_key, self.num_classes, video[len(labels)].numpy()
                )
            except Skip as e:
                self._skipped(counter, streak, e, sample, worker)
                continue
            streak.clear()
            labels.append(label)
            keys.append(sample.get("__key__", "?"))
            positions.append(i)
            texts.append(text)
            if len(labels) == bucket.batch_size and i >= skip:
                del partial[k]
                pending = sorted(p for _, _, _, ps, _ in partial.values() for p in ps)
                meta = {
                    "worker": worker,
                    "epoch": epoch,
                    "consumed": i + 1,
                    "keys": keys,
                    "skips": counter.take(),
                    "slot": None,
                    "pending": pending,
                    "bucket": bucket.name,
                    "text": self._texts(texts),
                }
                yield video, torch.tensor(labels, dtype=torch.int64), meta
        for n, k in enumerate(sorted(partial)):  # finite stream: the rest of every bucket, and the last counts
            video, labels, keys, _, texts = partial[k]
            meta = {
                "worker": worker,
                "epoch": epoch,
                "consumed": -1,
                "keys": keys,
                "skips": counter.take(),
                "slot": None,
                "pending": [],
                "bucket": self.buckets[k].name,
                "text": self._texts(texts),
            }
            yield video[: len(labels)], torch.tensor(labels, dtype=torch.int64), meta
        if not partial and counter.reasons:
            yield (
                None,
                None,
                {"worker": worker, "epoch": epoch, "consumed": -1, "keys": [], "skips": counter.take(), "slot": None},
            )

    def _new_batch(self, ring: "_Ring") -> tuple[torch.Tensor | None, tuple | None]:
        """uint8 (B, C, T, H, W) (float32 latent moments with a LatentSpec), in shared memory inside a worker so
        that sending it costs no copy."""
        layout = batch_layout(self.spec, self.batch_size)
        if layout is None:
            return None, None
        shape, dtype = layout
        if get_worker_info() is None:
            return torch.empty(shape, dtype=dtype), None
        return ring.take(shape, dtype)

    def _texts(self, texts: list):
        """A batch's captions (stack_text), or None when the stream reads none."""
        return stack_text(texts) if self.captions is not None and texts else None

    def _batch(self, video, slot, clips, labels, keys, worker, epoch, consumed, counter, texts=()):
        meta = {
            "worker": worker,
            "epoch": epoch,
            "consumed": consumed,
            "keys": keys,
            "skips": counter.take(),
            "slot": slot,
            "text": self._texts(texts) if labels else None,
        }
        if not labels:
            return None, None, meta
        if video is None:  # size=None: clips of the stored size, stacked here
            t, h, w, c = clips[0].shape
            video = torch.empty((len(clips), c, t, h, w), dtype=torch.uint8)
            for j, clip in enumerate(clips):
                video[j] = torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2)
        return video[: len(labels)], torch.tensor(labels, dtype=torch.int64), meta


def batch_layout(spec, batch_size: int) -> tuple[tuple, torch.dtype] | None:
    """(shape, dtype) of a batch of `spec`'s clips: uint8 (B, 3, T, H, W) pixels, float32 moments for a LatentSpec;
    None when the spec keeps each stored size (the clips are stacked as they come)."""
    latent = getattr(spec, "batch_shape", None)
    if latent is not None:
        return (batch_size, *latent), torch.float32
    h, w = (spec.height, spec.width) if spec.height is not None else (spec.size, spec.size)
    if h is None:
        return None
    return (batch_size, 3, spec.frames, h, w), torch.uint8


def stack_text(texts: list):
    """Per-clip captions -> the batch's: a list of strings, or cached (embedding, mask) arrays stacked as tensors."""
    if not texts or isinstance(texts[0], str):
        return list(texts)
    return (
        torch.from_numpy(np.stack([t[0] for t in texts])).float(),
        torch.from_numpy(np.stack([t[1] for t in texts])).bool(),
    )


def take_text(text, idx: list[int]):
    """The captions of a batch at positions idx (either kind)."""
    if text is None:
        return None
    if isinstance(text, list):
        return [text[i] for i in idx]
    index = torch.as_tensor(idx, dtype=torch.long)
    return tuple(t.index_select(0, index) for t in text)


def concat_text(texts: list):
    if texts[0] is None:
        return None
    if isinstance(texts[0], list):
        return [c for t in texts for c in t]
    return tuple(torch.cat(parts) for parts in zip(*texts))


RING = 6  # shared batch buffers per training worker: more than the batches a worker can have in flight


def _shared(shape, dtype=torch.uint8) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class _Ring:
    """A worker's shared-memory batch buffers, reused once the main process hands them back.

    A fresh shared buffer costs its page faults on every batch (11 ms CPU for a 12.6 MB batch of
    16 x 16 x 128 x 128 clips, as much as decoding three of them). The main process copies each training
    batch out (it mixes or pins it anyway) and then writes the buffer's generation into `released`;
    a worker reuses a buffer only when its last generation came back, and otherwise makes a new one,
    so it never waits and never overwrites a batch still in use.
    """

    def __init__(self, released: torch.Tensor | None):
        self.released = released  # this worker's row of the shared (workers, RING) tensor, or None: no reuse
        self.buffers: list = [None] * RING
        self.handed: list[int] = [0] * RING  # generation last handed out, per slot
        self.next = 0

    def take(self, shape, dtype=torch.uint8) -> tuple[torch.Tensor, tuple | None]:
        if self.released is None:
            return _shared(shape, dtype), None
        k = self.next
        self.next = (k + 1) % RING
        buf = self.buffers[k]
        if buf is None or tuple(buf.shape) != tuple(shape) or int(self.released[k]) != self.handed[k]:
            buf = self.buffers[k] = _shared(shape, dtype)  # first use, or the main process still holds the old one
        self.handed[k] += 1
        return buf, (k, self.handed[k])


class _Loader:
    """A DataLoader over a VideoStream; batches come out as (video, label), metadata stripped."""

    split = "train"

    def __init__(
        self,
        stream: VideoStream,
        health: DataHealth,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int | None,
        persistent_workers: bool,
    ):
        self.stream, self.health, self.num_workers = stream, health, num_workers
        self._live = None  # the running DataLoader iterator
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.dataloader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    # Lightning's teardown stops workers through `loader._iterator` (combined_loader.py): expose the live one.
    @property
    def _iterator(self):
        return self._live

    @_iterator.setter
    def _iterator(self, value):
        if value is None:
            self._live = self.dataloader._iterator = None

    def _start(self):
        self._live = iter(self.dataloader)
        return self._live

    def close(self) -> None:
        """Stop the worker processes now (Lightning's teardown does the same through `_iterator`).

        Do this rather than leave it to the garbage collector: when the loader sits in a reference
        cycle, the collector closes the workers' queues before the DataLoader's __del__ can tell the
        workers to stop, and each worker then costs a 5 s join timeout.
        """
        it = getattr(self, "_live", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._live = self.dataloader._iterator = None

    def iter_meta(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        raise NotImplementedError

    def __iter__(self):
        """(video, label) batches; with captions (model.cond=text) (video, label, text)."""
        for video, label, meta in self.iter_meta():
            yield (video, label) if meta.get("text") is None else (video, label, meta["text"])


class ValLoader(_Loader):
    """Finite: each validation clip once across ranks and workers."""

    split = "val"

    def iter_meta(self):
        try:
            for video, label, meta in self._start():
                self.health.add("val", 0 if label is None else len(label), meta["skips"])
                if video is not None:
                    yield video, label, meta
        finally:  # finished, or dropped early (limit_val_batches): stop the workers now
            self.close()


class TrainLoader(_Loader):
    """Endless resampled stream cut into epochs of `epoch_batches`, mixed across workers, resumable."""

    def __init__(
        self,
        stream: VideoStream,
        health: DataHealth,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int | None,
        persistent_workers: bool,
        epoch_batches: int,
        mix: bool = True,
    ):
        if epoch_batches < 1:
            raise ValueError(f"data.epoch_batches={epoch_batches} must be >= 1")
        self.workers = max(1, num_workers)
        self.mix = mix and self.workers > 1 and not stream.buckets  # bucket batches differ in shape
        # With workers, every batch is copied out of the worker's shared buffer (mixed across workers, or
        # not), straight into pinned memory when asked: the DataLoader's own pinning would copy again.
        self.copy_out = num_workers > 0
        super().__init__(
            stream, health, num_workers, pin_memory and not self.copy_out, prefetch_factor, persistent_workers
        )
        self.pin_out = pin_memory and self.copy_out and torch.cuda.is_available()
        self.epoch_batches = epoch_batches
        stream.control = torch.zeros(1 + self.workers, dtype=torch.int64).share_memory_()
        stream.released = torch.zeros((self.workers, RING), dtype=torch.int64).share_memory_()
        if stream.buckets:
            most = sum(b.batch_size for b in stream.buckets)
            stream.pending = torch.full((self.workers, most), -1, dtype=torch.int64).share_memory_()
        self.state = self._fresh(epoch=0)

    def with_epoch(self, batches: int) -> "TrainLoader":
        """WebDataset's name for it: one epoch is `batches` batches on every rank."""
        self.epoch_batches = batches
        return self

    def _fresh(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "batches": 0,
            "round": 0,
            "round_start": [0] * self.workers,
            "round_yielded": 0,
            "round_pending": [[] for _ in range(self.workers)],
        }

    def _fingerprint(self) -> dict:
        d = self.stream
        return {
            "workers": self.workers,
            "batch_size": d.batch_size,
            "world_size": d.world_size,
            "rank": d.rank,
            "seed": d.seed,
            "epoch_batches": self.epoch_batches,
            "mix": self.mix,
            "shuffle_buffer": d.shuffle_buffer,
            **(
                {"buckets": [list(dataclasses.astuple(b)) for b in d.buckets], "bucket_rule": d.assigner.rule()}
                if d.buckets
                else {}
            ),
        }

    def __len__(self) -> int:
        return self.epoch_batches

    def state_dict(self) -> dict:
        st = self.state
        own = {
            **st,
            "round_start": list(st["round_start"]),
            "round_pending": [list(p) for p in st["round_pending"]],
            "config": self._fingerprint(),
            "health": self.health.state_dict(),
        }
        # every process, not only every data rank: under sequence parallelism (stale/parallel/mesh.py) several
        # processes share one data rank, and all of them take part in the collective
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else self.stream.world_size
        if world > 1 and dist:
            ranks = [None] * world  # every rank builds the checkpoint dict; only rank 0 writes it
            torch.distributed.all_gather_object(ranks, own)
            return {"ranks": ranks}
        return own

    def load_state_dict(self, state: dict) -> None:
        if "ranks" in state:  # a DDP checkpoint: take this data rank's part (the processes' list, in rank order)
            ranks, rank = state["ranks"], self.stream.rank
            mine = [s for s in ranks if (s.get("config") or {}).get("rank") == rank]
            state = (
                mine[0]
                if mine
                else ranks[rank]
                if rank < len(ranks)
                else {"config": None, "epoch": ranks[0].get("epoch", 0)}
            )
        self.health.load_state_dict(state.get("health", {}))
        fp = self._fingerprint()
        if state.get("config") != fp:
            saved = state.get("config") or {}
            changed = {k: (saved.get(k), v) for k, v in fp.items() if saved.get(k) != v}
            rule = (
                " The bucket list or its rule changed: clips would land in other buckets, so the partly "
                "filled buckets are dropped and the new buckets start empty."
                if {"buckets", "bucket_rule"} & set(changed)
                else ""
            )
            log.warning(
                "data loader changed since the checkpoint (%s): resuming at the start of the next "
                "epoch instead of the exact position.%s",
                changed,
                rule,
            )
            self.state = self._fresh(epoch=int(state.get("epoch", 0)) + 1)
            return
        self.state = {k: state[k] for k in ("epoch", "batches", "round", "round_yielded")}
        self.state["round_start"] = list(state["round_start"])
        self.state["round_pending"] = [list(p) for p in state.get("round_pending", [[]] * self.workers)]

    def _mix(self, items: list, epoch: int, rnd: int) -> list:
        """Copy the round's batches out of the workers' buffers, shuffling samples across them when mixing."""
        if not self.copy_out:
            return items
        d = self.stream
        if self.mix:
            video = torch.cat([it[0] for it in items])  # (W*B, C, T, H, W)
            label = torch.cat([it[1] for it in items])
            keys = [k for it in items for k in it[2]["keys"]]
            text = concat_text([it[2].get("text") for it in items])
            perm = torch.from_numpy(np.random.default_rng([d.seed, 3, epoch, rnd, d.rank]).permutation(len(label)))
            parts = [
                (video, label, keys, text, perm[j * d.batch_size : (j + 1) * d.batch_size]) for j in range(len(items))
            ]
        else:
            parts = [(it[0], it[1], it[2]["keys"], it[2].get("text"), None) for it in items]
        out = []
        for video, label, keys, text, idx in parts:
            n = len(label) if idx is None else len(idx)
            v = torch.empty((n, *video.shape[1:]), dtype=video.dtype, pin_memory=self.pin_out)
            if idx is None:
                v.copy_(video)
            else:
                torch.index_select(video, 0, idx, out=v)
                label, keys, text = label[idx], [keys[i] for i in idx.tolist()], take_text(text, idx.tolist())
            out.append((v, label.clone(), {"keys": keys, "epoch": epoch, "round": rnd, "text": text}))
        for _, _, meta in items:  # the copies are made: the workers may reuse their buffers
            if meta.get("slot") is not None:
                k, generation = meta["slot"]
                d.released[meta["worker"], k] = generation
        return out

    def iter_meta(self):
        st = self.state
        if st["batches"] >= self.epoch_batches:
            st.update(self._fresh(epoch=st["epoch"] + 1))
        resume_skip = st["round_yielded"]  # > 0 only when resuming mid-round
        control = self.stream.control
        control[0] = st["epoch"]
        control[1:] = torch.tensor(st["round_start"], dtype=torch.int64)
        pending = self.stream.pending
        if pending is not None:
            pending.fill_(-1)
            for j, ps in enumerate(st["round_pending"]):
                pending[j, : len(ps)] = torch.tensor(ps, dtype=torch.int64)
        it = self._start()
        pos = list(st["round_start"])
        pend = [list(p) for p in st["round_pending"]]
        w = self.workers
        while st["batches"] < self.epoch_batches:
            items = [next(it) for _ in range(w)]  # the DataLoader serves workers round-robin
            for j, (_, label, meta) in enumerate(items):
                assert meta["worker"] == j, f"batch from worker {meta['worker']} where worker {j} was due"
                pos[j] = meta["consumed"]
                pend[j] = list(meta.get("pending", ()))
                if not resume_skip:  # a resumed round was counted before the checkpoint
                    self.health.add("train", len(label), meta["skips"], meta.get("bucket"))
            for j, batch in enumerate(self._mix(items, st["epoch"], st["round"])):
                if j < resume_skip:
                    continue
                if st["batches"] >= self.epoch_batches:
                    break
                st["round_yielded"], st["batches"] = j + 1, st["batches"] + 1
                yield batch
            resume_skip = 0
            st["round"], st["round_start"], st["round_yielded"] = st["round"] + 1, list(pos), 0
            st["round_pending"] = [list(p) for p in pend]
