"""Label agreement: does the hinge head recognise the class that a sample was asked for? (docs/evaluation.md)

The joy-token head scores x_t with the null label. Samples are asked at t = 1 by default, where x_t = x exactly, so
no prior noise is drawn and the number is deterministic; the head's accuracy on *real* clips at the same t is
reported beside it as the ceiling to read it against (`t` < 1 uses a fixed-seed prior draw). The model is read with
stale.checkpoint.read_checkpoint, the one checkpoint reader.
"""

from __future__ import annotations

import numpy as np
import torch

from stale.diffusion import flow
from stale.diffusion.hinge import predict


@torch.no_grad()
def head_predictions(
    model, clips: torch.Tensor, t: float = 1.0, prior: str = "uniform", batch: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Hinge-head class predictions for uint8 clips (N, T, H, W, 3) at flow time t with the null label.

    Returns (predicted classes (N,), scores (N, outputs)).
    """
    if not 0 <= t <= 1:
        raise ValueError(f"agreement t={t} must be in [0, 1]")
    cfg = model.config
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    preds, scores = [], []
    for i in range(0, len(clips), batch):
        # (B, C, T, H, W)
        x = flow.to_unit_range(torch.as_tensor(clips[i : i + batch]).to(device).permute(0, 4, 1, 2, 3))
        tt = torch.full((x.shape[0],), float(t), device=device)
        if t < 1:
            z = flow.sample_prior(x.shape, prior, generator=g).to(device)
            x = flow.interpolate(z, x, tt)
        null = torch.full((x.shape[0],), cfg.num_classes, dtype=torch.long, device=device)
        _, s = model(x, tt, null)
        scores.append(s.float().cpu())
        preds.append(predict(s).cpu())
    return torch.cat(preds).numpy(), torch.cat(scores).numpy()


def agreement(requested, predicted, num_classes: int) -> dict:
    """Share of clips whose predicted class equals the requested one, with per-class rates and a confusion matrix."""
    req, pred = np.asarray(requested, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if req.shape != pred.shape or req.ndim != 1:
        raise ValueError(f"requested {req.shape} and predicted {pred.shape} must be equal-length vectors")
    if len(req) == 0:
        raise ValueError("no labelled clips to compare")
    if req.min() < 0 or req.max() >= num_classes:
        raise ValueError(f"requested labels must be in [0, {num_classes}), got {sorted(set(req.tolist()))}")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: requested, columns: predicted
    np.add.at(confusion, (req, pred), 1)
    per_class = {int(c): float(confusion[c, c] / confusion[c].sum()) for c in range(num_classes) if confusion[c].sum()}
    return {
        "agreement": float((req == pred).mean()),
        "n": int(len(req)),
        "chance": 1.0 / num_classes,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
