"""Frame conditioning: the first K frames of a clip given as clean context (image-to-video, continuation).

The LTX-Video recipe (HaCohen et al. 2024, sec. 3.3): a context frame sits at the clean end of the path (t = 1,
x_t = x), the model gets one time per latent frame, and the context frames are left out of the loss. No new layer:
each frame's adaLN-Zero modulation already reads its own time, so a model trained without context can be
fine-tuned into one with it (docs/finetune.md says why not Open-Sora 2.0's channel concat). context_frames counts
frames of the clip the model sees and must be a multiple of the temporal patch pt.
"""

from __future__ import annotations

import torch


def latent_context(context_frames: int, frames: int, pt: int) -> int:
    """Context length in latent frames, checking it fits: 0 <= K < T and K divisible by pt."""
    if context_frames % pt or not 0 <= context_frames < frames:
        raise ValueError(
            f"context_frames={context_frames} must be a multiple of the temporal patch {pt} and "
            f"less than the clip's {frames} frames"
        )
    return context_frames // pt


def draw_context(batch: int, latent_frames: int, k: int, prob: float, device=None) -> torch.Tensor:
    """(B, T') bool: the first k latent frames of each clip are context, for a share `prob` of the clips."""
    chosen = torch.rand(batch, device=device) < prob  # (B,)
    first = torch.arange(latent_frames, device=device) < k  # (T',)
    return chosen[:, None] & first[None]


def frame_times(t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Per-latent-frame times (B, T'): t for generated frames, 1 (clean) for context frames. context: (B, T') or (T',)."""
    return torch.where(context, torch.ones((), dtype=t.dtype, device=t.device), t[:, None])


def expand_frames(v: torch.Tensor, x: torch.Tensor, pt: int) -> torch.Tensor:
    """Broadcast per-latent-frame values (B, T') against a clip x (B, C, T, H, W): (B, 1, T, 1, 1)."""
    return v.repeat_interleave(pt, dim=1)[:, None, :, None, None].to(x.dtype)
