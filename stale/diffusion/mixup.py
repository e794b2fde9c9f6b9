"""The paper's future-work "mess-up" regularisation: mixup (Zhang et al. 2017), on the hinge branch only.

Clean clips are blended, x = lam x_a + (1 - lam) x_b with lam ~ Beta(a, a) per clip, then noised like any
other clip, and the hinge loss is blended the same way: lam L(s, y_a) + (1 - lam) L(s, y_b).

Why never the flow target: the velocity loss is minimised by E[x - z | x_t], so whatever clips it is
trained on *are* the distribution the sampler reproduces. Mixed clips would put ghosted blends of two
videos into the samples: a "leaking" augmentation in the sense of Karras et al. 2020 (ADA). The hinge
head is a classifier read from the joy token; mixing its inputs and labels only smooths its decision
function, and the flow branch still sees unmixed clips, so the velocity optimum is unchanged. It is off
by default (`diffusion.mixup=false`).
"""

from __future__ import annotations

import torch

from stale.diffusion.hinge import hinge_loss


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend each clip with a random partner from the batch.

    x (B, ...), y (B,) -> (mixed x, y_a, y_b, lam (B,)) with mixed x = lam x + (1 - lam) x[perm].
    lam ~ Beta(alpha, alpha) per clip: alpha = 0.2 keeps most clips close to one of the two.
    """
    if alpha <= 0:
        raise ValueError(f"diffusion.mixup_alpha={alpha} must be > 0")
    b = x.shape[0]
    lam = torch.distributions.Beta(alpha, alpha).sample((b,)).to(x.device)
    perm = torch.randperm(b, device=x.device)
    lam_x = lam.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return lam_x * x + (1 - lam_x) * x[perm], y, y[perm], lam


def mixup_hinge(scores: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam L(s, y_a) + (1 - lam) L(s, y_b), averaged over the batch (the mixup loss of Zhang et al.)."""
    la = hinge_loss(scores, y_a, reduction="none")
    lb = hinge_loss(scores, y_b, reduction="none")
    return (lam.to(la.dtype) * la + (1 - lam.to(la.dtype)) * lb).mean()
