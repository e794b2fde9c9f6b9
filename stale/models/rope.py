"""3D axial rotary position embeddings (model.pos=rope): q and k rotated by the token's (t, h, w) inside attention.

RoPE (Su et al. 2021) rotates each pair of query/key channels by an angle proportional to the token's position, so
q_i . k_j depends on the positions only through i - j. The head dimension is split into time, height and width parts
as Wan 2.1 does (d - 4 (d // 6) channels for time, 2 (d // 6) each for height and width), theta 10000 per axis.
Spatial attention rotates by (h, w), temporal attention by t, full attention by (t, h, w); a part a mode does not
rotate keeps angle 0. The joy token's (h, w) parts are never rotated (it scores as if at the origin, as ViT's class
token under 2D RoPE; docs/buckets.md says why), its time part turns with its frame's t. That also keeps sequence
parallelism free of rank offsets: every mode's table covers an axis its ranks hold whole (see `tables`).

The tables are computed once per forward for the clip's grid and shared by every block, from plain ops (arange,
outer products, cos, sin, slices) that torch.export and ONNX write as they are.
"""

from __future__ import annotations

import math

import torch

THETA = 10000.0


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """(time, height, width) channels of one head: Wan 2.1's split, d - 4 (d // 6) for time, 2 (d // 6) each for
    height and width. All three are even (a channel pair per frequency) and > 0 when head_dim is even and >= 6."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(n: int, dim: int, device, scale: float = 1.0) -> torch.Tensor:
    """Angles of positions 0, scale, 2 scale, ... (n of them) for a `dim`-channel part: (n, dim / 2), frequencies
    theta^(-2i/dim)."""
    freqs = 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)  # (dim/2,)
    return (torch.arange(n, dtype=torch.float32, device=device) * scale)[:, None] * freqs[None]


def tables(
    head_dim: int, t: int, h: int, w: int, device=None, base: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) of each attention mode's rotation for a grid of t x h x w patches (joy token last per frame).

    spatial  (N, head_dim / 2),       N = h w + 1: (h, w) angles, the joy token's all 0
    temporal (t, head_dim / 2):       t angles, the same for every position (the joy token's included)
    full     (t N, head_dim / 2):     both, summed: the t angle of the frame, the (h, w) angles of the place

    Under sequence parallelism each table applies unchanged: spatial blocks hold whole frames (all N), temporal
    blocks whole positions (all t) and full attention rotates after the Ulysses exchange, when a rank holds its
    heads over the whole clip (Attention.forward).

    base (StaleConfig.pos_base): resolution-scaled spatial positions, indices x base / sqrt(h w), as for the sin-cos
    code, so every grid spans about `base` positions per side (for RoPE this is position interpolation: Chen et al.
    2023, "Extending Context Window of Large Language Models via Positional Interpolation"; the time axis is not
    scaled). Scores then depend on the offsets in units of the frame, not of patches.
    """
    dt, dh, dw = rope_dims(head_dim)
    scale = 1.0 if base is None else base / math.sqrt(h * w)
    at, ah, aw = _angles(t, dt, device), _angles(h, dh, device, scale), _angles(w, dw, device, scale)  # (t, dt/2) ...
    place = torch.cat([ah[:, None].expand(h, w, dh // 2), aw[None].expand(h, w, dw // 2)], dim=-1)  # (h, w, (dh+dw)/2)
    place = torch.cat([place.reshape(h * w, -1), place.new_zeros(1, place.shape[-1])])  # (N, (dh+dw)/2), joy last
    spatial = torch.cat([place.new_zeros(h * w + 1, dt // 2), place], dim=-1)  # (N, head_dim/2)
    temporal = torch.cat([at, at.new_zeros(t, (dh + dw) // 2)], dim=-1)  # (t, head_dim/2)
    full = (temporal[:, None] + spatial[None]).reshape(t * (h * w + 1), -1)  # (t N, head_dim/2)
    return {mode: (a.cos(), a.sin()) for mode, a in (("spatial", spatial), ("temporal", temporal), ("full", full))}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (..., L, d) by the angles whose cos, sin are (L, d/2) (the
    "rotate half" layout of GPT-NeoX and Wan's real-valued form). Computed in float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
