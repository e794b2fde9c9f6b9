"""Encode and decode short mp4 clips with PyAV.

Every clip in stale is a uint8 array (T, H, W, C) on disk and in the loader; the system turns it into
float (B, C, T, H, W) in [-1, 1] on the device, so the loader ships 4x fewer bytes than floats would.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np


class VideoDecodeError(ValueError):
    """A clip could not be decoded; the message names the clip."""


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 12, codec: str = "libx264") -> bytes:
    """Encode uint8 frames (T, H, W, 3) as an H.264 mp4 in memory.

    A low CRF keeps the tiny synthetic clips close to lossless; yuv420p keeps them playable anywhere.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"encode_mp4 wants uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with yuv420p needs even height and width, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "tune": "animation"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes, name: str = "<bytes>", max_frames: int | None = None, threads: int = 0) -> np.ndarray:
    """Decode mp4 bytes to uint8 (T, H, W, 3). Raises VideoDecodeError naming `name` on any failure."""
    frames = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name}: no video stream")
            stream = container.streams.video[0]
            if threads:
                stream.thread_type, stream.thread_count = "AUTO", threads
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoDecodeError:
        raise
    except (av.FFmpegError, ValueError, IndexError, EOFError) as e:
        raise VideoDecodeError(f"{name}: cannot decode mp4 ({type(e).__name__}: {e})") from e
    if not frames:
        raise VideoDecodeError(f"{name}: mp4 holds no frames")
    return np.stack(frames)


def write_mp4_file(path, frames: np.ndarray, fps: int = 8) -> None:
    """Write uint8 frames (T, H, W, 3) to an mp4 file."""
    with open(path, "wb") as f:
        f.write(encode_mp4(frames, fps=fps))
