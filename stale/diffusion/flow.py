"""Uniform-prior flow matching: priors, timesteps, the probability path and its velocity target.

Conventions (shared/METHOD.md): data x in [-1, 1], prior z ~ p0, t in [0, 1] with t=0 the prior and
t=1 the data. Path x_t = (1 - t) z + t x, target velocity u = x - z, clean estimate x1 = x_t + (1 - t) v.
The paper's "maximum-entropy uniform prior" is U[-1, 1]^d: the maximum-entropy law on the pixel range.
In a latent space the prior is U[-a, a]^d with a = `scale` (docs/latent.md: a = sqrt(3) matches the unit
variance of normalised latents); the Gaussian is scaled the same way (std = scale / sqrt(3)) only when asked.
"""

from __future__ import annotations

import math

import torch

PRIORS = ("uniform", "gaussian")
TIME_SAMPLERS = ("logit_normal", "uniform")


def sample_prior(
    shape,
    prior: str = "uniform",
    generator: torch.Generator | None = None,
    device=None,
    dtype=torch.float32,
    scale: float = 1.0,
) -> torch.Tensor:
    """Draw z ~ p0: U[-scale, scale]^d (`uniform`, the default; scale 1 on pixels) or N(0, I) (`gaussian`, the
    ablation baseline, unit variance whatever the scale: it already matches normalised latents)."""
    if prior == "uniform":
        z = torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1
        return z * scale if scale != 1.0 else z
    if prior == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"diffusion.prior={prior!r} is not one of {PRIORS}")


def sample_time(
    n: int,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Training times t in (0, 1): logit-normal (SD3, Esser et al. 2024) concentrates on mid times."""
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    raise ValueError(f"diffusion.time_sampling={kind!r} is not one of {TIME_SAMPLERS}")


def tokens(shape, patch) -> int:
    """Tokens T' H' W' of a clip of shape (..., T, H, W) through `patch` (pt, ph, pw)."""
    return (shape[-3] // patch[0]) * (shape[-2] // patch[1]) * (shape[-1] // patch[2])


def token_shift(tokens: int, base: int | None, scale: float = 1.0) -> float:
    """The time shift for a clip of `tokens` tokens (SD3, Open-Sora 1.2): scale * sqrt(tokens / base); 1 (no shift)
    when base is None. More tokens carry more redundant signal, so the same noise level destroys less of it:
    a shift > 1 spends more of training and sampling near the noise."""
    return 1.0 if base is None else float(scale) * math.sqrt(tokens / base)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shifted time sigma' = s sigma / (1 + (s - 1) sigma), written for stale's t (t = 0 noise, 1 data:
    sigma = 1 - t): t' = t / (1 + (s - 1)(1 - t)). Keeps t = 0 and t = 1; s > 1 moves times toward the noise."""
    return t if shift == 1 else t / (1 + (shift - 1) * (1 - t))


def to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]. Out of place (a new float tensor), so the caller's batch is untouched;
    called on the device, so that loaders ship bytes (4x fewer than floats)."""
    return video.float() / 127.5 - 1.0


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest level (the inverse of to_unit_range on uint8)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def expand_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample times (B,) against x (B, ...)."""
    return t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(z: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The straight path x_t = (1 - t) z + t x."""
    tt = expand_t(t, x)
    return (1 - tt) * z + tt * x


def velocity_target(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """u = x - z, the constant velocity of the straight path."""
    return x - z


def clean_estimate(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x1_hat = x_t + (1 - t) v: where the current velocity would land at t = 1."""
    return x_t + (1 - expand_t(t, x_t)) * v
