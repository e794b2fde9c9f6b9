"""Clip fingerprints for near-duplicate search: 64-bit difference hashes (dHash) of evenly spaced frames.

dHash (N. Krawetz, "Kind of like that", 2013): shrink a grey frame to 9 x 8 pixels (width x height) and
set one bit per horizontally adjacent pair, "left is brighter than right": 8 rows x 8 pairs = 64 bits.
It ignores resolution, bitrate and small colour shifts, and two hashes compare in one XOR + popcount:
the Hamming distance. A clip's fingerprint is the dHash of `frames` evenly spaced frames (first to last),
so a re-encode at another frame size or bitrate gets (almost) the same fingerprint.

Two clips are near-duplicates when the median Hamming distance of their matched frames (frame i of one
against frame i of the other) is <= threshold (8 by default, METHOD.md). The median forgives a few frames
that changed (a cut, a re-timed first frame) without letting one lucky frame match.
"""

from __future__ import annotations

import numpy as np

HASH_W, HASH_H = 9, 8  # 9 columns give 8 left-right comparisons per row
DEFAULT_FRAMES = 5  # odd, so the median is one of the distances
DEFAULT_THRESHOLD = 8


def frame_indices(length: int, frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """`frames` evenly spaced indices from 0 to length-1 (repeats when the clip is shorter)."""
    if length < 1:
        raise ValueError(f"a clip needs at least one frame, got {length}")
    if frames < 1:
        raise ValueError(f"frames={frames} must be >= 1")
    return np.round(np.linspace(0, length - 1, frames)).astype(np.int64)


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights that average the input over n_out equal intervals (box filter, exact overlaps).

    Linear, so resizing a stack of frames is two small matrix products: no PIL, no loop over frames.
    """
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]  # (n_out, 1) interval bounds in input pixels
    px = np.arange(n_in)[None, :]  # input pixel p covers [p, p + 1)
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0.0, None)  # (n_out, n_in)
    return overlap / overlap.sum(axis=1, keepdims=True)


def grey(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., H, W) luma (ITU-R BT.601 weights)."""
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def dhash(frames: np.ndarray) -> np.ndarray:
    """uint8 frames (K, H, W, 3) -> uint64 (K,): one 64-bit dHash per frame, bit 63 = row 0, pair 0."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"dhash wants frames (K, H, W, 3), got shape {frames.shape}")
    k, h, w, _ = frames.shape
    small = area_matrix(h, HASH_H) @ grey(frames) @ area_matrix(w, HASH_W).T  # (K, 8, 9)
    bits = small[:, :, :-1] > small[:, :, 1:]  # (K, 8, 8): left brighter than right
    packed = np.packbits(bits.reshape(k, 64), axis=1)  # (K, 8) bytes, most significant bit first
    return packed.view(">u8").reshape(k).astype(np.uint64)


def clip_fingerprint(video: np.ndarray, frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """uint8 clip (T, H, W, 3) -> uint64 (frames,): the dHash of `frames` evenly spaced frames."""
    if video.ndim != 4:
        raise ValueError(f"clip_fingerprint wants a clip (T, H, W, 3), got shape {video.shape}")
    return dhash(video[frame_indices(len(video), frames)])


# --- Hamming distances -------------------------------------------------------------------------------

_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element -> uint8. np.bitwise_count (NumPy >= 2, one CPU instruction) or a byte table."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    b = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
    return _BYTE_POPCOUNT[b].sum(axis=-1, dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise Hamming distance of two broadcastable uint64 arrays -> uint8 in [0, 64]."""
    return popcount64(np.bitwise_xor(a, b))


def clip_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Median Hamming distance of matched frames of two fingerprints (frames,)."""
    return float(np.median(hamming(a, b)))
