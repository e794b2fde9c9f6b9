"""The "stale" weights: Lightning's EMAWeightAveraging with an update that leaves a tensor that does not move
bit-identical.

Lightning's EMA computes decay * ema + (1 - decay) * p, which in floating point need not equal p when ema == p
(0.995 * p + 0.005 * p rounds), so frozen weights (fine-tuning, finetune.freeze, LoRA's base) would drift in
their last bits in the averaged copy that stale samples and exports with. ema + (1 - decay) (p - ema) is the same
average in exact arithmetic and adds exactly 0 when p == ema (torch's own multi-tensor EMA uses this lerp form).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def ema_lerp(decay: float):
    @torch.no_grad()
    def update(ema: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        return ema + (1 - decay) * (current - ema)

    return update


class StaleEMA(EMAWeightAveraging):
    """EMAWeightAveraging whose average of an unchanged tensor is that tensor, bit for bit."""

    def __init__(self, decay: float = 0.999, **kwargs):
        super().__init__(decay=decay, **kwargs)
        self._kwargs["avg_fn"] = ema_lerp(decay)
