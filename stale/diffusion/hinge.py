"""The paper's cr-hinge loss, max{0, 1 - y * yhat}, and its Crammer-Singer multi-class form."""

from __future__ import annotations

import torch


def binary_hinge(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max(0, 1 - y * yhat) with y in {-1, +1}; `labels` may be {0, 1} (mapped to {-1, +1}). Mean over batch."""
    y = labels.to(scores.dtype)
    if labels.min() >= 0:
        y = 2 * y - 1
    return torch.clamp(1 - y * scores.reshape(-1), min=0).mean()


def crammer_singer_hinge(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max(0, 1 + max_{j != y} s_j - s_y) (Crammer & Singer 2001). scores (B, K), labels (B,). Mean over batch."""
    true = scores.gather(1, labels[:, None]).squeeze(1)
    others = scores.scatter(1, labels[:, None], float("-inf"))
    return torch.clamp(1 + others.max(dim=1).values - true, min=0).mean()


def hinge_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary hinge for one score per clip, Crammer-Singer for K scores."""
    return binary_hinge(scores, labels) if scores.shape[-1] == 1 else crammer_singer_hinge(scores, labels)


def predict(scores: torch.Tensor) -> torch.Tensor:
    """Predicted class from hinge scores."""
    return (scores.reshape(-1) > 0).long() if scores.shape[-1] == 1 else scores.argmax(dim=-1)
