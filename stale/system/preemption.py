"""Save a checkpoint when the cluster asks the run to stop, then stop cleanly.

SIGTERM (preemption, `scancel`, Kubernetes eviction): Lightning's signal connector turns it into a
SIGTERMException at the next step boundary and calls every callback's `on_exception`; Lightning saves
nothing by itself, so this callback writes `last.ckpt` there.

SIGUSR1: under SLURM with auto-requeue Lightning's own handler saves an `hpc_ckpt_N.ckpt` and requeues the
job, and this callback stays out of its way. Anywhere else SIGUSR1 means "checkpoint and stop": the flag
is set by the handler and acted on at the end of the current optimiser step, never in the middle of one.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("stale")


class PreemptionCheckpoint(L.Callback):
    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self._usr1 = False
        self._previous = None
        self.stopped_by: str | None = None  # "SIGTERM" or "SIGUSR1" once a signal stopped the run

    def _lightning_handles_usr1(self, trainer: L.Trainer) -> bool:
        env = trainer._accelerator_connector.cluster_environment
        return isinstance(env, SLURMEnvironment) and env.auto_requeue

    def on_train_start(self, trainer, pl_module):
        if os.name != "nt" and not self._lightning_handles_usr1(trainer):
            self._previous = signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum, frame):
        self._usr1 = True  # only set a flag: saving inside a signal handler could catch a step half-done

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stop = self._usr1
        if trainer.world_size > 1:  # every rank must stop at the same step, or the collectives hang
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            self.stopped_by = "SIGUSR1"
            self._save(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            self.stopped_by = "SIGTERM"
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._restore_handler()

    def teardown(self, trainer, pl_module, stage):
        self._restore_handler()

    def _restore_handler(self):
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def report(self, step: int) -> str:
        """stale-train's end-of-run report after a signal: where the checkpoint is and how to resume."""
        return (
            f"\nstale-train stopped by {self.stopped_by} at step {step}.\n"
            f"  checkpoint      {self.path}\n  resume with     stale-train ckpt_path={self.path} ..."
        )

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)  # Lightning writes through a temporary file: atomic
        if trainer.is_global_zero:
            log.warning(
                "stopped by %s at step %d; checkpoint %s (resume with ckpt_path=%s)",
                self.stopped_by,
                trainer.global_step,
                self.path,
                self.path,
            )
