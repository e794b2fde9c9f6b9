"""Building a run from its resolved config: the system, its callbacks, the loggers and the trainer. Each node is one
constructor (Hydra's `_target_`); what is built here is only what a node cannot say itself (the model prepared from
init_from, the FLOPs of a batch, W&B's offline policy, the callbacks that need a logger)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stale.checkpoint import prepare
from stale.models.flops import training_flops_per_clip
from stale.system.budget import ComputeBudget
from stale.system.checkpoint_io import SafeCheckpointIO
from stale.system.stale_system import StaleSystem
from stale.system.threads import ThreadTuner
from stale.training.checks import ConfigError, max_steps
from stale.training.resolve import Resolved, resolve
from stale.utils.provenance import provenance

NEEDS_LOGGER = ("lr_monitor", "throughput")  # callbacks that only log


def accelerator_is_cuda(cfg: DictConfig) -> bool:
    acc = str(cfg.trainer.get("accelerator", "auto"))
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def build_system(run: Resolved | DictConfig) -> StaleSystem:
    """The system of a resolved run (a plain config is resolved first, without its data: a label model's system)."""
    if not isinstance(run, Resolved):
        run = resolve(run, data=False)
    cfg = run.config
    model = instantiate(cfg.model, _convert_="all")
    finetune = OmegaConf.to_container(cfg.finetune, resolve=True) if cfg.get("finetune") else None
    try:  # init_from (weights into a possibly different model), then what trains: stale/checkpoint/weights.py
        prepared = prepare(model, finetune, cfg.get("init_from"), bool(cfg.get("init_from_strict", True)))
    except ValueError as e:  # InitFromError, CheckpointError, a bad finetune node
        raise ConfigError(str(e)) from None
    compile_opts = cfg.get("compile", False)
    system = StaleSystem(
        model,
        instantiate(cfg.diffusion),
        optimizer=instantiate(cfg.optim, _convert_="all"),
        schedule=instantiate(cfg.schedule),
        seed=cfg.seed,
        compile=OmegaConf.to_container(compile_opts) if isinstance(compile_opts, DictConfig) else compile_opts,
        provenance=provenance(),
        finetune_base=prepared.base,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        autoencoder=run.autoencoder,
        text_encoder=run.text_encoder,
        empty_text=run.empty_text,
        prompts=cfg.sample.get("prompts"),
        scheduler=OmegaConf.to_container(cfg.sample.scheduler) if cfg.sample.get("scheduler") else None,
    )
    system.clip_flops = clip_flops(cfg, system)  # each batch's FLOPs for ThroughputMonitor and the budget
    return system


def clip_flops(cfg: DictConfig, system: StaleSystem) -> Callable[[tuple[int, int, int]], float]:
    """Training FLOPs per clip as a function of the model input's (T, H, W): budget.flops_per_clip if set (the
    same for every shape), else the analytic count of stale.models.flops at that shape (buckets change it from
    batch to batch; with a vae the shape is the latent one)."""
    if cfg.budget.get("flops_per_clip") is not None:
        fixed = float(cfg.budget.flops_per_clip)
        return lambda thw: fixed
    config = system.model.config
    # the label-free hinge branch runs forward + backward on hinge_fraction of the batch (model.cond=text: twice,
    # each clip with its own caption and with another's)
    passes = 2 if config.cond == "text" else 1
    factor = 1 + passes * system.objective.hinge_fraction if system.objective.hinge_weight > 0 else 1.0

    @functools.lru_cache(maxsize=None)
    def flops(thw: tuple[int, int, int]) -> float:
        return factor * float(training_flops_per_clip(config, frames=thw[0], size=(thw[1], thw[2])))

    return flops


def thread_tuner(cfg: DictConfig) -> ThreadTuner | None:
    """cfg.threads on CPU: an integer sets torch's threads now; auto returns a ThreadTuner that measures 1 thread
    against this process's share of the cores in the first steps (unless $OMP_NUM_THREADS chose); null keeps
    torch's default (one per core)."""
    threads = cfg.get("threads", "auto")
    if threads is None or accelerator_is_cuda(cfg) or (threads == "auto" and os.environ.get("OMP_NUM_THREADS")):
        return None
    if threads == "auto":
        devices = cfg.trainer.get("devices", 1)
        share = max(1, (os.cpu_count() or 1) // (devices if isinstance(devices, int) and devices > 0 else 1))
        return ThreadTuner(sorted({1, share})) if share > 1 else None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads={threads!r} must be auto, null or an integer >= 1")
    torch.set_num_threads(threads)
    return None


def build_callbacks(cfg: DictConfig, system: StaleSystem) -> list[L.Callback]:
    """The callbacks group (Lightning's own: EMA, checkpoints, lr and throughput monitors; sampling), then the
    NaN guard, the compute budget, the thread tuner and the deadline. Lightning moves checkpoint callbacks last."""
    callbacks = []
    has_logger = any(node is not None for node in (cfg.get("logger") or {}).values())
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or (not has_logger and name in NEEDS_LOGGER):  # these refuse to run without a logger
            continue
        kwargs = {}
        if name == "ema" and node.get("device", None) is None and accelerator_is_cuda(cfg):
            kwargs["device"] = "cuda"  # the model is still on the CPU when the callback copies it
        callbacks.append(instantiate(node, **kwargs))
    callbacks.append(instantiate(cfg.nan_guard))
    config = system.model.config  # the budget plans with the model's own clip
    callbacks.append(
        instantiate(cfg.budget, flops_per_clip=system.clip_flops((config.frames, config.size, config.size)))
    )
    tuner = thread_tuner(cfg)
    if tuner is not None:
        callbacks.append(tuner)
    if cfg.trainer.max_steps is None:  # a deadline, not a step count (the CPU default: conf/trainer/cpu.yaml)
        callbacks.append(instantiate(cfg.deadline, out_dir=cfg.paths.output_dir))
    return callbacks


def build_loggers(cfg: DictConfig, out: Path) -> list:
    """The logger group; W&B with no account and no network runs offline unless a key is configured."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if name == "wandb":
            offline = node.get("offline")
            if offline is None:
                offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            # set up now, so WANDB_SILENT applies before wandb.init checks the settings WandbLogger passes
            # (its anonymous=None warns otherwise)
            wandb.setup(wandb.Settings(**({"mode": "offline"} if offline else {})))
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            loggers.append(instantiate(node, offline=bool(offline)))
        else:
            loggers.append(instantiate(node))
    return loggers


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """Lightning's Trainer, with SafeCheckpointIO (clear disk-full errors) unless plugins are configured (FSDP2's
    full-file checkpoints use it too; its distributed ones are written by torch.distributed.checkpoint)."""
    plugins = {} if cfg.trainer.get("plugins") is not None else {"plugins": [SafeCheckpointIO()]}
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, max_steps=max_steps(cfg), **plugins)


def plan_schedule(cfg: DictConfig, system: StaleSystem, budget: ComputeBudget, trainer: L.Trainer) -> None:
    """With a FLOP budget the schedule decays to its floor where the budget ends (ComputeBudget.schedule_steps)."""
    clips_per_step = (
        cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * trainer.world_size // cfg.parallel.sequence
    )  # the ranks of a sequence-parallel group share clips
    try:
        steps = budget.schedule_steps(clips_per_step, max_steps(cfg), int(cfg.schedule.get("warmup", 0)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if steps is not None:
        system.schedule_steps = steps
