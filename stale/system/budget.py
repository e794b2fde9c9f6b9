"""Compute budget: the paper's cost constraint ("xz bit / 50 cent >= 1"), made real (docs/training.md).

Training stops cleanly at the first of three budgets it would overrun: FLOPs (`max_flops`), device time
(`max_gpu_hours` = wall time x devices) and money (`max_cost` = GPU-hours x `cost_per_gpu_hour`). After each
optimiser step the callback assumes the next step costs what this one did and stops if it would overrun (with
buckets a larger batch can overrun the FLOP budget by the difference). Every rank takes the same decision, and the
spend is part of every checkpoint, so a resumed run continues counting.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from stale.utils.ranks import data_parallel_rank_world


def batch_clips(batch: Any) -> int:
    """Clips in a batch: (video (B, C, T, H, W), label) or a bare video tensor."""
    video = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(video.shape[0])


def clips_per_device(sequence: int = 1):
    """ThroughputMonitor's batch_size_fn: this device's share of the batch's clips. It multiplies per-device counts
    by the world size for its global figures, and `sequence` ranks (parallel.sequence) train the same clips."""
    if sequence == 1:
        return batch_clips
    return lambda batch: batch_clips(batch) / sequence


class ComputeBudget(L.Callback):
    def __init__(
        self,
        flops_per_clip: float | None = None,
        max_flops: float | None = None,
        max_gpu_hours: float | None = None,
        max_cost: float | None = None,
        cost_per_gpu_hour: float | None = None,
    ):
        self.flops_per_clip = flops_per_clip  # training FLOPs per clip (forward + backward)
        self.max_flops, self.max_gpu_hours, self.max_cost = max_flops, max_gpu_hours, max_cost
        self.cost_per_gpu_hour = cost_per_gpu_hour
        for key in ("flops_per_clip", "max_flops", "max_gpu_hours", "max_cost", "cost_per_gpu_hour"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            ):
                raise ValueError(f"budget.{key}={value!r} must be a positive number or null")
        if max_cost is not None and cost_per_gpu_hour is None:
            raise ValueError("budget.max_cost is set but budget.cost_per_gpu_hour is null: set the price of a GPU-hour")
        if flops_per_clip is None and max_flops is not None:
            raise ValueError("budget.max_flops needs a FLOP count per clip (flops_per_clip)")
        # spend so far, in the whole run (saved in checkpoints)
        self.flops = 0.0
        self.gpu_seconds = 0.0
        self.cost = 0.0
        self.stop_reason: str | None = None
        # per-step bookkeeping
        self._pending_flops = 0.0  # micro-batches since the last optimiser step
        self._last_step = 0
        self._last_time = 0.0
        self._paused = 0.0  # validation time inside the current step (not part of the step's cost estimate)
        self._val_start: float | None = None

    def max_steps_within(self, clips_per_step: int) -> int | None:
        """How many optimiser steps of `clips_per_step` clips (all ranks) the FLOP budget pays for, from zero."""
        if self.max_flops is None:
            return None
        return int(self.max_flops // (self.flops_per_clip * clips_per_step))

    def schedule_steps(self, clips_per_step: int, max_steps: int, warmup: int) -> int | None:
        """The step the learning-rate schedule decays to its floor at: where the FLOP budget ends, if that comes
        before max_steps (None: no FLOP budget, the schedule runs to max_steps). A budget that does not pay for more
        steps than the warmup is refused."""
        affordable = self.max_steps_within(clips_per_step)
        if affordable is None:
            return None
        if affordable <= warmup:
            raise ValueError(
                f"budget.max_flops={self.max_flops:.4g} pays for {affordable} steps of "
                f"{self.flops_per_clip * clips_per_step:.4g} FLOPs, not more than schedule.warmup={warmup}"
            )
        return min(max_steps, affordable)

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600.0

    def fractions(self) -> dict[str, float]:
        """Spent / budget for every budget that is set."""
        out = {}
        if self.max_flops:
            out["flops"] = self.flops / self.max_flops
        if self.max_gpu_hours:
            out["gpu_hours"] = self.gpu_hours / self.max_gpu_hours
        if self.max_cost:
            out["cost"] = self.cost / self.max_cost
        return out

    def summary(self) -> str:
        """The spend line of stale-train's end-of-run report."""
        cost = f", cost {self.cost:.4g}" if self.cost_per_gpu_hour else ""
        return f"{self.flops:.4g} FLOPs, {self.gpu_hours:.4g} GPU-hours{cost}"

    def _overrun(self, step_flops: float, step_gpu_seconds: float) -> str | None:
        """The first budget that one more step like the last one would overrun, or None."""
        step_hours = step_gpu_seconds / 3600.0
        if self.max_flops is not None and self.flops + step_flops > self.max_flops:
            return f"budget.max_flops={self.max_flops:.4g} (spent {self.flops:.4g} FLOPs)"
        if self.max_gpu_hours is not None and self.gpu_hours + step_hours > self.max_gpu_hours:
            return f"budget.max_gpu_hours={self.max_gpu_hours:.4g} (spent {self.gpu_hours:.4g} GPU-hours)"
        if self.max_cost is not None and self.cost + step_hours * self.cost_per_gpu_hour > self.max_cost:
            return f"budget.max_cost={self.max_cost:.4g} (spent {self.cost:.4g})"
        return None

    def _stop(self, trainer: L.Trainer, reason: str | None) -> None:
        stop = trainer.strategy.reduce_boolean_decision(reason is not None, all=False)  # one decision for all ranks
        if stop:
            trainer.should_stop = True
            self.stop_reason = reason or "a budget was reached on another rank"
            rank_zero_info(f"compute budget: stopping after step {trainer.global_step}: {self.stop_reason}")

    # --- hooks -------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._last_time = time.perf_counter()
        self._pending_flops, self._paused = 0.0, 0.0
        if any(f >= 1.0 for f in self.fractions().values()):  # resumed with the budget already spent
            self._stop(trainer, f"budget already spent before step {trainer.global_step}: {self.fractions()}")
        else:
            self._stop(trainer, None)  # keep the collective calls paired on every rank

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is not None:
            self._paused += time.perf_counter() - self._val_start
            self._val_start = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.flops_per_clip is not None:
            # this device's FLOPs of the batch at its shape (StaleSystem.flops_per_batch: buckets vary it; sequence-
            # parallel ranks each count their share), times the devices; else the planning figure per clip times
            # the data-parallel groups (sequence-parallel ranks share each clip)
            per_device = getattr(pl_module, "flops_per_batch", None)
            self._pending_flops += (
                per_device * trainer.world_size
                if per_device
                else self.flops_per_clip * batch_clips(batch) * data_parallel_rank_world(trainer)[1]
            )
        if trainer.global_step == self._last_step:  # accumulating gradients: no optimiser step yet
            return
        self._last_step = trainer.global_step
        now = time.perf_counter()
        dt, self._last_time = now - self._last_time, now
        busy, self._paused = max(dt - self._paused, 1e-9), 0.0
        step_flops, self._pending_flops = self._pending_flops, 0.0
        world = trainer.world_size
        self.flops += step_flops
        self.gpu_seconds += dt * world
        self.cost += dt * world / 3600.0 * (self.cost_per_gpu_hour or 0.0)

        self._stop(trainer, self._overrun(step_flops, busy * world))
        # Log on the steps the loggers write only: each self.log call costs ~0.3 ms of Lightning bookkeeping
        if (trainer.global_step % max(1, trainer.log_every_n_steps)) and not trainer.should_stop:
            return
        metrics = {"budget/gpu_hours": self.gpu_hours}
        if self.flops_per_clip is not None:
            metrics["budget/flops"] = self.flops
        if self.cost_per_gpu_hour:
            metrics["budget/cost"] = self.cost
        fractions = self.fractions()
        if fractions:
            metrics["budget/used"] = max(fractions.values())
        pl_module.log_dict({k: float(v) for k, v in metrics.items()}, on_step=True, on_epoch=False)
        if fractions:
            pl_module.log(
                "budget", float(max(fractions.values())), on_step=True, on_epoch=False, prog_bar=True, logger=False
            )

    def state_dict(self) -> dict:
        return {
            "flops": self.flops,
            "gpu_seconds": self.gpu_seconds,
            "cost": self.cost,
            "stop_reason": self.stop_reason,
            "flops_per_clip": self.flops_per_clip,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.flops = float(state_dict.get("flops", 0.0))
        self.gpu_seconds = float(state_dict.get("gpu_seconds", 0.0))
        self.cost = float(state_dict.get("cost", 0.0))
