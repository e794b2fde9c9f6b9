"""Sample videos during training with the EMA ("stale") weights: mp4/GIF/PNG on disk and wandb.Video.

Every `every_n_steps` optimiser steps, global rank 0 samples a few clips (fixed labels and seed, so the
videos of successive steps are comparable), writes them under <out_dir>/step<NNNNNNN>/ and logs the mp4
files to W&B. wandb.Video is built from the written files: from raw arrays it would need moviepy, which
stale does not depend on. Other ranks do not wait: sampling uses no collective operation (under FSDP2 every
rank first takes part in gathering the EMA weights into one whole copy on rank 0).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from stale.data.media import save_videos, write_labels
from stale.parallel.fsdp import gathered_copy, is_sharded
from stale.system.ema import StaleEMA

log = logging.getLogger(__name__)


def ema_module(trainer: L.Trainer | None, pl_module: L.LightningModule) -> L.LightningModule:
    """The moving-average copy of `pl_module` kept by the EMA callback (Lightning's WeightAveraging: stale.system.ema.StaleEMA), else `pl_module`.

    During fit the average lives in the callback (an AveragedModel around a deep copy of the system);
    after fit the callback has copied it into `pl_module` itself.
    """
    for cb in trainer.callbacks if trainer is not None else []:
        average = getattr(cb, "_average_model", None) if isinstance(cb, WeightAveraging) else None
        if average is not None:
            return average.module
    return pl_module


def gathered_for_sampling(trainer: L.Trainer, pl_module: L.LightningModule):
    """Under FSDP2, where a forward pass needs every rank: a plain copy of the model on rank 0 with the whole EMA
    weights (the live ones without an EMA callback), None on the other ranks. Collective: every rank calls it.
    None when the model is not sharded."""
    if not is_sharded(pl_module.model):
        return None
    ema = next((cb.sharded for cb in trainer.callbacks if isinstance(cb, StaleEMA) and cb.sharded is not None), None)
    with ema.swapped(pl_module) if ema is not None else nullcontext():
        return gathered_copy(pl_module.model)


def log_videos(loggers: list, paths: dict[str, Path], step: int, key: str = "samples") -> None:
    """Send the written mp4 files to every W&B logger (other loggers have no video support)."""
    mp4s = [str(p) for name, p in sorted(paths.items()) if name.startswith("mp4_")]
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and mp4s:
            lg.log_video(key, mp4s, step=step, format=["mp4"] * len(mp4s), caption=[Path(p).stem for p in mp4s])


def sample_to_disk(
    system,
    out_dir: Path,
    num_videos: int,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    fps: int = 8,
    **sample_kwargs,
) -> dict[str, Path]:
    """Sample `num_videos` clips (labels cycle through the classes; model.cond=text: the prompts cycle, see
    StaleSystem.sample) and write them; returns the paths."""
    k = system.model.config.num_classes
    labels = torch.arange(num_videos) % k
    if system.model.config.cond == "text":
        prompts = sample_kwargs.pop("prompts", None) or system.prompts or [""]
        prompts = [prompts[i % len(prompts)] for i in range(num_videos)]
        videos = system.sample(
            labels, steps=steps, sampler=sampler, guidance=guidance, seed=seed, prompts=prompts, **sample_kwargs
        )
        paths = save_videos(videos, out_dir, fps=fps)
        paths["prompts"] = Path(out_dir) / "prompts.json"  # which prompt each clip was asked for
        paths["prompts"].write_text(json.dumps({paths[f"mp4_{i}"].name: p for i, p in enumerate(prompts)}, indent=1))
        return paths
    sample_kwargs.pop("prompts", None)
    videos = system.sample(labels, steps=steps, sampler=sampler, guidance=guidance, seed=seed, **sample_kwargs)
    paths = save_videos(videos, out_dir, fps=fps)
    # labels.json: which class each clip was asked for, so stale-eval can measure label agreement
    names = {paths[f"mp4_{i}"].name: int(label) for i, label in enumerate(labels)}
    paths["labels"] = write_labels(
        out_dir, names, num_classes=k, guidance=guidance, sampler=sampler, steps=steps, seed=seed
    )
    return paths


class SampleVideos(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 500,
        out_dir: str = "samples",
        num_videos: int = 4,
        steps: int = 25,
        sampler: str = "euler",
        guidance: float = 1.0,
        seed: int = 0,
        fps: int = 8,
    ):
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"sample_every_n_steps={every_n_steps!r} must be an integer >= 0 (0 = never)")
        if num_videos < 1 or steps < 1:
            raise ValueError(f"sample.num_videos={num_videos} and sample.steps={steps} must be >= 1")
        self.every_n_steps, self.out_dir = every_n_steps, Path(out_dir)
        self.kwargs = dict(num_videos=num_videos, steps=steps, sampler=sampler, guidance=guidance, seed=seed, fps=fps)
        self._last_step = -1
        self.written: list[Path] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        if step >= trainer.max_steps > 0:  # train() samples at the end anyway
            return
        self._last_step = step  # with gradient accumulation the same step ends several micro-batches
        plain = gathered_for_sampling(trainer, pl_module)  # FSDP2: every rank gathers, rank 0 gets a whole copy
        if not trainer.is_global_zero:
            return
        system = ema_module(trainer, pl_module)
        out = self.out_dir / f"step{step:07d}"
        # the prompts are the live system's (the EMA copy was made before it saw a caption)
        with pl_module.sampling_with(plain):
            paths = sample_to_disk(system, out, **self.kwargs, prompts=getattr(pl_module, "prompts", None))
        self.written.append(out)
        log_videos(trainer.loggers, paths, step)
        log.info("samples of step %d (EMA weights: %s) in %s", step, system is not pl_module or plain is not None, out)
