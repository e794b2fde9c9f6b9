"""Reading WebDataset shards of mp4 clips, for every tool: training, stale-eval and stale-contamination.

One module, no Lightning: shard patterns (`expand_shards`), tar members grouped into samples (`read_shard`), one
parsing rule for a sample's .json, label and video (`check_sample`, `decode_sample`) and one skip-and-count rule
(`SkipCounter`, `REASONS`): a bad sample or shard is skipped and counted by reason, never raised, and when nothing
decodes the error names the likely fix (`all_skipped`). A sample is `<key>.mp4` + optional `<key>.json` (its
`label_key` the integer label) or `<key>.cls`; video2dataset rows whose status is not "success" are skipped as
`failed_row`; a latent sample (docs/latent.md) has `<key>.latent.npy` instead and is read with a `LatentSpec`.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import tarfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from stale.data.video_io import ClipSpec, ClipTooShort, VideoDecodeError, decode_clip

log = logging.getLogger(__name__)


# --- shard patterns ----------------------------------------------------------------------------------


class ShardError(ValueError):
    """Bad shard configuration: the message names the pattern or file."""


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_shards(shards: str | list[str], key: str = "data.shards") -> list[str]:
    """Expand patterns into shard URLs and check local ones exist, before any reading starts.

    Accepts a brace pattern, a `::`-separated string, a list, a folder (its *.tar files) or a glob.
    A missing local shard is a ShardError (a typo in the pattern should not become a silent skip);
    an empty (0-byte) one only warns: the reader counts it as an `empty_shard` and carries on.
    """
    if shards is None or (isinstance(shards, str) and not shards.strip()):
        raise ShardError(f"{key} is empty: set {key}=/path/to/train-{{000000..000009}}.tar")
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(str(pattern)):
            if not _is_remote(url) and os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar")))
                if not found:
                    raise ShardError(
                        f"{key}: folder {url} holds no *.tar shard (a folder of videos becomes shards with "
                        f"stale-shards input={url} out=SHARDS_DIR)"
                    )
                urls.extend(found)
            elif not _is_remote(url) and any(ch in url for ch in "*?["):
                found = sorted(glob.glob(url))
                if not found:
                    raise ShardError(f"{key}: glob {url!r} matches no file")
                urls.extend(found)
            else:
                urls.append(url[len("file:") :] if url.startswith("file:") else url)
    if not urls:
        raise ShardError(f"{key}={shards!r} expands to no shard")
    missing = [u for u in urls if not _is_remote(u) and not os.path.exists(u)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ShardError(
            f"shard not found: {', '.join(missing[:3])}{more} ({len(missing)} of {len(urls)} from {key}={shards!r})"
        )
    empty = [u for u in urls if not _is_remote(u) and os.path.getsize(u) == 0]
    if empty and len(empty) == len(urls):
        raise ShardError(f"every shard of {key}={shards!r} is empty (0 bytes), e.g. {empty[0]}")
    for u in empty:
        log.warning("shard is empty (0 bytes): %s; it will be skipped and counted", u)
    return urls


# --- skips -------------------------------------------------------------------------------------------

# Why a sample (or a whole shard) was skipped. Fixed order: counts are summed over ranks as one vector.
REASONS = (
    "failed_row",  # video2dataset row with status != "success" (its download failed): no video
    "missing_mp4",  # no .mp4 member in the sample
    "bad_json",  # .json is not valid JSON (or not an object)
    "missing_label",  # no label under label_key (use label_key=null for unlabelled data)
    "bad_label",  # label is not an integer in [0, num_classes)
    "corrupt_video",  # the mp4 does not decode (truncated, damaged, not a video)
    "too_short",  # decodes, but has fewer frames than the clip needs
    "corrupt_shard",  # the tar stream breaks off or is damaged: the rest of that shard is lost
    "unreadable_shard",  # the shard cannot be opened (missing file, failed pipe: command, ...)
    "empty_shard",  # the shard opened fine but holds no sample
    "bad_latent",  # a latent cache sample whose .latent.npy is missing, unreadable or of another shape
    "no_bucket",  # the clip fits no bucket of data.buckets (stale/data/buckets.py)
    "missing_caption",  # model.cond=text with data.missing_caption=skip: no .txt and no .json caption
    "empty_caption",  # the same with data.missing_caption=empty: counted, but KEPT with the empty caption
)
SHARD_REASONS = {"corrupt_shard", "unreadable_shard", "empty_shard"}
# An empty shard holds no sample: it is counted and logged, but is not a skipped *sample*, so it stays out of
# the skip rate (with resampling it is drawn again and again and would inflate the rate without bound).
# A clip that fits no bucket is not bad data (the bucket list decides), so it stays out of the rate too; an empty
# caption is counted the same way: the clip is kept (data.missing_caption=empty), so it is no skip.
NO_SAMPLE = ("empty_shard", "no_bucket", "empty_caption")

# The likely fix when a reason accounts for every skip; {p} is the config prefix ("data." in training).
FIXES = {
    "failed_row": "every row is a failed video2dataset download (status != success): rerun the download or "
    "point {p}shards at shards that hold videos",
    "missing_mp4": "the samples have no .mp4 member: convert the videos with stale-shards",
    "bad_json": "the .json members do not parse as JSON objects: rewrite the shards",
    "missing_label": "no sample has a label under {p}label_key={label_key!r} (.json field) or a .cls member: "
    "unlabelled shards (video2dataset's) need {unlabelled}",
    "bad_label": "labels are not integers in [0, {p}num_classes): set {p}num_classes or {p}label_key",
    "corrupt_video": "the .mp4 members do not decode: check them with ffprobe or rewrite them with stale-shards",
    "too_short": "the clips have fewer frames than the run takes ({p}frames x {p}frame_stride, or {p}fps; a still "
    "image has one): set {p}frames or {p}frame_stride to what they hold{buckets}",
    "corrupt_shard": "the shards are damaged or cut short: download or write them again",
    "unreadable_shard": "the shards cannot be opened: check the paths and run pipe: commands by hand",
    "empty_shard": "the shards hold no sample",
    "bad_latent": "the latent samples do not match the cache's info.json: encode them again with stale-encode",
    "no_bucket": "no clip fits a bucket of {p}buckets: add buckets of the clips' shapes (their .json height, width "
    "and frames) or lower the buckets' frames",
    "missing_caption": "the samples have no caption (.txt, or 'caption' in .json): caption them, or set "
    "{p}missing_caption=empty to train them with the empty caption",
    "empty_caption": "the samples have no caption",
}


class Skip(Exception):
    """A sample that is skipped and counted, not raised: `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def likely_fix(reason: str, prefix: str = "data.", label_key: str | None = "label") -> str:
    """FIXES[reason] for the keys under `prefix` ("data." is training's data node, which also has buckets)."""
    training = prefix == "data."
    unlabelled = "data=video2dataset or data.label_key=null" if training else f"{prefix}label_key=null"
    buckets = (
        (
            ", or set data.buckets so that each length trains in a bucket of its own (the list stale-shards "
            "prints for its shards)"
        )
        if training
        else ""
    )
    return FIXES[reason].format(p=prefix, label_key=label_key, unlabelled=unlabelled, buckets=buckets)


def all_skipped(
    where: str,
    reasons: Counter,
    last: Skip | None,
    prefix: str = "data.",
    label_key: str | None = "label",
    in_a_row: bool = False,
) -> str:
    """The message when no sample decoded (in_a_row: since the last that did): the skips by reason, the
    likely fix (for the commonest reason), the last skip."""
    counts = ", ".join(f"{r}={n}" for r, n in reasons.most_common())
    top = reasons.most_common(1)[0][0] if reasons else "empty_shard"
    fix = likely_fix(top, prefix, label_key)
    tail = f" Last: [{last.reason}] {last}" if last is not None else ""
    row = " in a row" if in_a_row else ""
    return (
        f"{where}: {sum(reasons.values())} samples skipped{row}, none decoded. By reason: {counts}. "
        f"Likely fix: {fix}.{tail}"
    )


class SkipCounter:
    """Counts since the last `take()` (a loader worker hands them over with each batch), by reason and shard."""

    def __init__(self, split: str, log_first: int = 5):
        self.split = split
        self.log_first = log_first  # log the first few skips per reason, then only count
        self.logged: Counter = Counter()
        self.muted = False  # set while fast-forwarding on resume: those skips were counted before
        self._reset()

    def _reset(self):
        self.reasons: Counter = Counter()
        self.shards: dict[str, Counter] = defaultdict(Counter)

    def skip(self, reason: str, url: str, detail: object = "") -> None:
        if self.muted:
            return
        assert reason in REASONS, reason
        self.reasons[reason] += 1
        self.shards[url][reason] += 1
        if self.logged[reason] < self.log_first:
            self.logged[reason] += 1
            more = " (further skips of this kind are only counted)" if self.logged[reason] == self.log_first else ""
            log.warning("skipping %s sample [%s] in %s: %s%s", self.split, reason, url, detail, more)

    def take(self) -> dict:
        delta = {"reasons": dict(self.reasons), "shards": {u: dict(c) for u, c in self.shards.items()}}
        self._reset()
        return delta


# --- tar members -> samples --------------------------------------------------------------------------

_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd magic


class _EndCheck:
    """A shard's raw stream, watched for a cut: tarfile's stream mode (WebDataset's reader) takes a tar
    cut at a 512-byte block boundary for a complete one and silently loses the rest. A complete tar ends
    in zero blocks; compressed streams detect their own truncation."""

    def __init__(self, stream):
        self.stream, self.head, self.tail, self.eof = stream, None, b"", False

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if self.head is None:
            self.head = data[:8]
        if data:
            self.tail = (self.tail + data)[-512:]
        else:
            self.eof = True
        return data

    def cut_short(self) -> bool:
        return self.eof and not (self.head or b"").startswith(_COMPRESSED) and self.tail.strip(b"\0") != b""


def _members(url: str, stream) -> Iterator[dict]:
    watched = _EndCheck(stream)
    for f in tar_file_iterator(watched):
        yield {**f, "__url__": url}
    if watched.cut_short():  # raised before group_by_keys hands on the cut-off last sample
        raise tarfile.ReadError("unexpected end of data (no end-of-archive block)")


def read_shard(url: str, counter: SkipCounter, count_shard_errors: bool = True) -> Iterator[dict]:
    """Samples of one tar shard (local path, pipe: command, or URL webdataset's gopen opens).

    WebDataset's own pieces: gopen, tar_file_iterator (tarfile: plain and compressed tars), group_by_keys.
    (A hand-written header parser read tars 4x faster but made 64 px clips only 1.6% cheaper to load:
    docs/bench/data.md.) A shard that cannot be opened, breaks off, or holds nothing is counted, never
    raised; whole samples read before a break are kept. Returns (as the generator's value) the number of
    samples read.
    """

    def skip(reason, exn):
        if count_shard_errors:
            counter.skip(reason, url, f"{type(exn).__name__}: {exn}" if exn else "no sample")

    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any failure to open is an unreadable shard
        skip("unreadable_shard", e)
        return 0
    n, error, closed = 0, None, False
    try:
        try:
            for sample in group_by_keys(_members(url, stream)):
                n += 1
                yield sample
        except (tarfile.TarError, EOFError, zlib.error, ValueError) as e:
            empty = n == 0 and isinstance(e, tarfile.ReadError) and str(e).startswith("empty file")
            error = None if empty else ("corrupt_shard", e)  # a 0-byte shard: counted as empty_shard below
        except OSError as e:  # a read error
            error = ("unreadable_shard", e)
        closed = True
        try:
            stream.close()  # a pipe: command reports its exit status here
        except Exception as e:  # noqa: BLE001
            error = error or ("unreadable_shard", e)
        if error:
            skip(*error)
        elif n == 0:
            skip("empty_shard", None)
    finally:
        if not closed:  # the consumer stopped early: close quietly
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass
    return n


# --- one sample --------------------------------------------------------------------------------------


def sample_name(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def check_sample(
    sample: dict, label_key: str | None = "label", num_classes: int | None = None, member: str = "mp4"
) -> int:
    """The sample's integer label after the checks every reader makes; raises Skip (never decodes).

    label_key None: unlabelled data, every clip is class 0. num_classes None: no upper bound on labels.
    member: the clip's member (`latent.npy` in a latent cache).
    """
    name = sample_name(sample)
    meta = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise Skip("bad_json", f"{name}: .json does not parse ({e})") from None
        if not isinstance(meta, dict):
            raise Skip("bad_json", f"{name}: .json is a {type(meta).__name__}, not an object")
        status = meta.get("status")
        if status is not None and status != "success":  # a video2dataset row whose download failed
            raise Skip("failed_row", f"{name}: status {status!r} {meta.get('error_message') or ''}".strip())
    if member not in sample:
        if member != "mp4":
            raise Skip("bad_latent", f"{name}: no .{member} member")
        raise Skip("missing_mp4", f"{name}: no .mp4 member (members: {sorted(k for k in sample if k[0] != '_')})")
    if label_key is None:
        return 0
    if meta is not None and label_key in meta:
        label = meta[label_key]
    elif "cls" in sample:
        text = sample["cls"].decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError:
            raise Skip("bad_label", f"{name}: .cls {text!r} is not an integer") from None
    else:
        raise Skip("missing_label", f"{name}: no {label_key!r} in .json and no .cls")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise Skip("bad_label", f"{name}: label {label!r} is {type(label).__name__}, not an integer")
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise Skip("bad_label", f"{name}: label {label} outside [0, {num_classes}) (num_classes)")
    return int(label)


@dataclass(frozen=True)
class LatentSpec:
    """A latent cache sample's array: `member` holds a float array of `shape` (the posterior moments, 2C x T' x H' x W')."""

    shape: tuple
    member: str = "latent.npy"
    size = None  # not a pixel size: the loader allocates `batch_shape` instead
    dtype = np.float32

    @property
    def batch_shape(self) -> tuple:
        return tuple(self.shape)


def decode_latent(
    sample: dict,
    spec: LatentSpec,
    label_key: str | None = "label",
    num_classes: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """(moments float32 (2C, T', H', W'), label) of a latent cache sample; a wrong or unreadable array is a Skip."""
    label = check_sample(sample, label_key, num_classes, member=spec.member)
    try:
        array = np.load(io.BytesIO(sample[spec.member]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise Skip("bad_latent", f"{sample_name(sample)}: .{spec.member} does not load ({e})") from None
    if tuple(array.shape) != tuple(spec.shape):
        raise Skip(
            "bad_latent",
            f"{sample_name(sample)}: .{spec.member} has shape {list(array.shape)}, the cache's "
            f"info.json says {list(spec.shape)}",
        )
    if out is None:
        return array.astype(np.float32), label
    out[...] = array
    return out, label


def decode_sample(
    sample: dict,
    spec: ClipSpec | LatentSpec,
    rng: random.Random,
    label_key: str | None = "label",
    num_classes: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """(clip, label) of one sample: check_sample, then decode_clip; decode failures become Skip. A LatentSpec
    reads a latent cache sample instead (decode_latent)."""
    if isinstance(spec, LatentSpec):
        return decode_latent(sample, spec, label_key, num_classes, out)
    label = check_sample(sample, label_key, num_classes)
    try:
        return decode_clip(sample["mp4"], spec, rng, name=sample_name(sample), out=out, format="mp4"), label
    except ClipTooShort as e:
        raise Skip("too_short", str(e)) from None
    except VideoDecodeError as e:
        raise Skip("corrupt_video", str(e)) from None


def read_clips(
    shards,
    spec: ClipSpec,
    label_key: str | None = "label",
    num_classes: int | None = None,
    max_clips: int | None = None,
    key: str = "real",
    prefix: str = "",
) -> tuple[list, list, list, Counter]:
    """Every clip of the shards in order, read once (evaluation): (clips, labels, urls, skips by reason).

    Bad samples and shards are skipped and counted like training's; when none decodes, a ShardError
    counts the skips by reason and names the fix. Clips are cut with `rng = Random(0)`.
    """
    urls = expand_shards(shards, key)
    counter = SkipCounter(key)
    clips, labels, skips, last = [], [], Counter(), None
    for url in urls:
        for sample in read_shard(url, counter):
            try:
                clip, label = decode_sample(sample, spec, random.Random(0), label_key, num_classes)
            except Skip as e:
                counter.skip(e.reason, url, e)
                last = e
                continue
            clips.append(clip)
            labels.append(label)
            if max_clips and len(clips) >= max_clips:
                break
        skips.update(counter.take()["reasons"])
        if max_clips and len(clips) >= max_clips:
            break
    if not clips:
        raise ShardError(all_skipped(f"{key}={shards!r}", skips, last, prefix, label_key))
    return clips, labels, urls, skips
