"""The "stale" weights: an exponential moving average of the parameters, on Lightning's WeightAveraging.

    ema <- ema + (1 - decay) (p - ema)        every optimiser step, all tensors in one foreach lerp

torch's own multi-tensor EMA (get_ema_multi_avg_fn) through WeightAveraging's public constructor, not Lightning's
EMAWeightAveraging: the lerp form keeps frozen weights bit-exact in the average (decay * ema + (1 - decay) * p
rounds), and the foreach update is 2.7x faster (BENCHMARKS.md). Under FSDP2, which refuses WeightAveraging's deep
copy, the same callback keeps the average as shards (stale.parallel.fsdp.ShardedEMA) in WeightAveraging's
checkpoint layout, so stale-export, stale-sample and resume read both alike (docs/parallel.md).
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
