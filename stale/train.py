"""train(cfg): resolve the composed Hydra config, build the run, fit, sample and report.

The console command `stale-train` is a thin @hydra.main wrapper over this function (stale/cli/train.py), so tests
and notebooks can call train() with a config composed by Hydra's compose API. Every check runs in resolve(), before
any step is taken (stale/training/); docs/training.md says what a run writes and how to resume it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from stale.system.budget import ComputeBudget
from stale.system.preemption import PreemptionCheckpoint
from stale.training.build import build_callbacks, build_loggers, build_system, build_trainer, plan_schedule
from stale.training.checks import ConfigError
from stale.training.report import finish
from stale.training.resolve import Resolved, check_config, resolve

__all__ = ["ConfigError", "Resolved", "build_system", "check_config", "resolve", "train"]

log = logging.getLogger("stale")


def train(cfg: DictConfig, datamodule: L.LightningDataModule | None = None, callbacks: list | tuple = ()) -> dict:
    """Fit a system as configured and return the final metrics. For notebooks and tests, `datamodule` replaces
    cfg.data and `callbacks` are added to the configured ones."""
    out = Path(cfg.paths.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    run = resolve(cfg, datamodule)  # checks, frozen parts, derived values, the data module (built once)
    cfg = run.config
    system = build_system(run)
    callbacks = build_callbacks(cfg, system) + list(callbacks)
    loggers = build_loggers(cfg, out)
    trainer = build_trainer(cfg, callbacks, loggers)
    plan_schedule(cfg, system, next(c for c in callbacks if isinstance(c, ComputeBudget)), trainer)
    n_params = sum(p.numel() for p in system.model.parameters())
    n_train = sum(p.numel() for p in system.model.parameters() if p.requires_grad)
    log.info(
        "model %s: %.2fM parameters (%s trainable); outputs in %s",
        cfg.model.get("name") or cfg.model.get("pretrained"),
        n_params / 1e6,
        f"{n_train:,}",
        out,
    )

    preempt = next((c for c in callbacks if isinstance(c, PreemptionCheckpoint)), None)
    try:
        trainer.fit(system, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:  # PreemptionCheckpoint saved last.ckpt in on_exception: a clean stop, not a failure
        if preempt is None:
            raise
    if preempt is not None and preempt.stopped_by:
        if trainer.is_global_zero:
            print(preempt.report(trainer.global_step))
        return {"stopped_by_signal": 1.0, "step": float(trainer.global_step)}

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        finish(cfg, system, trainer, callbacks, loggers, out)
    return metrics
