"""After fit: the final samples (EMA weights) and the report stale-train prints, naming every output."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from stale.system.budget import ComputeBudget
from stale.system.deadline import TrainingDeadline
from stale.system.stale_system import StaleSystem
from stale.system.training_samples import log_videos, sample_to_disk


def sample_and_save(cfg: DictConfig, system: StaleSystem, out: Path, loggers: list, step: int) -> dict:
    """Sample with the EMA weights (the EMA callback copied them into the model at the end of fit)."""
    s = cfg.sample
    paths = sample_to_disk(
        system,
        out / "samples",
        num_videos=s.num_videos,
        steps=s.steps,
        sampler=s.sampler,
        guidance=s.guidance,
        seed=s.seed,
        progress=s.get("progress", False),
        classifier_guidance=s.get("classifier_guidance", 0.0),
        prompts=system.prompts,
    )
    log_videos(loggers, paths, step)
    return {"samples": out / "samples", "contact sheet": paths["contact_sheet"], "gif grid": paths["gif"]}


def finish(cfg: DictConfig, system: StaleSystem, trainer: L.Trainer, callbacks: list, loggers: list, out: Path) -> None:
    """Rank 0: sample, flush the loggers and print where everything is."""
    budget = next(c for c in callbacks if isinstance(c, ComputeBudget))
    report = {
        "run dir": out,
        "checkpoint": out / "checkpoints" / "last.ckpt",
        "steps": trainer.global_step,
        "spend": budget.summary(),
        **({"stopped by": budget.stop_reason} if budget.stop_reason else {}),
    }
    report.update(system.loss_summary())
    for c in callbacks:
        if isinstance(c, TrainingDeadline):
            report.update(c.summary())
    report.update(sample_and_save(cfg, system, out, loggers, trainer.global_step))
    for lg in loggers:
        if type(lg).__name__ == "CSVLogger":
            lg.save()
            report["metrics csv"] = Path(lg.log_dir) / "metrics.csv"
        if type(lg).__name__ == "WandbLogger":
            report["wandb run"] = Path(lg.experiment.dir).parent
            lg.experiment.finish()
    print("\nstale-train finished. Outputs:")
    for k, v in report.items():
        print(f"  {k:<15} {v}")
