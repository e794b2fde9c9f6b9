"""threads=auto: measure which torch thread count trains fastest on this CPU right now, and keep it.

On an idle 2-core machine two threads ran the default step 1.38x faster than one; with two busy background
processes on the same cores, one thread ran it 1.89x faster than two, because OpenMP threads that lose their
core spin until it comes back (BENCHMARKS.md "Threads"). No fixed setting is right on both, so the first
training steps try each candidate for `steps_each` optimiser steps, round-robin, and the run keeps the
fastest. Ranks decide together (rank 0's choice). The choice is logged as `threads/chosen`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

log = logging.getLogger("stale")


class ThreadTuner(L.Callback):
    def __init__(self, candidates: list[int], steps_each: int = 8, skip_steps: int = 3):
        if not candidates or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in candidates):
            raise ValueError(f"threads candidates {candidates!r} must be integers >= 1")
        self.candidates, self.steps_each, self.skip_steps = list(dict.fromkeys(candidates)), steps_each, skip_steps
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.chosen: int | None = None
        self.done_at: int | None = None  # the optimiser step after which the choice holds
        self._current: int | None = None
        self._t0: float | None = None

    def _set(self, n: int) -> None:
        torch.set_num_threads(n)
        self._current = n

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.chosen is not None or trainer.global_step < self.skip_steps:
            return
        trial = (trainer.global_step - self.skip_steps) // self.steps_each  # which candidate's turn
        if trial >= len(self.candidates):
            self._choose(trainer, pl_module)
            return
        n = self.candidates[trial]
        if self._current != n:
            self._set(n)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.chosen is None and self._t0 is not None:
            self.times[self._current].append(time.perf_counter() - self._t0)
            self._t0 = None

    def _choose(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        medians = {c: sorted(ts)[len(ts) // 2] for c, ts in self.times.items() if ts}
        best = min(medians, key=medians.get) if medians else self.candidates[-1]
        self.chosen = int(trainer.strategy.broadcast(best, src=0))
        self.done_at = trainer.global_step
        self._set(self.chosen)
        if trainer.is_global_zero:
            shown = ", ".join(f"{c}: {1e3 * m:.0f} ms" for c, m in medians.items())
            log.info(f"threads=auto: median step with {shown}; training with {self.chosen}")
            for lg in trainer.loggers:
                lg.log_metrics({"threads/chosen": self.chosen}, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"chosen": self.chosen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.chosen = state_dict.get("chosen")
        if self.chosen is not None:  # a resumed run keeps the choice
            self._set(self.chosen)
