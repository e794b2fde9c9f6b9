"""Encode and decode video with PyAV (FFmpeg): whole mp4 clips, training clips, and source videos.

Every clip in stale is a uint8 array (T, H, W, C) on disk and in the loader; the system turns it into
float (B, C, T, H, W) in [-1, 1] on the device, so the loader ships 4x fewer bytes than floats would.

Speed notes (measured on 16x16 clips, see docs/bench/data.md): `frame.to_ndarray(format="rgb24")` builds
a new swscale context for every frame, which costs more than decoding a small frame. One
`VideoReformatter` per process keeps its context cached between frames of the same shape, with
bit-identical output, so every decode here goes through `_reformatter()`.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter


class VideoDecodeError(ValueError):
    """A clip could not be decoded; the message names the clip."""


class ClipTooShort(VideoDecodeError):
    """The video decoded fine but holds fewer frames than the clip needs."""


_DECODE_ERRORS = (av.FFmpegError, ValueError, IndexError, EOFError, OverflowError, ZeroDivisionError)
_REFORMATTERS: dict[int, VideoReformatter] = {}


def _reformatter() -> VideoReformatter:
    """One cached swscale context per process: a forked loader worker makes its own and never frees the
    parent's (freeing a context whose threads lived in the parent deadlocks in the child)."""
    pid = os.getpid()
    if pid not in _REFORMATTERS:
        _REFORMATTERS[pid] = VideoReformatter()
    return _REFORMATTERS[pid]


def _rate(fps) -> Fraction:
    """8 -> 8/1, 29.97 -> 30000/1001, Fraction(30000, 1001) stays."""
    return Fraction(fps).limit_denominator(1001)


