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

FSDP2 (trainer=fsdp, fsdp_cpu: Lightning's ModelParallelStrategy): WeightAveraging deep-copies the module, which
FSDP2 refuses. Then the same callback keeps the average as shards (stale.parallel.fsdp.ShardedEMA, the same
update function) and does WeightAveraging's jobs on them: swap for validation, copy into the model when fit ends,
and checkpoints in WeightAveraging's layout (state_dict = the whole average, current_model_state = the raw
weights, averaging_state = n_averaged), so stale-export, stale-sample and resume read both alike.
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.optim.swa_utils import get_ema_multi_avg_fn

from stale.parallel.fsdp import ShardedEMA


class StaleEMA(WeightAveraging):
    """EMA of the parameters, updated after every optimiser step; an unchanged tensor's average is that tensor."""

    def __init__(self, decay: float = 0.999, device=None, use_buffers: bool = False):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay!r} must be in [0, 1)")
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = float(decay)
        self.sharded: ShardedEMA | None = None  # FSDP2 only: the average as shards

    # --- which kind of average ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and isinstance(trainer.strategy, ModelParallelStrategy):
            self.sharded = ShardedEMA(get_ema_multi_avg_fn(self.decay))  # filled in on_fit_start, once sharded
            return
        with warnings.catch_warnings():  # StaleSystem.configure_model shards only under FSDP2: nothing to warn
            warnings.filterwarnings("ignore", message=".*WeightAveraging doesn't support sharding")
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module) -> None:  # after configure_model, before a checkpoint is restored
        if self.sharded is not None:
            self.sharded.track(pl_module)

    # --- WeightAveraging's jobs, on shards under FSDP2 ------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.sharded is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self.sharded.update(pl_module)
            self._latest_update_step = trainer.global_step

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.sharded is None:
            return super().on_validation_epoch_start(trainer, pl_module)
        self.sharded.swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.sharded is None:
            return super().on_validation_epoch_end(trainer, pl_module)
        self.sharded.swap(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.sharded is None:
            return super().on_train_end(trainer, pl_module)
        self.sharded.copy_to(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.sharded is None:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = self.sharded.full_state_dict(pl_module)  # every rank gathers, rank 0 keeps
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.sharded.n_averaged, dtype=torch.long)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.sharded is None:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # the strategy has loaded the raw weights (HydraFSDP2Strategy.load_checkpoint); a checkpoint without
        # an average starts it from the weights, as WeightAveraging does
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            self.sharded.load_full_state_dict(
                pl_module, checkpoint["state_dict"], checkpoint["averaging_state"]["n_averaged"]
            )
        else:
            self.sharded.track(pl_module)
