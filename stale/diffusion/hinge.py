"""The paper's cr-hinge loss, max{0, 1 - y * yhat}, and its Crammer-Singer multi-class form.

Both are max(0, 1 - margin) with the margin of the true class:
  binary (one score s, y in {-1, +1}):  margin = y s
  K classes (scores s_1..s_K, label y): margin = s_y - max_{j != y} s_j      (Crammer & Singer 2001)
which is what sklearn.metrics.hinge_loss computes (the tests check it). The margin is also what
classifier guidance follows (stale/diffusion/guidance.py).
"""

from __future__ import annotations

import torch


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction={reduction!r} is not one of 'mean', 'none'")


def binary_labels(labels: torch.Tensor) -> torch.Tensor:
    """{0, 1} or {-1, +1} labels -> {-1, +1}. A batch with any -1 is read as {-1, +1}, else as {0, 1}."""
    checked = labels.numel() and not torch.compiler.is_compiling()  # value checks stay out of compiled graphs
    if checked and not torch.isin(labels, labels.new_tensor([-1, 0, 1])).all():
        raise ValueError(f"binary hinge labels must be in {{0, 1}} or {{-1, +1}}, got {labels.unique().tolist()}")
    if checked and (labels == 0).any() and (labels == -1).any():
        raise ValueError("binary hinge labels mix 0 and -1; use {0, 1} or {-1, +1}")
    return torch.where(labels == 0, -1, labels)


def margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Margin of the true class, (B,): y s for one score per clip, s_y - max_{j != y} s_j for K scores."""
    if scores.shape[-1] == 1:
        return binary_labels(labels).to(scores.dtype) * scores.reshape(-1)
    # Not inside a compiled graph: the check reads the labels' values, which would break a fullgraph training
    # step into pieces; eager runs (and the data layer's own label checks) still catch bad labels.
    if not torch.compiler.is_compiling() and (labels.min() < 0 or labels.max() >= scores.shape[-1]):
        raise ValueError(f"labels {labels.unique().tolist()} out of range for {scores.shape[-1]} hinge scores")
    true = scores.gather(1, labels[:, None]).squeeze(1)
    others = scores.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(dim=1).values


def binary_hinge(scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """max(0, 1 - y yhat) with y in {-1, +1}; `labels` may be {0, 1} (mapped to {-1, +1}). scores (B,) or (B, 1)."""
    return _reduce(torch.clamp(1 - margin(scores.reshape(-1, 1), labels), min=0), reduction)


def crammer_singer_hinge(scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """max(0, 1 + max_{j != y} s_j - s_y) (Crammer & Singer 2001). scores (B, K), labels (B,)."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"Crammer-Singer hinge needs scores (B, K >= 2), got {tuple(scores.shape)}")
    return _reduce(torch.clamp(1 - margin(scores, labels), min=0), reduction)


def hinge_loss(scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary hinge for one score per clip, Crammer-Singer for K scores."""
    return _reduce(torch.clamp(1 - margin(scores, labels), min=0), reduction)


def predict(scores: torch.Tensor) -> torch.Tensor:
    """Predicted class from hinge scores: {0, 1} for one score per clip, the argmax for K scores."""
    return (scores.reshape(-1) > 0).long() if scores.shape[-1] == 1 else scores.argmax(dim=-1)
