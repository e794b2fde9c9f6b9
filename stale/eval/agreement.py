"""Label agreement: does the hinge head recognise the class that a sample was asked for?

The Stale Transformer's joy-token head is a noise-aware classifier: it scores the classes of x_t at time t
with the null label (the label must not leak into its own prediction). For finished samples we ask it at
t = 1 by default, where x_t = x exactly: the samples are the clean end of the path, so no prior noise has
to be drawn and the number is deterministic. The head was trained at logit-normal times (few near 1), so
its accuracy on *real* clips at the same t is reported next to the agreement as the ceiling to read it
against; `t` < 1 evaluates on x_t = (1 - t) z + t x with a fixed-seed prior draw z instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stale.diffusion import flow
from stale.diffusion.hinge import predict


class CheckpointError(ValueError):
    """A checkpoint that stale-eval cannot use; the message names the file and what is missing."""


def load_checkpoint_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from a stale-train checkpoint (its EMA weights) -> (model in eval mode, run_config).

    Loaded with torch.load(weights_only=True): a checkpoint is a file from elsewhere and must not run code.
    """
    from stale.models import build_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError names the global it refused
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from e
    try:
        run_config = ckpt["hyper_parameters"]["run_config"]
        model_cfg = {k: v for k, v in run_config["model"].items() if k != "_target_"}
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no hyper_parameters.run_config.model (not a stale-train checkpoint?)") from e
    state = {k[len("model."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{path}: state_dict holds no 'model.' weights")
    model = build_model(**model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model in its run_config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), run_config


@torch.no_grad()
def head_predictions(model, clips: torch.Tensor, t: float = 1.0, prior: str = "uniform", batch: int = 32,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
        x = torch.as_tensor(clips[i : i + batch]).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, C, T, H, W)
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
    return {"agreement": float((req == pred).mean()), "n": int(len(req)), "chance": 1.0 / num_classes,
            "per_class": per_class, "confusion": confusion.tolist()}
