"""The one hash of a module's weights, by which checkpoints and exports recognise their frozen parts."""

from __future__ import annotations

import hashlib

import torch


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes): the same for a hub download, a local
    copy or a re-saved folder of the same weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
