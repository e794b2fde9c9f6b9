"""Buckets: clips of many shapes trained in batches of one shape each (docs/buckets.md).

A bucket is (frames, height, width, batch_size, keep_prob). `data.buckets` is a preset name (PRESETS) or a
list of buckets; every batch the loader makes holds clips of one bucket's shape. A clip of (T, h, w) (the shape its
.json records) goes to the largest bucket it *fits* (enough frames, scaled up at most `max_upscale` and cropped by
at most `max_crop` to cover the bucket), kept there with that bucket's `keep_prob`, else offered to the next largest;
`image_share` thins images or videos to a share of the clips (from `scan`'s counts). The draws are seeded by the
sample's place in the stream, so a resumed run puts every clip in the same bucket again. A stale-encode cache
names each clip's bucket in its .json, which `CacheAssigner` reads instead of fitting the clip again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)


class BucketError(ValueError):
    """A bad bucket list; the message names data.buckets and the value."""


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    batch_size: int
    keep_prob: float = 1.0  # probability of keeping a clip that fits here rather than offering it to a smaller bucket

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def pixels(self) -> int:
        return self.frames * self.height * self.width


def _ladder(frames_batch: dict[int, int], shapes: Iterable[tuple[int, int]]) -> list[list]:
    return [[t, h, w, b] for t, b in frames_batch.items() for h, w in shapes]


# Named bucket lists. Shapes are about the same pixel area (square, landscape ~16:9 and portrait ~9:16 on the
# grid stale-shards' resize=aspect uses by default), batch sizes keep about the same pixels per batch.
PRESETS: dict[str, list[list]] = {
    # stale-shards' defaults (size=64, grid=16): 64x64, 48x80 and 80x48; images and 8, 16, 32-frame clips
    "default": _ladder({1: 64, 8: 8, 16: 4, 32: 2}, [(64, 64), (48, 80), (80, 48)]),
    # the tests' and CPU smoke runs' clips (stale-shards size=16 grid=4): 16x16, 12x20, 20x12
    "smoke": _ladder({1: 8, 4: 4, 8: 2}, [(16, 16), (12, 20), (20, 12)]),
    # stale-shards size=256 grid=16: 256x256, 192x336, 336x192
    "256": _ladder({1: 32, 16: 4, 32: 2, 64: 1}, [(256, 256), (192, 336), (336, 192)]),
}


def parse_buckets(value, patch: tuple | None = None, key: str = "data.buckets") -> list[Bucket] | None:
    """A preset name or a list of [frames, height, width, batch_size(, keep_prob)] / dicts -> Buckets, checked.

    patch (pt, ph, pw) in pixels: every bucket's clip must be divisible by it (the model's grid)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in PRESETS:
            raise BucketError(
                f"{key}={value!r} is not a preset ({', '.join(sorted(PRESETS))}) nor a list of "
                "[frames, height, width, batch_size, keep_prob]"
            )
        value = PRESETS[value]
    if not isinstance(value, (list, tuple)) or not value:
        raise BucketError(f"{key}={value!r} must be a preset name or a non-empty list of buckets")
    out = []
    for i, b in enumerate(value):
        try:
            bucket = Bucket(**b) if isinstance(b, dict) else Bucket(*b)
        except TypeError as e:
            raise BucketError(
                f"{key}[{i}]={b!r}: a bucket is [frames, height, width, batch_size(, keep_prob)] or "
                f"a dict of those keys ({e})"
            ) from None
        ints = (bucket.frames, bucket.height, bucket.width, bucket.batch_size)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ints):
            raise BucketError(f"{key}[{i}]={b!r}: frames, height, width and batch_size must be integers >= 1")
        if not 0 < bucket.keep_prob <= 1:
            raise BucketError(f"{key}[{i}]={b!r}: keep_prob={bucket.keep_prob} must be in (0, 1]")
        if patch is not None and (bucket.frames % patch[0] or bucket.height % patch[1] or bucket.width % patch[2]):
            raise BucketError(f"{key}[{i}]: the bucket {bucket.name} is not divisible by model.patch={list(patch)}")
        out.append(bucket)
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BucketError(f"{key}: bucket shapes listed twice: {dup}")
    return out


def check_rule(max_crop: float, max_upscale: float, prefix: str = "data.") -> None:
    """The fit rule's bounds (BucketError naming the keys): a crop share in [0, 1), an upscale factor >= 1."""
    if not 0 <= max_crop < 1 or max_upscale < 1:
        raise BucketError(
            f"{prefix}bucket_max_crop={max_crop} must be in [0, 1) and {prefix}bucket_max_upscale={max_upscale} >= 1"
        )