def encode_mp4(
    frames: np.ndarray,
    fps: float | Fraction = 8,
    crf: int = 12,
    codec: str = "libx264",
    preset: str = "medium",
    tune: str | None = "animation",
) -> bytes:
    """Encode uint8 frames (T, H, W, 3) as an H.264 mp4 in memory.

    A low CRF keeps the tiny synthetic clips close to lossless; yuv420p keeps them playable anywhere.
    `tune="animation"` suits the synthetic shapes; pass `tune=None` for camera footage.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"encode_mp4 wants uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with yuv420p needs even height and width, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=_rate(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # one encoder thread: x264's threaded encoder gave 3-6 different bitstreams of the same 40 clips in 30
        # tries here, so the synthetic dataset (and every loss trained on it) changed from run to run
        options = {"crf": str(crf), "preset": preset, "threads": "1"}
        if tune:
            options["tune"] = tune
        stream.options = options
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return buf.getvalue()


def _set_threads(stream, threads: int) -> None:
    """threads=1: no decoder threads (loader workers are the parallelism); 0: FFmpeg's automatic count;
    N > 1: N frame+slice threads (pays off for large frames, adds latency for short clips)."""
    if threads == 1:
        stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
    elif threads != 0:
        stream.thread_type, stream.codec_context.thread_count = "AUTO", threads
    else:
        stream.thread_type = "AUTO"


def decode_mp4(data: bytes, name: str = "<bytes>", max_frames: int | None = None, threads: int = 0) -> np.ndarray:
    """Decode mp4 bytes to uint8 (T, H, W, 3). Raises VideoDecodeError naming `name` on any failure."""
    frames = []
    rgb = _reformatter()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name}: no video stream")
            stream = container.streams.video[0]
            if threads:
                _set_threads(stream, threads)
            for frame in container.decode(stream):
                frames.append(rgb.reformat(frame, format="rgb24", threads=1).to_ndarray())
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoDecodeError:
        raise
    except _DECODE_ERRORS as e:
        raise VideoDecodeError(f"{name}: cannot decode mp4 ({type(e).__name__}: {e})") from e
    if not frames:
        raise VideoDecodeError(f"{name}: mp4 holds no frames")
    return np.stack(frames)


def write_mp4_file(path, frames: np.ndarray, fps: int = 8) -> None:
    """Write uint8 frames (T, H, W, 3) to an mp4 file."""
    with open(path, "wb") as f:
        f.write(encode_mp4(frames, fps=fps))


# --------------------------------------------------------------------------------------------------
# Training clips: pick frames, resize, crop, flip, all while decoding once.


@dataclass
class ClipSpec:
    """How a stored video becomes one training clip (T = frames, H = W = size, or height x width)."""

    frames: int = 8  # frames per clip
    size: int | None = 16  # output height = width; None keeps the stored size (must then be square)
    stride: int = 1  # take every stride-th stored frame ...
    fps: float | None = None  # ... or resample to this frame rate (overrides stride)
    start: str = "random"  # random | center | first: where the clip starts in the stored video
    crop: str = "random"  # random | center: which size x size window after resizing the short side
    hflip: bool = False  # random horizontal flip with p = 0.5
    threads: int = 1  # decoder threads per clip; see _set_threads
    # A non-square output (a bucket's, stale/data/buckets.py): resized to cover height x width, then cropped.
    # Both set, they replace `size`.
    height: int | None = None
    width: int | None = None

    @property
    def out_hw(self) -> tuple[int, int] | None:
        """(height, width) of the clip, or None: the stored size."""
        if self.height is not None and self.width is not None:
            return self.height, self.width
        return None if self.size is None else (self.size, self.size)

    def __post_init__(self):
        if (self.height is None) != (self.width is None):
            raise ValueError(f"height={self.height} and width={self.width}: set both or neither")
        if self.frames < 1:
            raise ValueError(f"frames={self.frames} must be >= 1")
        if self.start not in ("random", "center", "first"):
            raise ValueError(f"start={self.start!r}: use random, center or first")
        if self.crop not in ("random", "center"):
            raise ValueError(f"crop={self.crop!r}: use random or center")
        if self.stride < 1:
            raise ValueError(f"stride={self.stride} must be >= 1")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps={self.fps} must be > 0")


def _frame_indices(spec: ClipSpec, total: int, src_fps: float, rng: random.Random) -> list[int]:
    """Stored-frame indices of one clip, given the stored video's frame count and rate."""
    step = src_fps / spec.fps if (spec.fps and src_fps > 0) else spec.stride
    if isinstance(step, int):
        offsets = range(0, spec.frames * step, step)
    else:
        offsets = [round(k * step) for k in range(spec.frames)]
    need = offsets[-1] + 1
    if total < need:
        raise ClipTooShort(f"{total} frames, the clip needs {need} ({spec.frames} frames, step {step:g})")
    slack = total - need
    start = rng.randrange(slack + 1) if spec.start == "random" else (slack // 2 if spec.start == "center" else 0)
    return [start + o for o in offsets]


def _out_shape(w: int, h: int, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """Resized (width, height) that just covers `size` (an int: a square; or (height, width)) keeping the aspect:
    for a square, the short side becomes `size`."""
    if size is None:
        return w, h
    th, tw = (size, size) if isinstance(size, int) else size
    scale = max(th / h, tw / w)
    if scale == 1:
        return w, h
    return max(tw, int(round(w * scale))), max(th, int(round(h * scale)))


def decode_clip(
    data: bytes,
    spec: ClipSpec,
    rng: random.Random,
    name: str = "<bytes>",
    out: np.ndarray | None = None,
    format: str | None = None,
) -> np.ndarray:
    """Decode one training clip from video bytes: uint8 (T, size, size, 3).

    Decodes sequentially and stops after the last frame the clip needs; only those frames are converted
    to RGB (and resized by swscale). When the container's frame count is missing or wrong, a second pass
    picks the clip from the frames that really decoded.

    out: a (3, T, size, size) uint8 array (one sample of a channels-first batch) to write the clip into
    directly, frame by frame, instead of stacking it first; returned as it is. The loader uses this.
    format: the container format to try first ("mp4" for a .mp4 member): skips FFmpeg's probing, 15% of
    a 16x16 clip's decode; bytes that are not in that format are probed as usual.
    """
    try:
        return _decode_clip(data, spec, rng, name, None, out, format)
    except VideoDecodeError:
        raise
    except _DECODE_ERRORS as e:
        raise VideoDecodeError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from e


def _open(data: bytes, format: str | None):
    if format is not None:
        try:
            return av.open(io.BytesIO(data), mode="r", format=format)
        except av.FFmpegError:
            pass  # not that format after all: let FFmpeg probe
    return av.open(io.BytesIO(data), mode="r")


def _decode_clip(
    data: bytes,
    spec: ClipSpec,
    rng: random.Random,
    name: str,
    total_hint: int | None,
    out: np.ndarray | None,
    format: str | None = None,
):
    rgb = _reformatter()
    with _open(data, format) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{name}: no video stream")
        stream = container.streams.video[0]
        _set_threads(stream, spec.threads)
        total = total_hint if total_hint is not None else stream.frames
        src_fps = float(stream.average_rate or stream.guessed_rate or 0) if spec.fps else 0.0  # only fps needs it
        indices = None
        if total:
            try:
                indices = _frame_indices(spec, total, src_fps, rng)
            except ClipTooShort as e:
                raise ClipTooShort(f"{name}: {e}") from None
        slots: dict[int, list[int]] = {}  # stored-frame index -> positions in the clip (repeats when upsampling)
        for pos, i in enumerate(indices or ()):
            slots.setdefault(i, []).append(pos)
        last = max(slots) if slots else None
        kept: dict[int, np.ndarray] = {}
        raw: list = []  # frames kept unconverted when the count is unknown
        n, shape, window, filled = 0, None, None, 0
        for i, frame in enumerate(container.decode(stream)):
            n = i + 1
            if shape is None:
                shape = _out_shape(frame.width, frame.height, spec.out_hw)
            if indices is None:
                raw.append(frame)
            elif i in slots and out is None:
                kept[i] = np.stack(_rgb_planes(rgb, frame, shape), axis=-1)
            elif i in slots:  # straight into the batch: one plane copy per channel, no HWC -> CHW transpose
                if window is None:
                    window = _window(shape[1], shape[0], spec, rng)
                    top, left, hh, ww, flip = window
                    whole = (top, left, hh, ww, flip) == (0, 0, shape[1], shape[0], False)
                for channel, plane in enumerate(_rgb_planes(rgb, frame, shape)):
                    if not whole:
                        plane = plane[top : top + hh, left : left + ww]
                        plane = plane[:, ::-1] if flip else plane
                    for pos in slots[i]:
                        out[channel, pos] = plane
                filled += 1
            if last is not None and i >= last:
                break
    if n == 0:
        raise VideoDecodeError(f"{name}: video holds no frames")
    if indices is None:  # unknown frame count: choose from what decoded
        try:
            indices = _frame_indices(spec, n, src_fps, rng)
        except ClipTooShort as e:
            raise ClipTooShort(f"{name}: {e}") from None
        kept = {i: np.stack(_rgb_planes(rgb, raw[i], shape), axis=-1) for i in set(indices)}
    elif len(kept) + filled < len(slots):  # the header over-counted (e.g. a cut file): retry with the true count
        if total_hint is not None:
            raise ClipTooShort(f"{name}: decoded {n} frames, header said {total}")
        return _decode_clip(data, spec, rng, name, n, out, format)
    if out is not None and filled:
        return out
    clip = np.stack([kept[i] for i in indices])  # (T, h, w, 3)
    clip = _apply(clip, _window(clip.shape[1], clip.shape[2], spec, rng))
    if out is not None:
        out[:] = clip.transpose(3, 0, 1, 2)
        return out
    return clip


def _rgb_planes(rgb: VideoReformatter, frame, shape) -> list[np.ndarray]:
    """The frame resized to shape (w, h) as [R, G, B] uint8 (h, w) planes (views of swscale's output).

    Planar RGB ("gbrp") lets the loader fill a channels-first batch with plain plane copies. Its values
    equal packed rgb24's when nothing is resized; when resizing, the two swscale paths round differently.
    Output widths that are not a multiple of 16 go through packed rgb24 instead: FFmpeg's gbrp output left
    columns past 16 unwritten (garbage, different on every call) at widths 20, 24, 40 and 56 (tests/test_buckets.py).
    """
    if shape[0] % 16:
        a = rgb.reformat(
            frame, width=shape[0], height=shape[1], format="rgb24", interpolation=_interp(frame, shape), threads=1
        ).to_ndarray()
        return [a[..., 0], a[..., 1], a[..., 2]]
    g = rgb.reformat(
        frame, width=shape[0], height=shape[1], format="gbrp", interpolation=_interp(frame, shape), threads=1
    )
    g, b, r = (np.ndarray((p.height, p.width), np.uint8, p, strides=(p.line_size, 1)) for p in g.planes)
    return [r, g, b]


def _interp(frame, shape) -> str | None:
    if (frame.width, frame.height) == shape:
        return None  # format conversion only: same result as frame.to_ndarray(format="rgb24")
    return "AREA" if shape[0] < frame.width else "BILINEAR"


def _window(h: int, w: int, spec: ClipSpec, rng: random.Random) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) of the crop; draws the crop offsets, then the flip, from rng."""
    out = spec.out_hw
    if out is None:
        if h != w:
            raise VideoDecodeError(f"size=None needs square videos, got {w}x{h}")
        out = (h, w)
    th, tw = out
    if spec.crop == "random":
        top, left = rng.randrange(h - th + 1), rng.randrange(w - tw + 1)
    else:
        top, left = (h - th) // 2, (w - tw) // 2
    flip = bool(spec.hflip and rng.random() < 0.5)
    return top, left, th, tw, flip


def _apply(a: np.ndarray, window: tuple[int, int, int, int, bool]) -> np.ndarray:
    """Crop (..., H, W, C) to the window and flip it horizontally if asked (views, no copy)."""
    top, left, th, tw, flip = window
    a = a[..., top : top + th, left : left + tw, :]
    return a[..., ::-1, :] if flip else a


# --------------------------------------------------------------------------------------------------
# Source videos (stale-shards): probe, then stream frames at a target rate and size.


@dataclass
class VideoInfo:
    path: str
    codec: str
    width: int
    height: int
    fps: float  # average frame rate
    frames: int  # from the container; 0 when unknown
    duration: float  # seconds; 0 when unknown


def aspect_shape(h: int, w: int, area: int, grid: int) -> tuple[int, int]:
    """(height, width) of a h x w picture scaled to about `area` pixels, keeping its aspect, each side a multiple
    of `grid` (the model's patch in pixels; even for H.264). Never scales up: a smaller picture keeps its size,
    rounded down to the grid (at least one grid cell)."""
    scale = min(1.0, (area / (h * w)) ** 0.5)
    return (
        max(grid, int(h * scale / grid + 0.5) * grid if scale < 1 else h // grid * grid),
        max(grid, int(w * scale / grid + 0.5) * grid if scale < 1 else w // grid * grid),
    )


def probe(path: str) -> VideoInfo:
    """Container metadata of a video file; raises VideoDecodeError naming the file."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0)
            duration = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
            return VideoInfo(str(path), s.codec_context.name, s.width, s.height, fps, s.frames or 0, duration)
    except VideoDecodeError:
        raise
    except (*_DECODE_ERRORS, OSError) as e:
        raise VideoDecodeError(f"{path}: cannot open video ({type(e).__name__}: {e})") from e


def iter_frames(
    path: str, fps: float | None = None, size: int | tuple[int, int] | None = None, threads: int = 0
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (time in seconds from the first frame, uint8 (H, W, 3)) from any video FFmpeg reads.

    fps: resample to this rate by taking, for each output time k/fps, the stored frame nearest to it
    (frames are dropped or repeated; variable frame rates come out constant). None keeps every frame.
    size: an int: resize the short side to `size`, then centre-crop to size x size; (height, width): resize to
    cover it keeping the aspect, then centre-crop to it. None keeps the stored size, cropped to even height and
    width (H.264 needs them).
    """
    rgb = _reformatter()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = c.streams.video[0]
            _set_threads(stream, threads)
            src_fps = float(stream.average_rate or stream.guessed_rate or 25)
            t0, prev, prev_t, prev_rgb, k = None, None, 0.0, None, 0
            shape = None

            def convert(frame):
                a = rgb.reformat(
                    frame,
                    width=shape[0],
                    height=shape[1],
                    format="rgb24",
                    interpolation=_interp(frame, shape),
                    threads=1,
                ).to_ndarray()
                return _centre_crop(a, size)

            for i, frame in enumerate(c.decode(stream)):
                if shape is None:
                    shape = _out_shape(frame.width, frame.height, size)
                t = frame.time if frame.time is not None else i / src_fps
                t0 = t if t0 is None else t0
                t -= t0
                if fps is None:
                    yield t, convert(frame)
                    continue
                if prev is not None:  # prev is the nearest stored frame for every output time before mid
                    mid = (prev_t + t) / 2
                    while k / fps < mid:
                        prev_rgb = convert(prev) if prev_rgb is None else prev_rgb  # dropped frames: never converted
                        yield k / fps, prev_rgb
                        k += 1
                prev, prev_t, prev_rgb = frame, t, None
            if fps is not None and prev is not None:
                end = prev_t + 0.5 / src_fps
                while k / fps < end:
                    prev_rgb = convert(prev) if prev_rgb is None else prev_rgb
                    yield k / fps, prev_rgb
                    k += 1
    except VideoDecodeError:
        raise
    except (*_DECODE_ERRORS, OSError) as e:
        raise VideoDecodeError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e


def _centre_crop(a: np.ndarray, size: int | tuple[int, int] | None) -> np.ndarray:
    h, w = a.shape[:2]
    th, tw = (h - h % 2, w - w % 2) if size is None else ((size, size) if isinstance(size, int) else size)
    top, left = (h - th) // 2, (w - tw) // 2
    return a[top : top + th, left : left + tw]
