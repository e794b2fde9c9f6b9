"""stale-shards: turn a folder or a manifest of videos into WebDataset shards of short H.264 clips (docs/data.md).

    input   a folder (every video file below it; the first subfolder level names the labels),
            a manifest.csv (columns path[,label][,caption]) or a manifest.jsonl (same keys).
    out     <out>/{train,val,test}-NNNNNN.tar, <out>/info.json (patterns, counts, classes, the command
            that trains on them), <out>/sources.jsonl (which video went to which split).

A sample is `<key>.mp4` (H.264) + `<key>.json` (source, split, start/end time, fps, frames, height, width,
duration, label, class_name, caption) + `<key>.txt` (the caption, when there is one). Splits are drawn by source
video, so no video leaks from train into val or test; videos are converted in parallel and written in a fixed
order, so the shards are the same whatever the worker count. Resumable: a shard is renamed when complete and a
marker records where in the video list it ended. The training command it prints takes every clip the shards hold
(_clip_keys).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import webdataset as wds

from stale.data.buckets import sample_shape
from stale.data.video_io import VideoDecodeError, aspect_shape, encode_mp4, iter_frames, probe

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = set(".mp4 .m4v .mkv .webm .avi .mov .mpg .mpeg .ts .flv .wmv .3gp .ogv .gif".split())
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}  # still images: one-frame samples
STATE_DIR = ".stale-shards"
# Options that change the shards: a resumed run must use the same values.
OUTPUT_OPTIONS = tuple(
    "fps size frames stride max_clips_per_video maxcount maxsize split seed crf preset resize grid max_frames".split()
)
RESIZE = ("aspect", "square")
# (size, grid) of resize=aspect -> the data.buckets preset made for the shapes it writes (stale/data/buckets.py)
BUCKET_PRESETS = {(64, 16): "default", (16, 4): "smoke", (256, 16): "256"}
# the printed data.buckets list of other shapes: batch sizes of the presets', 64 frames per batch
FRAMES_PER_BATCH = 64


class ShardsError(ValueError):
    """Bad input or options for stale-shards; the message names the file, column or option."""


@dataclass
class ShardsConfig:
    input: str  # folder, manifest.csv or manifest.jsonl
    out: str  # output folder
    fps: float | None = None  # resample to this frame rate; None keeps the source rate
    size: int | None = 64  # aspect: about size x size pixels; square: the side; None keeps the stored size
    frames: int | None = None  # frames per clip; None: each video's own length, in clips of at most max_frames
    resize: str = "aspect"  # aspect: keep the aspect ratio at about size^2 pixels | square: crop to size x size
    grid: int = 16  # aspect: height and width are multiples of this (the model's patch in pixels; even)
    max_frames: int = 64  # frames=None: the longest clip; longer videos give several
    stride: int | None = None  # frames between clip starts; None = frames (back-to-back clips)
    max_clips_per_video: int | None = None  # spread evenly over the video; None = every clip
    maxcount: int = 1000  # clips per shard at most
    maxsize: float = 1e9  # bytes per shard at most (a single larger clip still gets its own shard)
    workers: int = 1  # videos converted in parallel
    split: dict = field(default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    seed: int = 0  # which videos go to which split
    crf: int = 18  # H.264 quality: lower is better and bigger
    preset: str = "fast"  # x264 speed/size trade-off
    progress: bool = True
    overwrite: bool = False  # start over when `out` holds shards made with other options

    def __post_init__(self):
        if self.frames is not None and self.frames < 1:
            raise ShardsError(f"frames={self.frames} must be >= 1 (or null: each video's own length)")
        if self.max_frames < 1:
            raise ShardsError(f"max_frames={self.max_frames} must be >= 1")
        if self.resize not in RESIZE:
            raise ShardsError(f"resize={self.resize!r} is not one of {RESIZE}")
        if self.grid < 2 or self.grid % 2:
            raise ShardsError(f"grid={self.grid} must be even (H.264 with yuv420p needs even sides)")
        if self.size is not None and (self.size < 2 or self.size % 2):
            raise ShardsError(f"size={self.size} must be even (H.264 with yuv420p needs even sides)")
        if self.stride is not None and self.stride < 1:
            raise ShardsError(f"stride={self.stride} must be >= 1")
        if self.fps is not None and self.fps <= 0:
            raise ShardsError(f"fps={self.fps} must be > 0")
        if self.maxcount < 1 or self.maxsize <= 0:
            raise ShardsError(f"maxcount={self.maxcount} and maxsize={self.maxsize} must be positive")
        if self.max_clips_per_video is not None and self.max_clips_per_video < 1:
            raise ShardsError(f"max_clips_per_video={self.max_clips_per_video} must be >= 1 (or null)")
        bad = {k: v for k, v in self.split.items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad or not self.split or sum(self.split.values()) <= 0:
            raise ShardsError(f"split={dict(self.split)} needs non-negative ratios, e.g. {{train: 0.9, val: 0.1}}")
        for name in self.split:
            if not name.replace("_", "").isalnum():
                raise ShardsError(f"split name {name!r} must be letters, digits or _ (it names the shards)")


@dataclass
class Source:
    path: str  # where to read it
    rel: str  # its name in the dataset (relative to the input folder or as in the manifest): splits hash it
    label: str | int | None = None
    caption: str | None = None

    @property
    def key(self) -> str:  # a WebDataset key: no dots, stable across runs
        return hashlib.sha1(self.rel.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Inputs


def find_sources(input: str) -> list[Source]:
    """Videos from a folder (labels = first-level subfolders) or a .csv/.jsonl manifest."""
    p = Path(os.path.expanduser(str(input)))
    if p.is_dir():
        media = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in media)
        if not files:
            raise ShardsError(f"input={input}: no video or image file ({', '.join(sorted(media))}) below it")
        sources = []
        for f in files:
            rel = f.relative_to(p).as_posix()
            sources.append(Source(str(f), rel, rel.split("/")[0] if "/" in rel else None))
        return sources
    if not p.is_file():
        raise ShardsError(f"input={input} is neither a folder nor a manifest file")
    rows = _read_manifest(p)
    sources = []
    for i, row in enumerate(rows, start=2 if p.suffix.lower() == ".csv" else 1):
        path = str(row.get("path") or "").strip()
        if not path:
            raise ShardsError(f"{p}: row {i} has no path")
        full = Path(path) if os.path.isabs(path) else p.parent / path
        label = row.get("label")
        label = None if label is None or (isinstance(label, str) and not label.strip()) else label
        caption = row.get("caption")
        caption = str(caption) if caption not in (None, "") else None
        sources.append(Source(str(full), path, label, caption))
    if not sources:
        raise ShardsError(f"{p}: the manifest lists no video")
    missing = [s.path for s in sources if not os.path.isfile(s.path)]
    if missing:
        raise ShardsError(f"{p}: {len(missing)} listed videos do not exist, e.g. {missing[0]}")
    dup = {s.rel for s in sources if sum(t.rel == s.rel for t in sources) > 1}
    if dup:
        raise ShardsError(f"{p}: videos listed twice: {sorted(dup)[:3]}")
    return sources


def _read_manifest(p: Path) -> list[dict]:
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ShardsError(
                    f"{p}: a manifest.csv needs a header with a 'path' column "
                    f"(and optional 'label', 'caption'), got {reader.fieldnames}"
                )
            return list(reader)
    if p.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ShardsError(f"{p}: line {i} is not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ShardsError(f"{p}: line {i} is not an object")
            rows.append(row)
        return rows
    raise ShardsError(f"input={p}: a manifest must be .csv or .jsonl")


def label_table(sources: list[Source]) -> tuple[dict, list[str] | None]:
    """Map each source's label to an integer: integer labels stay, names get their sorted index."""
    labels = [s.label for s in sources if s.label is not None]
    if not labels:
        return {}, None

    def as_int(x):
        if isinstance(x, bool):
            return None
        if isinstance(x, int):
            return x
        text = str(x).strip()
        return int(text) if text.isdigit() else None

    ints = [as_int(x) for x in labels]
    if all(i is not None for i in ints):  # integer labels (or digit strings) are used as they are
        return {x: i for x, i in zip(labels, ints)}, None
    names = sorted({str(x) for x in labels})  # names: sorted, numbered from 0
    return {x: names.index(str(x)) for x in labels}, names


