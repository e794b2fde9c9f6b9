"""Old-school, weight-free video features for the Fréchet DoG distance (FDD, METHOD.md).

Per frame (frames 1..T-1 of every clip; frame 0 has no predecessor), 25 numbers in 8-bit pixel units:

    DoG band energies   12  RMS of DoG_s(channel) for s in {0.5, 1, 2, 4} px and R, G, B
    colour statistics    6  mean and standard deviation of R, G, B
    frame differences    7  RMS of (frame_t - frame_{t-1}) per channel, and RMS of DoG_s of the grey difference

DoG_s = G_s - G_{k s}, k = 1.6 (Marr & Hildreth 1980): a band-pass around spatial frequency 1.10 / s.
The energies say how much structure the frames hold at each scale (blur and high-frequency noise both
show up), the colour moments catch colour casts, and the difference statistics catch motion that is too
slow, too fast or flickering. Pixel units keep the numbers readable: a colour mean off by 10 grey levels
adds 100 to the FDD.

Gaussian filtering is separable 1-D correlation with scipy.ndimage.gaussian_filter's kernel (radius
int(4 s + 0.5)) and boundary mode ("reflect": d c b a | a b c d | d c b a), written in torch as one
small matrix per axis so that nothing needs scipy at run time; the tests compare against scipy. The DoG loss (stale/diffusion/dog.py)
implements the same filter for training and could later share this code or replace it.
"""

from __future__ import annotations

import torch

SIGMAS = (0.5, 1.0, 2.0, 4.0)  # DoG bands, pixels (METHOD.md)
K_RATIO = 1.6  # DoG_s = G_s - G_{k s}
TRUNCATE = 4.0  # kernel radius in standard deviations, as scipy's default
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601

FEATURE_NAMES = (
    [f"dog_s{s:g}_{c}" for c in "rgb" for s in SIGMAS]
    + [f"mean_{c}" for c in "rgb"] + [f"std_{c}" for c in "rgb"]
    + [f"diff_rms_{c}" for c in "rgb"] + [f"diff_dog_s{s:g}" for s in SIGMAS]
)


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE, dtype=torch.float32) -> torch.Tensor:
    """Normalised samples of exp(-x^2 / (2 sigma^2)) for x in [-r, r], r = int(truncate * sigma + 0.5)."""
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be > 0")
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def reflect_index(n: int, radius: int, device=None) -> torch.Tensor:
    """Indices of a length-n axis padded by `radius` on both sides in scipy's "reflect" mode (any radius)."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)  # the pattern repeats every 2n
    return torch.where(idx < n, idx, 2 * n - 1 - idx)


def blur_matrix(n: int, sigma: float, truncate: float = TRUNCATE, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, n) matrix of 1-D Gaussian filtering with reflect boundaries: y = M @ x for a length-n signal x.

    Frames are small, so filtering as a dense matrix product is faster than a convolution with padding
    and gathers (one GEMM per axis), and the boundary mode is folded into the matrix once.
    """
    k = gaussian_kernel1d(sigma, truncate, torch.float64)
    r = (len(k) - 1) // 2
    src = reflect_index(n, r)  # (n + 2r,): the input sample each padded position reads
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):  # output i reads padded positions i .. i + 2r with weights k
        m[i].index_add_(0, src[i : i + 2 * r + 1], k)
    return m.to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = TRUNCATE) -> torch.Tensor:
    """Gaussian filter over the last two axes of x (..., H, W); equals scipy.ndimage.gaussian_filter per image."""
    h, w = x.shape[-2:]
    mh = blur_matrix(h, sigma, truncate, x.dtype, x.device)
    mw = blur_matrix(w, sigma, truncate, x.dtype, x.device)
    return mh @ x @ mw.T  # (..., H, W): filter the columns, then the rows


def dog(x: torch.Tensor, sigma: float, k: float = K_RATIO) -> torch.Tensor:
    """Difference of Gaussians G_s x - G_{k s} x over the last two axes."""
    return gaussian_blur(x, sigma) - gaussian_blur(x, k * sigma)


def _rms(x: torch.Tensor) -> torch.Tensor:  # over the last two (spatial) axes
    return x.pow(2).mean(dim=(-2, -1)).sqrt()


@torch.no_grad()
def frame_features(clips: torch.Tensor, sigmas=SIGMAS) -> torch.Tensor:
    """uint8 or float clips (N, T, H, W, 3) in pixel units [0, 255] -> features (N, T-1, 25) float64."""
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"frame_features wants clips (N, T, H, W, 3), got shape {tuple(clips.shape)}")
    if clips.shape[1] < 2:
        raise ValueError(f"frame-difference features need clips of >= 2 frames, got T={clips.shape[1]}")
    x = clips.float().permute(0, 1, 4, 2, 3)  # (N, T, 3, H, W)
    cur = x[:, 1:]  # (N, T-1, 3, H, W): every frame that has a predecessor
    diff = cur - x[:, :-1]
    grey_diff = torch.einsum("ntchw,c->nthw", diff, torch.tensor(LUMA, device=x.device))
    feats = [torch.stack([_rms(dog(cur, s)) for s in sigmas], dim=-1).flatten(-2)]  # (N, T-1, 3*bands), c major
    feats += [cur.mean(dim=(-2, -1)), cur.std(dim=(-2, -1), correction=0)]  # (N, T-1, 3) each
    feats += [_rms(diff), torch.stack([_rms(dog(grey_diff, s)) for s in sigmas], dim=-1)]
    return torch.cat(feats, dim=-1).double()  # (N, T-1, 25)


def clip_batches_features(clips, batch: int = 64) -> torch.Tensor:
    """frame_features over an iterable or array of clips in batches -> (sum of frames, 25); keeps memory flat."""
    out, buf = [], []
    for clip in clips:
        buf.append(torch.as_tensor(clip))
        if len(buf) == batch:
            out.append(frame_features(torch.stack(buf)).flatten(0, 1))
            buf = []
    if buf:
        out.append(frame_features(torch.stack(buf)).flatten(0, 1))
    if not out:
        raise ValueError("no clips to compute features from")
    return torch.cat(out)
