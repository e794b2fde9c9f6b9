"""The "stale" weights: an exponential moving average of the parameters, on Lightning's WeightAveraging.

    ema <- ema + (1 - decay) (p - ema)        every optimiser step, all tensors in one foreach lerp

This is torch's own multi-tensor EMA (torch.optim.swa_utils.get_ema_multi_avg_fn) passed through
WeightAveraging's public constructor. Two reasons not to use Lightning's EMAWeightAveraging as it stands:
- its per-tensor update decay * ema + (1 - decay) * p need not equal p when ema == p in floating point
  (0.995 p + 0.005 p rounds), so frozen weights (fine-tuning, finetune.freeze, LoRA's base) would drift in their
  last bits in the averaged copy that stale samples and exports with; the lerp form adds exactly 0 then;
- it updates tensor by tensor in Python: 10.0 ms an update against 3.7 ms for the foreach lerp on the tiny CPU
  model (one run on a machine shared with other jobs; BENCHMARKS.md).
EMAWeightAveraging cannot take the foreach function (it builds its own avg_fn, and AveragedModel refuses both).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class StaleEMA(WeightAveraging):
    """EMA of the parameters, updated after every optimiser step; an unchanged tensor's average is that tensor."""

    def __init__(self, decay: float = 0.999, device=None, use_buffers: bool = False):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay!r} must be in [0, 1)")
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = float(decay)
