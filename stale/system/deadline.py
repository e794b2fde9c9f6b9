"""A training deadline: plan the number of steps so that training ends on time, whatever the machine's speed.

Machines of one kind differ by 2x in speed from day to day, so a fixed step count that fits a 10-minute quick start
on a fast day overruns it on a slow one. The callback measures the optimiser-step rate during the warmup, sets

  planned = step + floor(rate x (deadline - now) x (1 - margin)),  capped at max_steps

and stretches the learning-rate schedule over exactly those steps, so the decay completes instead of being cut off.
After every validation the plan is lowered if the run would finish late, or raised by at least 5% if the machine got
faster; a hard stop at the deadline is the last guard. The clock starts when the callback is built (or at
$STALE_DEADLINE_FROM); a resumed run keeps the planned step count. docs/training.md has the settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import lightning as L

from stale.system.threads import ThreadTuner

log = logging.getLogger("stale")
CLOCK_ENV = "STALE_DEADLINE_FROM"


def plan_steps(step: int, rate: float, remaining_s: float, margin: float, max_steps: int) -> int:
    """Optimiser steps to train in total: those that fit into `remaining_s` at `rate` steps/s, less the margin,
    at least one more than `step` and at most `max_steps`."""
    more = math.floor(rate * max(0.0, remaining_s) * (1.0 - margin))
    return int(min(max_steps, max(step + 1, step + more)))


def clock_started_ago(max_minutes: float) -> float:
    """Seconds since $STALE_DEADLINE_FROM (Unix time), else 0. `make train` sets it to when make started, so
    that creating the venv and installing count against the deadline: a slow download or a slow disk then
    shortens training instead of stretching the quick start past its 10 minutes. A value in the future or
    older than the deadline itself (a stale export in a shell) is ignored with a warning."""
    raw = os.environ.get(CLOCK_ENV)
    if not raw:
        return 0.0
    try:
        ago = time.time() - float(raw)
    except ValueError:
        ago = -1.0
    if not 0.0 <= ago < 60.0 * max_minutes:
        log.warning(
            f"deadline: ignoring {CLOCK_ENV}={raw!r} (not a Unix time within the last {max_minutes:g} "
            "minutes); the deadline counts from now"
        )
        return 0.0
    return ago


class TrainingDeadline(L.Callback):
    RAISE_AT = 0.05  # raise the plan after a validation only for at least 5% more steps (each raise moves the LR curve)

    def __init__(
        self,
        max_minutes: float,
        max_steps: int,
        calibration_steps: int = 40,
        skip_steps: int = 5,
        margin: float = 0.08,
        out_dir: str | None = None,
    ):
        if isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float)) or not max_minutes > 0:
            raise ValueError(f"deadline.max_minutes={max_minutes!r} must be a positive number of minutes")
        for key, value, low in (
            ("max_steps", max_steps, 1),
            ("calibration_steps", calibration_steps, 1),
            ("skip_steps", skip_steps, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"deadline.{key}={value!r} must be an integer >= {low}")
        if not 0 <= margin < 1:
            raise ValueError(f"deadline.margin={margin!r} must be in [0, 1)")
        self.max_minutes, self.max_steps = float(max_minutes), max_steps
        self.calibration_steps, self.skip_steps, self.margin = calibration_steps, skip_steps, margin
        self.out_dir = Path(out_dir) if out_dir else None
        # the deadline counts from here (train() builds callbacks first), or from when `make train` started
        self.t_start = time.monotonic() - clock_started_ago(self.max_minutes)
        self.wall_start = datetime.now() - timedelta(seconds=time.monotonic() - self.t_start)
        self.t_deadline = self.t_start + 60.0 * self.max_minutes
        self.planned_steps: int | None = None  # saved in checkpoints: a resumed run keeps it
        self.rate: float | None = None  # measured optimiser steps per second (calibration window)
        self.decisions: list[dict] = []
        self.resumed = False
        self.stopped_at: int | None = None  # the step the hard stop ended training at, if it did
        self._mark: tuple[int, float] | None = None  # (step, time) at the start of the calibration window
        self._calibrated_at: tuple[int, float] | None = None

    # --- the plan -----------------------------------------------------------------------------------------
    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, planned: int, why: str) -> None:
        planned = int(trainer.strategy.broadcast(planned, src=0))  # every rank trains the same number of steps
        self.planned_steps = planned
        trainer.fit_loop.epoch_loop.max_steps = planned  # what trainer.max_steps reads (no setter above it)
        pl_module.set_schedule_steps(planned)  # the schedule decays to its floor at the last planned step
        self._record(trainer, why)

    def _record(self, trainer: L.Trainer, why: str) -> None:
        """Say what was decided: the console, the loggers (deadline/*) and <out_dir>/deadline.json."""
        finish = self.wall_start + timedelta(seconds=self.t_deadline - self.t_start)
        self.decisions.append(
            {
                "step": trainer.global_step,
                "planned_steps": self.planned_steps,
                "why": why,
                "steps_per_s": round(self.rate, 3) if self.rate else None,
                "deadline": finish.isoformat(timespec="seconds"),
                "elapsed_s": round(time.monotonic() - self.t_start, 1),
            }
        )
        if not trainer.is_global_zero:
            return
        planned = f"{self.planned_steps:,}" if self.planned_steps is not None else "(no plan yet)"
        log.info(
            f"deadline: {why}; training {planned} steps (max {self.max_steps:,}) to finish by "
            f"{finish:%H:%M:%S} (deadline.max_minutes={self.max_minutes:g})"
        )
        if self.planned_steps is not None:
            for lg in trainer.loggers:
                lg.log_metrics(
                    {"deadline/planned_steps": self.planned_steps, "deadline/steps_per_s": self.rate or 0.0},
                    step=trainer.global_step,
                )
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "deadline.json").write_text(
                json.dumps(
                    {
                        "max_minutes": self.max_minutes,
                        "max_steps": self.max_steps,
                        "margin": self.margin,
                        "planned_steps": self.planned_steps,
                        "stopped_at": self.stopped_at,
                        "decisions": self.decisions,
                    },
                    indent=1,
                )
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.planned_steps is not None:  # restored from a checkpoint: keep the plan, no new deadline
            self.resumed = True
            self._apply(trainer, pl_module, self.planned_steps, "resumed: keeping the planned step count")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.resumed:
            return
        step, now = trainer.global_step, time.monotonic()
        if self.planned_steps is None:
            tuning = any(c.chosen is None for c in trainer.callbacks if isinstance(c, ThreadTuner))
            if self._mark is None and step >= self.skip_steps and not tuning:  # start-up, thread trials left out
                self._mark = (step, now)
            elif self._mark is not None and step >= self._mark[0] + self.calibration_steps:
                self.rate = (step - self._mark[0]) / max(now - self._mark[1], 1e-9)
                planned = plan_steps(step, self.rate, self.t_deadline - now, self.margin, self.max_steps)
                self._calibrated_at = (step, now)
                self._apply(
                    trainer, pl_module, planned, f"measured {self.rate:.3g} steps/s over steps {self._mark[0]}-{step}"
                )
        late = trainer.strategy.reduce_boolean_decision(now >= self.t_deadline, all=False)
        if late and not trainer.should_stop:
            self.stopped_at = step
            trainer.should_stop = True
            self._record(trainer, f"deadline reached at step {step}: stopping")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the plan against the effective rate so far (validation and sampling included): lower it if late,
        raise it if there is time for at least RAISE_AT more."""
        if self.resumed or self._calibrated_at is None or trainer.sanity_checking or trainer.should_stop:
            return  # (the validation Lightning runs after a stop needs no new plan)
        step, now = trainer.global_step, time.monotonic()
        step0, t0 = self._calibrated_at
        if step <= step0:
            return
        effective = (step - step0) / (now - t0)
        planned = plan_steps(step, effective, self.t_deadline - now, self.margin, self.max_steps)
        late = now + (self.planned_steps - step) / effective > self.t_deadline
        faster = planned > self.planned_steps * (1 + self.RAISE_AT)  # the machine got faster (other jobs ended)
        if (late and planned < self.planned_steps) or faster:
            why = f"re-planned at step {step}: {effective:.3g} steps/s with validation and sampling"
            self._apply(
                trainer, pl_module, planned, why if planned < self.planned_steps else f"{why}, faster than measured"
            )

    def summary(self) -> dict:
        """The end-of-run report's line: the last decision and where the record is."""
        if not self.decisions:
            return {}
        d = self.decisions[-1]
        return {
            "deadline": f"{self.max_minutes:g} min: {d['why']}; planned {d['planned_steps']} steps"
            + (f" ({self.out_dir / 'deadline.json'})" if self.out_dir else "")
        }

    def state_dict(self) -> dict:
        return {"planned_steps": self.planned_steps, "rate": self.rate, "decisions": self.decisions}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned_steps = state_dict.get("planned_steps")
        self.rate = state_dict.get("rate")
        self.decisions = list(state_dict.get("decisions", []))
