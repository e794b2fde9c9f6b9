"""The one hash of a module's weights, by which checkpoints and exports recognise their frozen parts."""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def weights_sha256(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes): the same for a hub download, a local
    copy or a re-saved folder of the same weights. `model`: a module, or a state dict (a base without its adapters)."""
    h = hashlib.sha256()
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    for name, t in sorted(state.items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