def assign_splits(sources: list[Source], ratios: dict, seed: int) -> dict[str, list[Source]]:
    """Whole videos to splits, in proportion to `ratios`; each split asked for gets at least one video
    when there are enough. The order is a hash of (seed, name), so it does not depend on listing order."""
    names = [k for k, v in ratios.items() if v > 0]
    total = sum(ratios[k] for k in names)
    n = len(sources)
    exact = {k: n * ratios[k] / total for k in names}
    counts = {k: int(exact[k]) for k in names}
    for k in sorted(names, key=lambda k: -(exact[k] - counts[k]))[: n - sum(counts.values())]:
        counts[k] += 1  # largest remainders
    if n >= len(names):
        for k in names:
            while counts[k] == 0:
                donor = max(names, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[k] += 1
    order = sorted(sources, key=lambda s: hashlib.sha1(f"{seed}:{s.rel}".encode()).hexdigest())
    out, i = {}, 0
    for k in names:
        out[k] = sorted(order[i : i + counts[k]], key=lambda s: s.rel)
        i += counts[k]
    return out


# --------------------------------------------------------------------------------------------------
# One video -> clips (runs in the worker processes)


def _target(h: int, w: int, size: int | None, resize: str, grid: int) -> int | tuple[int, int] | None:
    """What iter_frames resizes to: (height, width) keeping the aspect, or the square side."""
    if resize == "aspect" and size is not None:
        return aspect_shape(h, w, size * size, grid)
    return size


def clip_image(path: str, size: int | None, resize: str, grid: int, fps: float | None, crf: int, preset: str) -> dict:
    """A still image as one one-frame clip (same resize rule as a video)."""
    from PIL import Image

    rate = Fraction(fps or 1).limit_denominator(1001)
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        target = _target(h, w, size, resize, grid)
        if target is not None:
            th, tw = (target, target) if isinstance(target, int) else target
            scale = max(th / h, tw / w)
            im = im.resize((max(tw, round(w * scale)), max(th, round(h * scale))), Image.BICUBIC)
        a = np.asarray(im)
    th, tw = (
        (target, target)
        if isinstance(target, int)
        else (target or (a.shape[0] - a.shape[0] % 2, a.shape[1] - a.shape[1] % 2))
    )
    top, left = (a.shape[0] - th) // 2, (a.shape[1] - tw) // 2
    frame = np.ascontiguousarray(a[top : top + th, left : left + tw])[None]  # (1, H, W, 3)
    clip = {
        "start_time": 0.0,
        "end_time": 0.0,
        "frames": 1,
        "width": tw,
        "height": th,
        "mp4": encode_mp4(frame, fps=rate, crf=crf, preset=preset, tune="stillimage"),
    }
    return {"clips": [clip], "fps": float(rate), "source_fps": None, "codec": "image", "error": None}


def clip_video(
    path: str,
    fps: float | None,
    size: int | None,
    frames: int | None,
    stride: int | None,
    max_clips: int | None,
    crf: int,
    preset: str,
    resize: str = "square",
    grid: int = 2,
    max_frames: int = 64,
) -> dict:
    """Decode, resample and cut one video (or take one still image); returns encoded clips or the error.
    frames None: each video's own length, in back-to-back clips of at most max_frames (the last shorter)."""
    try:
        if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            return clip_image(path, size, resize, grid, fps, crf, preset)
        info = probe(path)
        target = _target(info.height, info.width, size, resize, grid)
        variable = frames is None
        if variable:
            frames = stride = max_frames
        rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(info.fps or 25).limit_denominator(1001)
        expected = int(round(info.duration * float(rate))) if info.duration else (info.frames if not fps else 0)
        possible = (expected - frames) // stride + 1 if expected >= frames else 0
        chosen = None
        if max_clips and possible > max_clips:  # spread the clips over the whole video
            chosen = set(np.linspace(0, possible - 1, max_clips).round().astype(int).tolist())
        last = max(chosen) if chosen else None
        buf: deque = deque(maxlen=frames)
        clips = []
        if variable:
            chosen = last = None  # every back-to-back clip (up to max_clips)

        def emit():
            clip = np.stack([im for _, im in buf])
            clips.append(
                {
                    "start_time": round(buf[0][0], 4),
                    "end_time": round(buf[-1][0], 4),
                    "mp4": encode_mp4(clip, fps=rate, crf=crf, preset=preset, tune=None),
                    "frames": clip.shape[0],
                    "width": clip.shape[2],
                    "height": clip.shape[1],
                }
            )

        j = -1
        for j, (t, img) in enumerate(iter_frames(path, fps=float(rate) if fps else None, size=target)):
            buf.append((t, img))
            if j + 1 < frames or (j + 1 - frames) % stride:
                continue
            c = (j + 1 - frames) // stride
            if chosen is None or c in chosen:
                emit()
                if variable:
                    buf.clear()
                if max_clips and len(clips) >= max_clips:
                    break
            if last is not None and c >= last:
                break
        if variable and buf and (j + 1) % frames and not (max_clips and len(clips) >= max_clips):
            emit()  # the rest of a video: a shorter clip
        return {
            "clips": clips,
            "fps": float(rate),
            "source_fps": info.fps,
            "codec": info.codec,
            "error": None
            if clips
            else (
                f"too short for one clip of {frames} frames at {float(rate):g} fps"
                if not variable
                else "no frame decoded"
            ),
        }
    except VideoDecodeError as e:
        return {"clips": [], "error": str(e)}
    except Exception as e:  # noqa: BLE001 - one bad video must not stop a conversion of thousands
        return {"clips": [], "error": f"{path}: {type(e).__name__}: {e}"}


def _clip_job(args):
    index, path, kw = args
    return index, clip_video(path, **kw)


# --------------------------------------------------------------------------------------------------
# Shards: temp name, rename when complete, marker = resume point


class _Sink:
    """Writes <split>-NNNNNN.tar one after the other; each is complete (renamed) or absent."""

    def __init__(self, out: Path, split: str, maxcount: int, maxsize: float, index: int):
        self.out, self.split, self.maxcount, self.maxsize, self.index = out, split, maxcount, maxsize, index
        self.writer, self.count, self.size, self.written = None, 0, 0, []
        self.shapes: Counter = Counter()  # "TxHxW" -> clips, of the shard being written

    def _name(self, i: int) -> Path:
        return self.out / f"{self.split}-{i:06d}.tar"

    def write(self, sample: dict, pos_after: tuple[int, int], pos_before: tuple[int, int]) -> None:
        nbytes = sum(len(v) for k, v in sample.items() if not k.startswith("__")) + 1536 * (len(sample) - 1)
        if self.writer is not None and self.size + nbytes > self.maxsize:
            self.close(pos_before)
        if self.writer is None:
            self.writer = wds.TarWriter(str(self._name(self.index)) + ".tmp", mtime=0)  # mtime 0: same bytes
            self.count, self.size, self.shapes = 0, 0, Counter()
        self.writer.write(sample)
        self.shapes[_shape_name(sample_shape(sample))] += 1
        self.count, self.size = self.count + 1, self.size + nbytes
        if self.count >= self.maxcount:
            self.close(pos_after)

    def close(self, end: tuple[int, int]) -> None:
        if self.writer is None:
            return
        self.writer.close()
        final = self._name(self.index)
        os.replace(str(final) + ".tmp", final)
        marker = {
            "shard": final.name,
            "clips": self.count,
            "bytes": final.stat().st_size,
            "end": list(end),
            "shapes": dict(self.shapes),
        }
        _write_json(self.out / STATE_DIR / f"{self.split}-{self.index:06d}.json", marker)
        self.written.append(marker)
        self.writer, self.index = None, self.index + 1


def _shape_name(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))  # as a bucket's name: TxHxW


