"""The frames a user gives to condition on: an image (image-to-video) or the start of a video (continuation).

Both come back as uint8 (C, K, H, W) at the model's clip size. A square frame of another size is resized (bicubic,
with a note naming the file); a frame that is not square is refused with a message naming the file, since
stretching it would distort the objects the model is asked to continue (crop it first).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stale.data.video_io import VideoDecodeError, decode_mp4

log = logging.getLogger("stale")


class ConditioningError(ValueError):
    """A conditioning image or video that cannot be used; the message names the file."""


def fit_frames(frames: np.ndarray, size: int, name: str) -> np.ndarray:
    """uint8 (K, H, W, 3) -> (K, size, size, 3): as is, resized when square, refused otherwise."""
    k, h, w, _ = frames.shape
    if (h, w) == (size, size):
        return frames
    if h != w:
        raise ConditioningError(
            f"{name} is {w}x{h}, not square: the model makes {size}x{size} clips; crop it to a "
            "square (it is not stretched, which would distort its shapes)"
        )
    log.warning("%s is %dx%d: resized to the model's %dx%d", name, w, h, size, size)
    return np.stack([np.array(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).contiguous()  # (C, K, H, W)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file (PNG, JPEG, ...) as uint8 (3, 1, size, size)."""
    path = Path(path)
    if not path.is_file():
        raise ConditioningError(f"image={path} does not exist")
    try:
        with Image.open(path) as im:
            frame = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ConditioningError(f"image={path} is not a readable image ({err})") from None
    return _to_tensor(fit_frames(frame[None], size, f"image={path}"))


def load_video(path: str | Path, frames: int, size: int) -> torch.Tensor:
    """The first `frames` frames of a video file as uint8 (3, frames, size, size)."""
    path = Path(path)
    if not path.is_file():
        raise ConditioningError(f"video={path} does not exist")
    try:
        clip = decode_mp4(path.read_bytes(), name=f"video={path}", max_frames=frames)
    except VideoDecodeError as err:
        raise ConditioningError(str(err)) from None
    if len(clip) < frames:
        raise ConditioningError(f"video={path} has {len(clip)} frames, fewer than context_frames={frames}")
    return _to_tensor(fit_frames(clip, size, f"video={path}"))