def fits(
    bucket: Bucket, frames: int, h: int, w: int, stride: int = 1, max_crop: float = 0.25, max_upscale: float = 1.0
) -> bool:
    """Whether a clip of (frames, h, w) fits the bucket (the rule in the module docstring)."""
    if frames < (bucket.frames - 1) * stride + 1:
        return False
    scale = max(bucket.height / h, bucket.width / w)  # resize to cover the bucket
    if scale > max_upscale * (1 + 1e-6):
        return False
    return bucket.height * bucket.width >= (1 - max_crop) * (h * scale) * (w * scale) * (1 - 1e-6)


def thinned(keep: tuple[float, float], image: bool, rng: random.Random) -> bool:
    """image_share's draw: whether a clip of this kind (an image, else a video) is dropped; keep is (p keep an
    image, p keep a video), and (1, 1) draws nothing."""
    p = keep[0] if image else keep[1]
    return p < 1 and rng.random() >= p


class Assigner:
    """Puts clips into buckets: `assign(frames, h, w, rng)` -> bucket index or None (fits none)."""

    def __init__(
        self,
        buckets: list[Bucket],
        stride: int = 1,
        max_crop: float = 0.25,
        max_upscale: float = 1.0,
        keep: tuple[float, float] = (1.0, 1.0),
    ):
        self.buckets, self.stride, self.max_crop, self.max_upscale = buckets, stride, max_crop, max_upscale
        self.keep = keep  # (p keep an image, p keep a video): image_share's thinning; (1, 1) keeps every clip
        self.order = sorted(range(len(buckets)), key=lambda i: (-buckets[i].pixels, i))  # largest first

    def fitting(self, frames: int, h: int, w: int) -> list[int]:
        return [
            i for i in self.order if fits(self.buckets[i], frames, h, w, self.stride, self.max_crop, self.max_upscale)
        ]

    def assign(self, frames: int, h: int, w: int, rng: random.Random) -> int | None:
        """The bucket index of a clip, or None when it fits none; -1 when image_share thins it out."""
        if thinned(self.keep, frames == 1, rng):
            return -1
        fitting = self.fitting(frames, h, w)
        if not fitting:
            return None
        for i in fitting[:-1]:
            if rng.random() < self.buckets[i].keep_prob:
                return i
        return fitting[-1]

    def largest(self, frames: int, h: int, w: int) -> int | None:
        """The largest bucket the clip fits, keep_prob and image_share aside (stale-encode's rule: a cache stores
        each clip once), or None."""
        fitting = self.fitting(frames, h, w)
        return fitting[0] if fitting else None

    def rule(self) -> list:
        """What decides a clip's bucket besides the list, for the loader's resume fingerprint."""
        return [self.stride, self.max_crop, self.max_upscale, list(self.keep)]

    def place(
        self,
        sample: dict,
        rng: random.Random,
        label_key: str | None = "label",
        num_classes: int | None = None,
        largest: bool = False,
    ) -> int:
        """The bucket index of a sample from the shape its .json records (else its mp4 header): `assign`, or with
        largest=True `largest`; -1 when image_share thins it out. Raises Skip: no_bucket when it fits none, and
        when its shape cannot be read, the sample check's reason (bad .json, label) or else corrupt_video."""
        from stale.data.reader import Skip, check_sample, sample_name

        shape = clip_shape(sample)
        if shape is None:
            check_sample(sample, label_key, num_classes)
            raise Skip("corrupt_video", f"{sample_name(sample)}: cannot read the clip's shape")
        k = self.largest(*shape) if largest else self.assign(*shape, rng)
        if k is None:
            raise Skip(
                "no_bucket",
                f"{sample_name(sample)}: a clip of (T, H, W) = {shape} fits no bucket (largest "
                f"first: {', '.join(self.buckets[i].name for i in self.order)})",
            )
        return k


class CacheAssigner:
    """The buckets of a stale-encode cache: each sample's .json names the bucket its latent was encoded at
    (stale-encode applied the fit rule once), so training reads the name instead of fitting the clip again.
    keep: image_share's (p keep an image, p keep a video), by the kind the clip trains as: a one-frame bucket's
    clips are images (a video's frame there too: the cache stores what trains, not the source's kind)."""

    def __init__(self, buckets: list[Bucket], member: str = "latent.npy", keep: tuple[float, float] = (1.0, 1.0)):
        self.buckets, self.member, self.keep = buckets, member, keep
        self.index = {b.name: i for i, b in enumerate(buckets)}

    def rule(self) -> list:
        return ["cache", list(self.keep)]

    def place(
        self, sample: dict, rng: random.Random, label_key: str | None = "label", num_classes: int | None = None
    ) -> int:
        """The index of the bucket the sample's .json names; a bad .json or label is named as such by the sample
        check, a missing or unknown bucket name is a bad_latent (the sample does not match the cache's info.json)."""
        from stale.data.reader import Skip, check_sample, sample_name

        check_sample(sample, label_key, num_classes, member=self.member)
        name = json.loads(sample["json"]).get("bucket") if "json" in sample else None
        if name not in self.index:
            raise Skip(
                "bad_latent",
                f"{sample_name(sample)}: .json names the bucket {name!r}, not one of the cache's "
                f"info.json {list(self.index)}",
            )
        k = self.index[name]
        return -1 if thinned(self.keep, self.buckets[k].frames == 1, rng) else k