def _split_shapes(out: Path, markers: list[dict]) -> dict[str, int]:
    """Clips per shape in a split's finished shards, from their markers (a marker written before markers held
    shapes: from the shard's .json members)."""
    total: Counter = Counter()
    for m in markers:
        if "shapes" in m:
            total.update(m["shapes"])
            continue
        with tarfile.open(out / m["shard"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    total[_shape_name(sample_shape({"json": tar.extractfile(member).read()}))] += 1
    return dict(sorted(total.items()))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _resume_point(out: Path, split: str) -> tuple[int, tuple[int, int], list[dict]]:
    """(next shard index, (video index, clip index) to continue from, markers of the finished shards)."""
    markers, index, pos = [], 0, (0, 0)
    while True:
        m = out / STATE_DIR / f"{split}-{index:06d}.json"
        shard = out / f"{split}-{index:06d}.tar"
        if not (m.is_file() and shard.is_file()):
            break
        marker = json.loads(m.read_text())
        if shard.stat().st_size != marker["bytes"]:
            break
        markers.append(marker)
        pos, index = tuple(marker["end"]), index + 1
    for stale in list(out.glob(f"{split}-*.tar")) + list(out.glob(f"{split}-*.tar.tmp")):
        if stale.name.endswith(".tmp") or int(stale.name[len(split) + 1 : len(split) + 7]) >= index:
            stale.unlink()  # an unfinished shard, or one past the last marker: rewritten below
    for m in (out / STATE_DIR).glob(f"{split}-*.json"):
        if int(m.stem[len(split) + 1 :]) >= index:
            m.unlink()
    return index, pos, markers


# --------------------------------------------------------------------------------------------------
# The conversion


def convert(cfg: ShardsConfig) -> dict:
    """Convert cfg.input into shards under cfg.out; returns the summary also written to out/info.json."""
    out = Path(os.path.expanduser(str(cfg.out)))
    sources = find_sources(cfg.input)
    table, classes = label_table(sources)
    splits = assign_splits(sources, dict(cfg.split), cfg.seed)
    stride = cfg.stride or cfg.frames
    _check_options(out, cfg, sources)

    kw = dict(
        fps=cfg.fps,
        size=cfg.size,
        frames=cfg.frames,
        stride=stride,
        max_clips=cfg.max_clips_per_video,
        crf=cfg.crf,
        preset=cfg.preset,
        resize=cfg.resize,
        grid=cfg.grid,
        max_frames=cfg.max_frames,
    )
    summary = {"splits": {}, "classes": classes, "failed": []}
    for split, videos in splits.items():
        summary["splits"][split] = _convert_split(out, split, videos, table, classes, cfg, kw, summary["failed"])

    labelled = bool(table)
    num_classes = (len(classes) if classes else max(table.values()) + 1) if labelled else 1
    summary.update(
        num_classes=num_classes,
        labelled=labelled,
        unlabelled_videos=sum(s.label is None for s in sources) if labelled else None,
        options={k: (dict(v) if k == "split" else v) for k, v in asdict(cfg).items() if k in OUTPUT_OPTIONS},
        command=_train_command(out, summary, cfg, num_classes, labelled),
    )
    with open(out / "sources.jsonl", "w") as f:
        for split, videos in splits.items():
            for s in videos:
                f.write(
                    json.dumps(
                        {
                            "path": s.rel,
                            "split": split,
                            "label": table.get(s.label) if s.label is not None else None,
                            "caption": s.caption,
                        }
                    )
                    + "\n"
                )
    _write_json(out / "info.json", summary)
    return summary


def _check_options(out: Path, cfg: ShardsConfig, sources: list[Source]) -> None:
    """A resumed run must make the same shards: same options, same videos."""
    state = out / STATE_DIR
    opts = {k: (dict(v) if k == "split" else v) for k, v in asdict(cfg).items() if k in OUTPUT_OPTIONS}
    opts["sources"] = hashlib.sha1(json.dumps([(s.rel, str(s.label), s.caption) for s in sources]).encode()).hexdigest()
    saved = state / "options.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        diff = {k: (old.get(k), v) for k, v in opts.items() if old.get(k) != v}
        if diff and not cfg.overwrite:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ShardsError(
                f"out={out} holds shards made with other options or videos ({what}); "
                f"use another out= or overwrite=true to start over"
            )
        if diff:
            log.warning("overwrite=true: deleting the shards in %s made with other options", out)
            shutil.rmtree(state)
            for p in out.glob("*.tar*"):
                p.unlink()
    elif any(out.glob("*.tar")) and not cfg.overwrite:
        raise ShardsError(
            f"out={out} already holds .tar files not made by stale-shards; use another out= or overwrite=true"
        )
    state.mkdir(parents=True, exist_ok=True)
    _write_json(saved, opts)


def _convert_split(
    out: Path, split: str, videos: list[Source], table: dict, classes, cfg: ShardsConfig, kw: dict, failed: list
) -> dict:
    done_path = out / STATE_DIR / f"{split}.done.json"
    index, (vstart, cstart), markers = _resume_point(out, split)
    if done_path.is_file() and index == json.loads(done_path.read_text())["shards"]:
        log.info("%s: complete, %d shards kept", split, index)
        result = json.loads(done_path.read_text())
        failed.extend(json.loads(x) | {"split": split} for x in _lines(out / STATE_DIR / f"{split}.errors.jsonl"))
        # the folder may have moved; a split finished before results held shapes gets them from its markers
        return result | {"pattern": _pattern(out, split, index), "shapes": _split_shapes(out, markers)}
    done_path.unlink(missing_ok=True)
    if index:
        log.info("%s: resuming after %d finished shards (video %d of %d)", split, index, vstart, len(videos))
    sink = _Sink(out, split, cfg.maxcount, cfg.maxsize, index)
    errors_path = out / STATE_DIR / f"{split}.errors.jsonl"
    errors = [json.loads(x) for x in _lines(errors_path)]
    errors = [e for e in errors if e["index"] < vstart]
    jobs = [(i, videos[i].path, kw) for i in range(vstart, len(videos))]
    bar = _progress(cfg.progress, total=len(videos), initial=vstart, desc=f"stale-shards {split}")
    clips_new = 0
    pool = multiprocessing.get_context("fork").Pool(cfg.workers) if cfg.workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_clip_job, jobs) if pool else map(_clip_job, jobs)
        for i, res in results:
            src = videos[i]
            if res["error"]:
                errors.append({"index": i, "path": src.rel, "error": res["error"]})
                log.warning("%s: skipping %s: %s", split, src.rel, res["error"])
            first = cstart if i == vstart else 0
            for j, clip in enumerate(res["clips"]):
                if j < first:
                    continue
                sink.write(
                    _sample(src, split, j, clip, res, cfg, table, classes), pos_after=(i, j + 1), pos_before=(i, j)
                )
                clips_new += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    shards=sink.index + (sink.writer is not None),
                    clips=sum(m["clips"] for m in markers) + clips_new,
                    failed=len(errors),
                )
        sink.close((len(videos), 0))
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
        errors_path.write_text("".join(json.dumps(e) + "\n" for e in errors))
    markers = markers + sink.written
    shards = [m["shard"] for m in markers]
    result = {
        "shards": len(shards),
        "clips": sum(m["clips"] for m in markers),
        "videos": len(videos),
        "failed_videos": len(errors),
        "pattern": _pattern(out, split, len(shards)),
        "bytes": sum(m["bytes"] for m in markers),
        "shapes": _split_shapes(out, markers),
    }
    failed.extend({**e, "split": split} for e in errors)
    _write_json(done_path, result)
    return result


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _sample(src: Source, split: str, j: int, clip: dict, res: dict, cfg: ShardsConfig, table: dict, classes) -> dict:
    key = f"{src.key}_{j:04d}"
    meta = {
        "key": key,
        "source": src.rel,
        "split": split,
        "clip": j,
        "start_time": clip["start_time"],
        "end_time": clip["end_time"],
        "fps": res["fps"],
        "source_fps": res["source_fps"],
        "frames": clip["frames"],
        "width": clip["width"],
        "height": clip["height"],
        "duration": round(clip["frames"] / res["fps"], 4),
    }
    if src.label is not None:
        meta["label"] = table[src.label]
        if classes:
            meta["class_name"] = classes[meta["label"]]
    if src.caption is not None:
        meta["caption"] = src.caption
    sample = {"__key__": key, "mp4": clip["mp4"], "json": json.dumps(meta).encode()}
    if src.caption is not None:
        sample["txt"] = src.caption.encode()
    return sample


