"""train(cfg): build data, model, objective and system from a composed Hydra config, fit, then sample.

The console command `stale-train` is a thin @hydra.main wrapper over this function (stale/cli/train.py),
so tests and notebooks can call train() with a config composed by Hydra's compose API.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stale.system.stale_system import StaleSystem
from stale.utils.media import save_videos
from stale.utils.provenance import provenance

log = logging.getLogger("stale")


class ConfigError(ValueError):
    """A config value that cannot work; raised before training starts, naming the key."""


def _loggers(cfg: DictConfig, out: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if name == "wandb":
            # W&B with no account and no network: offline unless a key is configured.
            offline = node.get("offline")
            if offline is None:
                offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
            os.environ.setdefault("WANDB_SILENT", "true")
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            loggers.append(instantiate(node, offline=bool(offline)))
        else:
            loggers.append(instantiate(node))
    return loggers


def check_config(cfg: DictConfig) -> None:
    """Cheap checks that must fail before any data is generated or a step is taken."""
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    patch = list(cfg.model.get("patch", [1, 1, 1]))
    frames, size = cfg.data.frames, cfg.data.size
    if frames % patch[0] or size % patch[1] or size % patch[2]:
        raise ConfigError(f"data.frames={frames} and data.size={size} must be divisible by model.patch={patch}")
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be > 0 (streams have no epochs)")


def build_system(cfg: DictConfig) -> StaleSystem:
    model = instantiate(cfg.model, _convert_="all")
    objective = instantiate(cfg.diffusion)
    return StaleSystem(model, objective, **OmegaConf.to_container(cfg.optim),
                       schedule=OmegaConf.to_container(cfg.schedule, resolve=True),
                       run_config={**OmegaConf.to_container(cfg, resolve=True), "provenance": provenance()})


def train(cfg: DictConfig) -> dict:
    out = Path(cfg.paths.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    system = build_system(cfg)
    datamodule = instantiate(cfg.data)  # checks every shard exists before training
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = _loggers(cfg, out)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    n_params = sum(p.numel() for p in system.model.parameters())
    log.info("model %s: %.2fM parameters; outputs in %s", cfg.model.name, n_params / 1e6, out)

    trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    outputs = {"run dir": out, "checkpoint": out / "checkpoints" / "last.ckpt"}
    if trainer.is_global_zero:
        outputs.update(_sample_and_save(cfg, system, out, loggers))
        for lg in loggers:
            if type(lg).__name__ == "CSVLogger":
                lg.save()
                outputs["metrics csv"] = Path(lg.log_dir) / "metrics.csv"
            if type(lg).__name__ == "WandbLogger":
                outputs["wandb run"] = Path(lg.experiment.dir).parent
                lg.experiment.finish()
        print("\nstale-train finished. Outputs:")
        for k, v in outputs.items():
            print(f"  {k:<15} {v}")
    return metrics


def _sample_and_save(cfg: DictConfig, system: StaleSystem, out: Path, loggers: list) -> dict:
    """Sample with the EMA weights (EMAWeightAveraging copied them into the model at the end of fit)."""
    s = cfg.sample
    k = system.model.config.num_classes
    labels = torch.arange(s.num_videos) % k
    videos = system.sample(labels, steps=s.steps, sampler=s.sampler, guidance=s.guidance, seed=s.seed)
    paths = save_videos(videos, out / "samples", fps=8)
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            # from the written files: raw arrays would need moviepy, which stale does not depend on
            clips = [wandb.Video(str(p), format="mp4") for name, p in paths.items() if name.startswith("mp4_")]
            lg.experiment.log({"samples": clips}, step=system.global_step)
    return {"samples": out / "samples", "contact sheet": paths["contact_sheet"], "gif grid": paths["gif"]}
