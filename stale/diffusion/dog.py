"""The paper's "old-school Difference-of-Gaussians objective", made a band-pass loss term (docs/training.md).

DoG_s = G_s - G_{k s} with k = 1.6 (Marr & Hildreth 1980). Its frequency response is
H(w) = exp(-s^2 w^2 / 2) - exp(-k^2 s^2 w^2 / 2), which peaks at w* = 1.098 / s rad/px. Bands s in {0.6, 1, 2, 4} px:
a sampled Gaussian of 0.5 px aliases (its band is a high-pass), and 0.6 px is the finest band whose realised peak is
within METHOD.md's 10% (tests/test_diffusion_dog.py measures it); a finer band works but `DoGLoss` warns.

Gaussian filtering is separable and matches `scipy.ndimage.gaussian_filter(..., mode="reflect", truncate=4.0)`,
with the reflection done by index arithmetic so that a kernel wider than the clip (s = 4 on 16 px) is still exact.
Because DoG is linear, the loss on the clean-sample error x1_hat - x = (1 - t)(v - u) is

    L_dog = sum_b w_b mean((1 - t)^2 DoG_b(v - u)^2),

with w_b = 1 / (n_bands * g_b), g_b the white-noise power gain of band b on the clip's own size: every band weighs
the same, and for white-noise errors E L_dog = E L_velocity. DoG of a constant is 0, so L_dog only ever adds to the
velocity loss.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

DOG_K = 1.6  # sigma ratio of the two Gaussians
DOG_BANDS = (0.6, 1.0, 2.0, 4.0)  # spatial sigmas in pixels; METHOD.md's 0.5 px band aliases (docstring)
TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage's default


def peak_frequency(sigma: float, k: float = DOG_K) -> float:
    """The analytic peak of the continuous DoG response, in rad/px: sqrt(4 ln k / (k^2 - 1)) / sigma."""
    return math.sqrt(4 * math.log(k) / (k * k - 1)) / sigma


def realised_peak(sigma: float, k: float = DOG_K, truncate: float = TRUNCATE, points: int = 1 << 14) -> float:
    """Peak of the implemented (sampled-kernel) DoG's frequency response, in rad/px, on [0, pi]."""
    g1, g2 = gaussian_kernel1d(sigma, truncate), gaussian_kernel1d(k * sigma, truncate)
    r = len(g2) // 2
    h = F.pad(g1, (r - len(g1) // 2,) * 2) - g2  # both centred on the same tap
    w = torch.linspace(0, math.pi, points, dtype=torch.float64)
    n = torch.arange(-r, r + 1, dtype=torch.float64)
    response = (h[None, :] * torch.cos(w[:, None] * n[None, :])).sum(1).abs()  # h is symmetric: a cosine sum
    return float(w[response.argmax()])


@lru_cache(maxsize=64)
def _kernel1d(sigma: float, truncate: float) -> torch.Tensor:
    """scipy.ndimage's sampled Gaussian: exp(-x^2 / (2 s^2)) on x = -r..r, r = int(truncate s + 0.5), sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> torch.Tensor:
    if sigma <= 0:
        raise ValueError(f"Gaussian sigma={sigma} must be > 0")
    return _kernel1d(float(sigma), float(truncate))


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by `radius` with scipy's 'reflect' rule, for any radius."""
    p = torch.arange(-radius, n + radius, device=device) % (2 * n)  # the rule is periodic with period 2n
    return torch.where(p >= n, 2 * n - 1 - p, p)


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    radius = (len(kernel) - 1) // 2
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, 1, n).index_select(-1, _reflect_index(n, radius, x.device))  # (M, 1, n + 2r)
    out = F.conv1d(rows, kernel.to(device=x.device, dtype=x.dtype).view(1, 1, -1))  # symmetric: conv == corr
    return out.view(moved.shape).movedim(-1, dim)


def gaussian_blur(x: torch.Tensor, sigma: float, dims=(-2, -1), truncate: float = TRUNCATE) -> torch.Tensor:
    """Separable Gaussian blur of x along `dims`; equals scipy.ndimage.gaussian_filter with sigma on those
    axes, 0 elsewhere, mode='reflect'. Differentiable (it is conv1d)."""
    kernel = gaussian_kernel1d(sigma, truncate)
    for d in dims:
        x = _blur_axis(x, kernel, d)
    return x


def dog(x: torch.Tensor, sigma: float, k: float = DOG_K, dims=(-2, -1)) -> torch.Tensor:
    """DoG_s x = G_s x - G_{k s} x along `dims` (the spatial axes H, W of (B, C, T, H, W) by default)."""
    return gaussian_blur(x, sigma, dims) - gaussian_blur(x, k * sigma, dims)


@torch.compiler.assume_constant_result  # a number fixed by the shapes: a compiled step embeds it, no .item() break
def dog_gain(sigma: float, k: float = DOG_K, sizes=(16, 16), truncate: float = TRUNCATE) -> float:
    """White-noise power gain E||DoG n||^2 / E||n||^2 of the separable DoG on an array of `sizes`, boundaries
    included (on 16 px the 4 px band's gain is ~1.4x its infinite-domain value, so this is exact, not ideal).

    With A_d, B_d the (n_d, n_d) matrices of G_s and G_ks along axis d, the operator is (x)A_d - (x)B_d and
    ||(x)A_d - (x)B_d||_F^2 = prod tr(A_d'A_d) - 2 prod tr(A_d'B_d) + prod tr(B_d'B_d).
    """
    return _dog_gain(float(sigma), float(k), tuple(int(n) for n in sizes), float(truncate))


@lru_cache(maxsize=256)
def _dog_gain(sigma: float, k: float, sizes: tuple, truncate: float) -> float:
    aa = ab = bb = 1.0
    for n in sizes:
        eye = torch.eye(n, dtype=torch.float64)
        a = gaussian_blur(eye, sigma, dims=(0,), truncate=truncate)  # column j: the blur of a delta at j
        b = gaussian_blur(eye, k * sigma, dims=(0,), truncate=truncate)
        aa, ab, bb = aa * (a * a).sum().item(), ab * (a * b).sum().item(), bb * (b * b).sum().item()
    volume = math.prod(sizes)
    return (aa - 2 * ab + bb) / volume


class DoGLoss:
    """sum_b w_b mean(DoG_b(e)^2) for an error e (B, C, T, H, W); spatial per frame, optionally also in time.

    temporal=True filters along T as well, with the same sigmas in frames (a space-time DoG). On short
    clips (8 frames) the large bands then mostly see the reflected boundary: use it for longer clips.
    """

    def __init__(self, bands=DOG_BANDS, k: float = DOG_K, temporal: bool = False):
        bands = tuple(float(s) for s in bands)
        if not bands or min(bands) <= 0:
            raise ValueError(f"diffusion.dog_bands={list(bands)} must be a non-empty list of sigmas > 0")
        if k <= 1:
            raise ValueError(f"diffusion.dog_k={k} must be > 1 (the second Gaussian is the wider one)")
        self.bands, self.k, self.temporal = bands, float(k), bool(temporal)
        for s in bands:  # a band that aliases is a high-pass: say so, with the numbers
            peak, expected = realised_peak(s, self.k), peak_frequency(s, self.k)
            if abs(peak - expected) > 0.10 * expected:
                warnings.warn(
                    f"diffusion.dog_bands: the {s} px band peaks at {peak:.2f} rad/px, not "
                    f"{expected:.2f} (a sampled Gaussian below ~0.6 px aliases; "
                    "it acts as a high-pass)",
                    stacklevel=2,
                )
        self.dims = (-3, -2, -1) if temporal else (-2, -1)

    def weights(self, sizes) -> tuple:
        """Per-band normalisation w_b = 1 / (n_bands g_b) for an error of spatial(-temporal) `sizes`."""
        return tuple(1.0 / (len(self.bands) * dog_gain(s, self.k, sizes)) for s in self.bands)

    def __call__(self, err: torch.Tensor) -> torch.Tensor:
        if err.ndim != 5:
            raise ValueError(f"DoGLoss expects a (B, C, T, H, W) tensor, got shape {tuple(err.shape)}")
        total = err.new_zeros(())
        for s, w in zip(self.bands, self.weights(tuple(err.shape[d] for d in self.dims))):
            total = total + w * dog(err, s, self.k, self.dims).pow(2).mean()
        return total