def _pattern(out: Path, split: str, n: int) -> str | None:
    if n == 0:
        return None
    if n == 1:
        return str(out / f"{split}-000000.tar")
    return str(out / f"{split}-{{000000..{n - 1:06d}}}.tar")


def _train_command(out: Path, summary: dict, cfg: ShardsConfig, num_classes: int, labelled: bool) -> str:
    sp = summary["splits"]
    # Hydra reads {..} in an override as a dict unless the value is quoted: 'key="a-{0..9}.tar"'
    parts = ["stale-train", "data=shards", f"""'data.shards="{sp.get("train", {}).get("pattern")}"'"""]
    if sp.get("val", {}).get("pattern"):
        parts.append(f"""'data.val_shards="{sp["val"]["pattern"]}"'""")
    parts.append(f"data.num_classes={num_classes}")
    if not labelled:
        parts.append("data.label_key=null")
    parts += _clip_keys(cfg, sp.get("train", {}).get("shapes", {}))
    return " ".join(parts)


def _clip_keys(cfg: ShardsConfig, shapes: dict[str, int]) -> list[str]:
    """The data keys under which stale-train takes every clip of the training shards (shapes: "TxHxW" -> clips):
    - resize=aspect at a (size, grid) with a preset: that preset (docs/buckets.md);
    - one shape, square: data.frames and data.size;
    - else a data.buckets list: each (H, W) written, at each clip's frames rounded down to a power of two (1 for
      images), batch sizes of FRAMES_PER_BATCH frames. Without it the run would take data.frames x data.size x
      data.size (8 x 16 x 16) and skip every shorter clip, still images first, as too_short."""
    preset = BUCKET_PRESETS.get((cfg.size, cfg.grid)) if cfg.resize == "aspect" else None
    if preset:
        return [f"data.buckets={preset}"]
    kinds = [tuple(int(v) for v in name.split("x")) for name in shapes]
    if len(kinds) == 1 and kinds[0][1] == kinds[0][2]:
        t, side, _ = kinds[0]
        return [f"data.frames={t}", f"data.size={side}"]
    if not kinds:
        return []
    buckets = sorted({(1 << (t.bit_length() - 1), h, w) for t, h, w in kinds})
    listed = ",".join(f"[{t},{h},{w},{max(1, FRAMES_PER_BATCH // t)}]" for t, h, w in buckets)
    return [f"'data.buckets=[{listed}]'"]


def _progress(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(unit="video", dynamic_ncols=True, **kw)


# --------------------------------------------------------------------------------------------------
# stale-shards synthetic


def write_synthetic(out: str, style: str = "simple", **spec) -> dict:
    """The embedded dataset (moving shapes) as shards under `out`; returns the split patterns. `spec`: the
    SyntheticSpec.of keys (frames, size, num_classes, train_clips, val_clips, test_clips, per_shard)."""
    from stale.data.synthetic import SyntheticSpec, split_pattern, write_split

    spec = SyntheticSpec.of(style=style, **spec)
    folder = Path(os.path.expanduser(str(out)))
    patterns = {}
    for split, n in spec.counts.items():
        if n > 0:
            write_split(folder, split, spec)
            patterns[split] = split_pattern(folder, split)
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return patterns