def bucket_specs(spec, buckets: list[Bucket]) -> list:
    """Each bucket's clip spec: `spec` (its start, crop, stride, fps, flip) at the bucket's frames x height x width."""
    return [dataclasses.replace(spec, frames=b.frames, height=b.height, width=b.width, size=None) for b in buckets]


def share_keep(images: int, videos: int, share: float | None) -> tuple[float, float]:
    """(p keep an image, p keep a video) so that about `share` of the kept clips are images, thinning only
    the kind there is too much of; (1, 1) when share is None or one kind is absent."""
    if share is None or images == 0 or videos == 0:
        return 1.0, 1.0
    have = images / (images + videos)
    if have > share:  # too many images: keep images with p so that p I / (p I + V) = share
        return (share * videos / ((1 - share) * images)), 1.0
    return 1.0, ((1 - share) * images / (share * videos)) if share > 0 else 1.0


def sample_shape(sample: dict) -> tuple[int, int, int] | None:
    """(frames, height, width) of a sample from its .json (stale-shards writes them), or None when absent."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    shape = tuple(meta.get(k) for k in ("frames", "height", "width"))
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        return shape
    return None


def probe_shape(sample: dict) -> tuple[int, int, int] | None:
    """(frames, height, width) from the mp4's header, for shards whose .json does not record it."""
    import io

    import av

    try:
        with av.open(io.BytesIO(sample["mp4"]), mode="r", format="mp4") as c:
            s = c.streams.video[0]
            return (s.frames or 0), s.height, s.width
    except Exception:  # noqa: BLE001 - an unreadable clip is the decoder's to count
        return None


def clip_shape(sample: dict) -> tuple[int, int, int] | None:
    return sample_shape(sample) or (probe_shape(sample) if "mp4" in sample else None)


@dataclass
class Scan:
    """What `scan` found: clips per bucket (largest fit, before keep_prob), clips fitting none, images, videos."""

    per_bucket: dict
    no_bucket: int
    images: int
    videos: int
    clips: int


def scan(urls: list[str], assigner: Assigner) -> Scan:
    """Read every sample's .json once (no decoding; the tar is read through) and count where clips would go."""
    from stale.data.reader import SkipCounter, read_shard

    counter = SkipCounter("bucket-scan", log_first=0)
    per, none, images, videos, n = Counter(), 0, 0, 0, 0
    for url in urls:
        for sample in read_shard(url, counter):
            shape = clip_shape(sample)
            if shape is None:
                continue
            n += 1
            images, videos = images + (shape[0] == 1), videos + (shape[0] != 1)
            fitting = assigner.fitting(*shape)
            if fitting:
                per[assigner.buckets[fitting[0]].name] += 1
            else:
                none += 1
    return Scan({b.name: per[b.name] for b in assigner.buckets}, none, images, videos, n)


def report(found: Scan, buckets: list[Bucket]) -> list[str]:
    """The scan's warnings, one line each: the buckets with less data than one batch (all of them in one line),
    and the clips that fit no bucket."""
    empty = [b.name for b in buckets if found.per_bucket.get(b.name, 0) == 0]
    few = [
        f"{b.name} ({found.per_bucket[b.name]} of a batch of {b.batch_size})"
        for b in buckets
        if 0 < found.per_bucket.get(b.name, 0) < b.batch_size
    ]
    out = []
    if empty or few:
        parts = []
        if empty:
            parts.append(
                f"no clip has {', '.join(empty)} as its largest bucket (they get clips only through the "
                "keep_prob of larger buckets)"
            )
        if few:
            parts.append(
                f"fewer clips than one batch fit {', '.join(few)} (their batches repeat clips: the stream resamples)"
            )
        out.append(
            f"{len(empty) + len(few)} of {len(buckets)} buckets have less data than one batch: "
            + "; ".join(parts)
            + ". Lower their batch_size or drop them from data.buckets"
        )
    if found.no_bucket:
        out.append(
            f"{found.no_bucket} of {found.clips} clips fit no bucket of data.buckets and are skipped "
            "(counted as no_bucket): add a bucket of their shape or lower a bucket's frames"
        )
    return out
