"""Prompt following on the captioned synthetic data (docs/text.md): does a clip show the shape, colour and
direction of motion its prompt asks for?

    colour     the mean colour of the foreground (pixels far from the fixed background) minus the background: the
               caption colour in the nearest direction (cosine)
    direction  the foreground centroid's displacement from the first to the last frame: its larger axis and sign
    shape      a logistic regression on the foreground's box-normalised silhouette, fitted on real training clips
               (its accuracy on real held-out clips is the measure's own ceiling: `ShapeReader.fit` reports it)

A clip with (almost) no foreground reads as no colour, no direction and no shape: it counts as wrong.
"""

from __future__ import annotations

import re

import numpy as np

from stale.data.synthetic import CAPTION_COLOURS, COLOUR_NAMES, COLOURS, DIRECTIONS, SHAPES, SIMPLE_BACKGROUND

FOREGROUND = 60.0  # L1 distance (0-765) from the background colour above which a pixel is the shape's
MIN_PIXELS = 3  # fewer foreground pixels in a frame: nothing is there


def parse_prompt(prompt: str) -> dict:
    """'a red square moving left' -> {"shape": "square", "colour": "red", "direction": "left"}."""
    m = re.fullmatch(r"a (\w+) (\w+) moving (\w+)", prompt.strip())
    if not m:
        raise ValueError(f"prompt {prompt!r} is not 'a <colour> <shape> moving <direction>'")
    return {"colour": m.group(1), "shape": m.group(2), "direction": m.group(3)}


def foreground(clip: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> bool (T, H, W): pixels far from the background."""
    return np.abs(clip.astype(np.float32) - SIMPLE_BACKGROUND).sum(-1) > FOREGROUND


def colour_of(clip: np.ndarray) -> str | None:
    fg = foreground(clip)
    if fg.sum() < MIN_PIXELS:
        return None
    # edge pixels blend the colour with the background (bg + a (fg - bg)): compare directions away from the
    # background (cosine), which blending does not change, not the pixel values themselves
    mean = clip[fg].astype(np.float32).mean(0) - SIMPLE_BACKGROUND
    palette = COLOURS[:CAPTION_COLOURS] - SIMPLE_BACKGROUND
    cosine = palette @ mean / (np.linalg.norm(palette, axis=1) * np.linalg.norm(mean) + 1e-6)
    return COLOUR_NAMES[int(cosine.argmax())]


def direction_of(clip: np.ndarray) -> str | None:
    fg = foreground(clip)
    if min(fg[0].sum(), fg[-1].sum()) < MIN_PIXELS:
        return None
    yy, xx = np.mgrid[: clip.shape[1], : clip.shape[2]]
    first = np.array([yy[fg[0]].mean(), xx[fg[0]].mean()])
    last = np.array([yy[fg[-1]].mean(), xx[fg[-1]].mean()])
    dy, dx = last - first
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def silhouette(clip: np.ndarray, side: int = 8) -> np.ndarray:
    """The foreground of each frame cut to its bounding box and resized to side x side, averaged over frames:
    a translation- and scale-free picture of the shape (side * side features)."""
    fg = foreground(clip)
    out = np.zeros((side, side), dtype=np.float32)
    for mask in fg:
        ys, xs = np.nonzero(mask)
        if len(ys) < MIN_PIXELS:
            continue
        box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
        iy = (np.arange(side) + 0.5) * box.shape[0] / side
        ix = (np.arange(side) + 0.5) * box.shape[1] / side
        out += box[iy.astype(int)[:, None], ix.astype(int)[None, :]]
    return (out / len(fg)).reshape(-1)


class ShapeReader:
    """Which shape a clip shows: logistic regression on silhouettes of real clips."""

    def __init__(self, num_classes: int):
        from sklearn.linear_model import LogisticRegression

        self.num_classes = num_classes
        self.model = LogisticRegression(max_iter=2000, C=10.0)

    def fit(self, clips, labels) -> "ShapeReader":
        self.model.fit(np.stack([silhouette(c) for c in clips]), np.asarray(labels))
        return self

    def accuracy(self, clips, labels) -> float:
        return float((self.predict(clips) == np.asarray(labels)).mean())

    def predict(self, clips) -> np.ndarray:
        return self.model.predict(np.stack([silhouette(c) for c in clips]))

    def shape_of(self, clip: np.ndarray) -> str | None:
        if foreground(clip).sum() < MIN_PIXELS:
            return None
        return SHAPES[int(self.predict([clip])[0])]


def score(clips, prompts: list[str], shapes: ShapeReader) -> dict:
    """Per clip: which of shape, colour and direction match the prompt; and the rates."""
    rows = []
    for clip, prompt in zip(clips, prompts):
        want = parse_prompt(prompt)
        got = {"shape": shapes.shape_of(clip), "colour": colour_of(clip), "direction": direction_of(clip)}
        rows.append({"prompt": prompt, "got": got, **{k: got[k] == want[k] for k in want}})
    rate = {k: float(np.mean([r[k] for r in rows])) for k in ("shape", "colour", "direction")}
    rate["all three"] = float(np.mean([r["shape"] and r["colour"] and r["direction"] for r in rows]))
    return {"rows": rows, "rate": rate, "n": len(rows)}


__all__ = ["DIRECTIONS", "ShapeReader", "colour_of", "direction_of", "parse_prompt", "score", "silhouette"]
