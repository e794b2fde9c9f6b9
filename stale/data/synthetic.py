"""The embedded dataset: coloured shapes moving and bouncing over a plain background.

One shape per clip; its class (square, disc, triangle, cross, ...) is the label. Colour, size, start
position and velocity are random; the shape bounces off the frame's edges. The clips are written as real
H.264 mp4 files inside real WebDataset tar shards, exactly as a user's own data would be, so the default
run exercises the same loader, decoder and augmentations a real run does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from stale.data.video_io import encode_mp4

SHAPES = ("square", "disc", "triangle", "cross", "diamond", "ring", "bar", "plus")
# Bright, mutually distinct colours: at 16-32 px and yuv420p the hue must survive chroma subsampling.
COLOURS = np.array(
    [[230, 60, 50], [60, 200, 80], [60, 110, 240], [245, 210, 50], [220, 80, 220], [60, 220, 230], [250, 250, 250]],
    dtype=np.float32,
)
SIMPLE_BACKGROUND = np.array([40, 40, 48], dtype=np.float32)  # style="simple": one dark background for all clips
STYLES = ("varied", "simple", "captioned")
# style="captioned" (text-to-video, docs/text.md): the caption says what the clip shows, e.g. "a red square moving
# left". Colour (the first 4 of COLOURS), shape and a straight motion without bounces are drawn independently;
# HELD_OUT combinations never appear in train or val, only in test, to measure whether prompts generalise.
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
CAPTION_COLOURS = 4
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx) in pixels


def held_out(shape: int, colour: int, direction: int) -> bool:
    """8 of the 64 (shape, colour, direction) combinations of 4 shapes: each shape, colour and direction still
    appears in training, each pair of them too, but these triples do not."""
    return (shape + 2 * colour + 3 * direction) % 8 == 0


def caption(shape: int, colour: int, direction: int) -> str:
    return f"a {COLOUR_NAMES[colour]} {SHAPES[shape]} moving {list(DIRECTIONS)[direction]}"


SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}  # different seeds: no clip is shared between splits


@dataclass
class SyntheticSpec:
    """What the embedded dataset looks like; its hash names the cache folder, so a change regenerates it."""

    frames: int = 8  # frames per clip
    size: int = 16  # height = width, pixels
    num_classes: int = 4  # first K entries of SHAPES
    fps: int = 8
    supersample: int = 4  # anti-aliasing factor of the rasteriser
    counts: dict = field(default_factory=lambda: {"train": 2048, "val": 128, "test": 128})
    per_shard: int = 256
    # varied: random shape colour and background | simple: one colour per class, fixed background | captioned:
    # independent shape, colour and straight motion, told by the caption (docs/text.md)
    style: str = "varied"
    version: int = 1  # bump when the generator's output changes

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"data.style={self.style!r} is not one of {STYLES}")

    @classmethod
    def of(cls, train_clips: int = 2048, val_clips: int = 128, test_clips: int = 128, **fields) -> SyntheticSpec:
        """The spec with the split sizes as flat keys (data=synthetic, stale-shards synthetic)."""
        return cls(counts={"train": train_clips, "val": val_clips, "test": test_clips}, **fields)

    def fingerprint(self) -> str:
        fields = asdict(self)
        if fields["style"] == "varied":  # the style field came later: keep the caches written before it
            del fields["style"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "disc":
        return dy**2 + dx**2 <= r**2
    if kind == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == "cross":  # an X
        w = r * 0.35
        return ((np.abs(dy - dx) <= w) | (np.abs(dy + dx) <= w)) & (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if kind == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "bar":
        return (np.abs(dy) <= r * 0.35) & (np.abs(dx) <= r)
    if kind == "plus":
        w = r * 0.3
        return ((np.abs(dy) <= w) | (np.abs(dx) <= w)) & (np.abs(dy) <= r) & (np.abs(dx) <= r)
    raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def make_clip(rng: np.random.Generator, spec: SyntheticSpec, label: int) -> np.ndarray:
    """Render one clip as uint8 (T, H, W, 3)."""
    s, ss = spec.size, spec.supersample
    n = s * ss
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / ss  # pixel-unit coordinates of the fine grid
    r = rng.uniform(0.22, 0.32) * s
    pos = rng.uniform(r, s - r, size=2)
    speed = rng.uniform(0.6, 1.4) * s / 16  # about one pixel per frame at 16 px
    angle = rng.uniform(0, 2 * np.pi)
    vel = speed * np.array([np.sin(angle), np.cos(angle)])
    fg = COLOURS[rng.integers(len(COLOURS))]
    bg = rng.uniform(20, 90, size=3).astype(np.float32)  # dark, muted background
    if spec.style == "simple":  # same draws as "varied" (same positions and motions), fewer factors of variation
        fg, bg = COLOURS[label % len(COLOURS)], SIMPLE_BACKGROUND
    frames = []
    for _ in range(spec.frames):
        mask = _shape_mask(SHAPES[label], yy, xx, pos[0], pos[1], r).astype(np.float32)
        cover = mask.reshape(s, ss, s, ss).mean(axis=(1, 3))[..., None]  # (H, W, 1) anti-aliased coverage
        frames.append(bg * (1 - cover) + fg * cover)
        pos = pos + vel
        for d in range(2):  # bounce off the edges
            if pos[d] < r or pos[d] > s - r:
                vel[d] = -vel[d]
                pos[d] = np.clip(pos[d], r, s - r)
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def make_captioned_clip(
    rng: np.random.Generator, spec: SyntheticSpec, label: int, colour: int, direction: int
) -> np.ndarray:
    """style="captioned": one colour, one straight motion that never reaches an edge (the caption stays true)."""
    s, ss = spec.size, spec.supersample
    n = s * ss
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / ss
    r = rng.uniform(0.2, 0.26) * s
    speed = rng.uniform(0.6, 0.9) * s / 16
    step = speed * np.array(list(DIRECTIONS.values())[direction])  # (dy, dx) per frame
    travel = np.abs(step) * (spec.frames - 1)
    low, high = r + np.where(step < 0, travel, 0), s - r - np.where(step > 0, travel, 0)
    pos = rng.uniform(low, np.maximum(high, low))  # the whole path stays inside the frame
    fg = COLOURS[colour]
    frames = []
    for k in range(spec.frames):
        mask = _shape_mask(SHAPES[label], yy, xx, *(pos + k * step), r).astype(np.float32)
        cover = mask.reshape(s, ss, s, ss).mean(axis=(1, 3))[..., None]
        frames.append(SIMPLE_BACKGROUND * (1 - cover) + fg * cover)
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def _captioned(rng: np.random.Generator, spec: SyntheticSpec, split: str) -> tuple[int, int, int]:
    """(shape, colour, direction) of one clip: held-out triples only in test, never elsewhere."""
    while True:
        combo = (
            int(rng.integers(spec.num_classes)),
            int(rng.integers(CAPTION_COLOURS)),
            int(rng.integers(len(DIRECTIONS))),
        )
        if held_out(*combo) == (split == "test"):
            return combo


def write_split(out_dir: Path, split: str, spec: SyntheticSpec) -> list[str]:
    """Write one split's shards; returns their paths."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], spec.size, spec.frames, spec.num_classes])
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=spec.per_shard, verbose=0) as sink:
        for i in range(spec.counts[split]):
            key = f"{split}{i:07d}"
            if spec.style == "captioned":
                label, colour, direction = _captioned(rng, spec, split)
                clip, text = make_captioned_clip(rng, spec, label, colour, direction), caption(label, colour, direction)
                extra = {
                    "caption": text,
                    "colour": COLOUR_NAMES[colour],
                    "direction": list(DIRECTIONS)[direction],
                    "held_out": held_out(label, colour, direction),
                }
            else:
                label = int(rng.integers(spec.num_classes))
                clip, text, extra = make_clip(rng, spec, label), SHAPES[label], {}
            meta = {
                "key": key,
                "label": label,
                "class_name": SHAPES[label],
                "fps": spec.fps,
                "frames": spec.frames,
                "source": "stale.synthetic",
                "split": split,
                **extra,
            }
            sink.write(
                {
                    "__key__": key,
                    "mp4": encode_mp4(clip, fps=spec.fps),
                    "json": json.dumps(meta).encode(),
                    "cls": str(label).encode(),
                    "txt": text.encode(),
                }
            )
    return sorted(str(p) for p in out_dir.glob(f"{split}-*.tar"))


def ensure_synthetic(root: str | os.PathLike, spec: SyntheticSpec) -> Path:
    """Generate the dataset under root/<fingerprint> once; later calls reuse it.

    Generation writes into a temporary sibling and renames it into place, so an interrupted run never
    leaves a half-written dataset behind that a later run would trust.
    """
    root = Path(os.path.expanduser(str(root)))
    final = root / f"shapes-{spec.fingerprint()}"
    if (final / "spec.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-shapes-", dir=root))
    try:
        for split in spec.counts:
            write_split(tmp, split, spec)
        (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not (final / "spec.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def split_pattern(folder: Path, split: str) -> str:
    """A brace pattern that names every shard of a split, e.g. /d/train-{000000..000007}.tar."""
    shards = sorted(folder.glob(f"{split}-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no {split} shards in {folder}")
    if len(shards) == 1:
        return str(shards[0])
    return str(folder / f"{split}-{{000000..{len(shards) - 1:06d}}}.tar")
