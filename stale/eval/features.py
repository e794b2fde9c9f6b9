"""Old-school, weight-free video features for the Fréchet DoG distance (FDD, METHOD.md; docs/evaluation.md).

Per frame (frames 1..T-1 of every clip; frame 0 has no predecessor), 25 numbers in 8-bit pixel units:

    DoG band energies   12  RMS of DoG_s(channel) for s in {0.6, 1, 2, 4} px and R, G, B
    colour statistics    6  mean and standard deviation of R, G, B
    frame differences    7  RMS of (frame_t - frame_{t-1}) per channel, and RMS of DoG_s of the grey difference

The filter and its bands are the DoG loss's (stale/diffusion/dog.py). The energies catch blur and noise, the
colour moments colour casts, the differences motion that is too slow, too fast or flickering. Pixel units keep the
numbers readable: a colour mean off by 10 grey levels adds 100 to the FDD.
"""

from __future__ import annotations

import torch

from stale.diffusion.dog import DOG_BANDS, dog

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601

FEATURE_NAMES = (
    [f"dog_s{s:g}_{c}" for c in "rgb" for s in DOG_BANDS]
    + [f"mean_{c}" for c in "rgb"]
    + [f"std_{c}" for c in "rgb"]
    + [f"diff_rms_{c}" for c in "rgb"]
    + [f"diff_dog_s{s:g}" for s in DOG_BANDS]
)


def _rms(x: torch.Tensor) -> torch.Tensor:  # over the last two (spatial) axes
    return x.pow(2).mean(dim=(-2, -1)).sqrt()


@torch.no_grad()
def frame_features(clips: torch.Tensor, sigmas=DOG_BANDS) -> torch.Tensor:
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
