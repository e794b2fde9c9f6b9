"""The Lightning system: wires the Stale Transformer to the Stale objective, the optimiser and sampling.

The model, the objective and the samplers know nothing of Lightning; this file is the only place they meet.
What a long run needs around it (EMA, compute budget, NaN guard, sampling during training, checkpoints)
lives in callbacks next to this file and in Lightning's own callbacks; see docs/training.md.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from stale.diffusion import flow
from stale.diffusion.generate import generate
from stale.diffusion.objective import StaleObjective
from stale.parallel.fsdp import shard_model
from stale.parallel.mesh import sequence_parallel_of
from stale.parallel.sequence import sharded
from stale.system.schedules import Constant, LRSchedule
from stale.utils.provenance import shard_list
from stale.utils.ranks import data_parallel_rank_world

CHECKPOINT_FORMAT = 2  # bump when the layout of what on_save_checkpoint adds changes


def noise_seed(seed: int, batch_idx: int, rank: int) -> int:
    """The seed of one micro-batch's noise, times and label dropout (see StaleSystem.noise_seed)."""
    return int(np.random.SeedSequence([seed, batch_idx, rank]).generate_state(1)[0])


def validation_losses(
    model: nn.Module,
    prior: str,
    x: torch.Tensor,
    label: torch.Tensor,
    batch_idx: int,
    times,
    prior_scale: float = 1.0,
    text: tuple = (),
) -> list[torch.Tensor]:
    """Velocity MSE of one batch x (in the model's space: pixels in [-1, 1], or normalised latents) at each t in
    `times`, with noise from a CPU generator seeded 1000 + batch_idx: the number depends only on the weights and
    the clips, never on the RNG state of training."""
    g = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)
    z = flow.sample_prior(x.shape, prior, generator=g, scale=prior_scale).to(x)
    losses = []
    for t_val in times:
        t = torch.full((x.shape[0],), t_val, device=x.device)
        v, _ = model(flow.interpolate(z, x, t), t, label, *text)  # text: (captions, mask) with model.cond=text
        losses.append((v.float() - flow.velocity_target(z, x)).pow(2).mean())
    return losses


def no_decay(name: str, p: nn.Parameter) -> bool:
    """No weight decay on norms and biases (1-D tensors) and embeddings (the label table, the learned text
    encoder's token table and positions)."""
    return p.ndim < 2 or "y_embed" in name or name.startswith("text.encoder.embed") or name == "text.encoder.pos"


def check_optimizer(optimizer: Callable[..., torch.optim.Optimizer]) -> None:
    """The optim node before training: lr > 0 and weight_decay >= 0 (what any run needs; torch accepts lr = 0),
    then the optimiser's own constructor on a stand-in parameter, so a bad value stops before any data is read."""
    kwargs = getattr(optimizer, "keywords", {})
    for key, ok, need in (("lr", lambda v: v > 0, "> 0"), ("weight_decay", lambda v: v >= 0, ">= 0")):
        value = kwargs.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"optim.{key}={value!r} must be a number {need}")
    try:
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as e:  # e.g. "Invalid beta parameter at index 1: 1.5"
        raise ValueError(f"optim.{'betas' if 'beta' in str(e) else _target_name(optimizer)}: {e}") from None


def _target_name(optimizer) -> str:
    return getattr(getattr(optimizer, "func", optimizer), "__name__", "optimizer")


class StaleSystem(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        objective: StaleObjective,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,  # the optim node: params -> optimiser
        schedule: LRSchedule | None = None,  # the schedule node (stale/system/schedules.py); None: constant
        val_times: tuple = (0.1, 0.3, 0.5, 0.7, 0.9),
        run_config: dict | None = None,
        seed: int = 0,
        compile: bool | dict = False,
        schedule_steps: int | None = None,
        provenance: dict | None = None,
        finetune_base: dict | None = None,
        autoencoder=None,
        text_encoder=None,
        empty_text: tuple | None = None,
        prompts: list | None = None,
        scheduler: dict | None = None,
    ):
        super().__init__()
        self.optimizer = optimizer or functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
        check_optimizer(self.optimizer)
        if not isinstance(compile, (bool, dict)):
            raise ValueError(f"compile={compile!r} must be true, false or a dict of torch.compile arguments")
        self.model, self.objective = model, objective
        # a frozen stale.latent.autoencoder.Autoencoder (vae=diffusers) or None (pixel space). Not an nn.Module:
        # never in state_dict, the optimiser or the EMA copy (docs/latent.md)
        self.autoencoder = autoencoder
        # model.cond=text: a stale.text.encoders encoder (frozen hf, or the learned encoder's tokenizer; not an
        # nn.Module, like the autoencoder), the empty caption's encoding (from it, or from a stale-encode cache) and
        # the prompts sampled during and after training (None: the first training batch's captions)
        self.text_encoder, self.empty_text = text_encoder, empty_text
        # sample.scheduler: the sampling grid of a diffusers flow scheduler (a backbone's family), None: stale's
        self.scheduler = scheduler
        self.prompts = list(prompts) if prompts else None
        if model.config.cond == "text" and (text_encoder is None or empty_text is None):
            raise ValueError("model.cond=text needs a text encoder: text_encoder=hf|learned")
        self.schedule = schedule or Constant(warmup=0)
        self.schedule_steps = schedule_steps  # None: trainer.max_steps (train() lowers it to fit a FLOP budget)
        self.val_times = tuple(val_times)
        self.null_label = model.config.num_classes
        self.seed = seed
        # compile: False, True (torch.compile defaults: inductor) or a dict of torch.compile keyword arguments
        self.compile_options = (dict(compile) if isinstance(compile, dict) else {}) if compile else None
        self._compiled = False
        self.provenance = dict(provenance or {})
        # {"init_from", "sha256"} when frozen tensors came from init_from: checkpoints then leave them out
        self.finetune_base = dict(finetune_base) if finetune_base else None
        self.last_loss_parts: dict[str, torch.Tensor] = {}  # the latest micro-batch's loss parts (NaN guard)
        self.logged_loss: list[tuple[int, torch.Tensor]] = []  # (step, train/loss) first and last logged
        # training FLOPs of the latest micro-batch on this device, read by ThroughputMonitor (Lightning: "flops per
        # device") and the compute budget; set from each batch's shape by clip_flops ((T, H, W) of the model's input ->
        # FLOPs per clip; stale.train sets it). Sequence-parallel ranks each do their share of the batch's FLOPs.
        self.flops_per_batch: float | None = None
        self.clip_flops = None
        # Everything needed to rebuild this system from a checkpoint, without pickled objects.
        self.save_hyperparameters({"run_config": run_config or {}})

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        return self.model(x, t, y)

    def setup(self, stage: str) -> None:
        # After the callbacks' setup, so that the EMA callback (WeightAveraging) deep-copies the plain module. nn.Module.compile
        # compiles in place: parameter names and checkpoints are the same with and without it.
        if stage == "fit" and self.compile_options is not None and not self._compiled:
            # the module itself: validation and sampling run compiled too
            self.model.compile(**{k: v for k, v in self.compile_options.items() if k != "fullgraph"})
            # The training step's loss (both branches of the objective, noise draws included) is one graph: any
            # graph break is an error, not a silent slowdown (tests/test_system.py checks there is none).
            self._loss_parts = torch.compile(self._loss_parts, **{"fullgraph": True, **self.compile_options})
            self._compiled = True

    def configure_model(self) -> None:
        """trainer=fsdp / fsdp_cpu (FSDP2): shard each StaleBlock, then the rest (stale/parallel/fsdp.py)."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):
            shard_model(self.model, strategy.root_device.type, strategy.world_size, self.trainer.precision)

    def _loss_parts(self, x: torch.Tensor, label: torch.Tensor, text: tuple = ()) -> dict[str, torch.Tensor]:
        # model.cond=text: the captions' encoding and the empty caption's (caption dropout); () in label mode
        return self.objective(self.model, x, label, self.null_label, text or None, self.empty_text)

    # --- training ---------------------------------------------------------------------------------------
    def noise_seed(self) -> int:
        """Seed of this micro-batch's noise, times and label dropout: a function of (seed, batch index, rank).

        Drawing from a per-batch seed rather than the global RNG stream makes the noise of step s the same
        whether the run got there straight or through a resume, whatever ran in between (validation,
        sampling, data-loader start-up). The rank is the data-parallel one: the ranks that share a clip under
        sequence parallelism draw the same noise (stale/parallel/mesh.py).
        """
        if self._trainer is None:
            return noise_seed(self.seed, 0, 0)
        return noise_seed(self.seed, self.trainer.fit_loop.total_batch_idx, data_parallel_rank_world(self.trainer)[0])

    def encode_batch(self, video: torch.Tensor) -> torch.Tensor:
        """A batch as the loader gives it -> pixels in [-1, 1] (pixel space), or the posterior moments of its
        latents: uint8 clips are encoded here (vae=diffusers with data=shards), float moments come from a
        stale-encode cache (data=latents). Deterministic: the draw from the moments is `latents`'."""
        if self.autoencoder is None:
            return flow.to_unit_range(video)
        self.autoencoder.to(video.device)
        return self.autoencoder.encode(flow.to_unit_range(video)) if video.dtype == torch.uint8 else video.float()

    def latents(self, moments: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """The model's input: a normalised posterior draw (from the global RNG), or its mean with sample=False."""
        if self.autoencoder is None:
            return moments
        return self.autoencoder.sample(moments) if sample else self.autoencoder.mode(moments)

    def encode_text(self, text, device) -> tuple:
        """A batch's captions -> (text, mask) on `device`: strings through the text encoder, or cached embeddings
        and masks as they are; () in label mode."""
        if self.model.config.cond != "text":
            return ()
        if text is None:
            raise ValueError("model.cond=text: the batch has no captions (the data module was built without captions)")
        if isinstance(text, (list, tuple)) and text and isinstance(text[0], str):
            if self.prompts is None:  # sample what the data looks like: the first batch's captions
                self.prompts = list(dict.fromkeys(text))
            self.text_encoder.to(device)
            text = self.text_encoder.encode(list(text))
        return tuple(v.to(device) for v in text)

    def batch_loss(self, batch, seed: int) -> dict[str, torch.Tensor]:
        """The objective's loss parts of one training micro-batch, its noise, times and label dropout drawn from
        `seed` (training_step passes noise_seed(); stale-bench's step does the same without a Trainer)."""
        video, label, *text = batch
        x = self.encode_batch(video)
        text = self.encode_text(text[0] if text else None, x.device)
        cuda = x.device.type == "cuda"
        with torch.random.fork_rng(devices=[x.device] if cuda else [], device_type="cuda"):
            torch.manual_seed(seed)
            x = self.latents(x)  # inside the seeded block: cached and on-the-fly latents draw the same noise
            sp = sequence_parallel_of(self.trainer) if self._trainer is not None else None
            if self.clip_flops is not None:  # this batch's shape: with buckets it changes from batch to batch
                self.flops_per_batch = self.clip_flops(tuple(x.shape[2:])) * x.shape[0] / (sp.size if sp else 1)
            # parallel.sequence > 1: the blocks see this rank's share of each clip's tokens (stale/parallel/)
            with sharded(self.model, sp):
                return self._loss_parts(x, label, text)

    def training_step(self, batch, batch_idx):
        parts = self.batch_loss(batch, self.noise_seed())
        b = batch[0].shape[0]
        # every part is logged; "loss" is the weighted total the objective built from its config weights
        self.last_loss_parts = {k: v.detach() for k, v in parts.items()}
        # Log only on the steps the loggers write: each self.log call costs ~0.3 ms of Lightning bookkeeping
        # (Lightning issue #20388), which measured 3.3% of a tiny CPU step when done every step.
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if every <= 1 or (self.global_step + 1) % every == 0:
            logged = {f"train/{k}": v.detach() for k, v in parts.items()}
            self.log_dict(logged, on_step=True, on_epoch=False, batch_size=b)
            self.log("loss", logged["train/loss"], prog_bar=True, logger=False, batch_size=b)
            self.logged_loss = (self.logged_loss[:1] + [(self.global_step, logged["train/loss"])])[-2:]
        return parts["loss"]

    def loss_summary(self) -> dict[str, str]:
        """First and last logged train/loss (did it fall?) and the last val/loss, for stale-train's report."""
        out = {}
        if self.logged_loss:
            (s0, l0), (s1, l1) = self.logged_loss[0], self.logged_loss[-1]
            out["train/loss"] = f"{float(l0):.4g} at step {s0} -> {float(l1):.4g} at step {s1}"
        val = self.trainer.callback_metrics.get("val/loss") if self._trainer is not None else None
        if val is not None:
            out["val/loss"] = f"{float(val):.4g}"
        return out

    def validation_step(self, batch, batch_idx):
        """Velocity loss on held-out clips at a fixed grid of t with fixed noise: comparable across runs.

        The noise of batch i comes from its own seeded CPU generator and t runs over `val_times`, so the
        number depends only on the weights and the validation clips, not on the RNG state of training.
        """
        video, label, *text = batch
        x = self.latents(self.encode_batch(video), sample=False)
        text = self.encode_text(text[0] if text else None, x.device)
        losses = validation_losses(
            self.model, self.objective.prior, x, label, batch_idx, self.val_times, self.objective.scale, text
        )
        for t_val, loss in zip(self.val_times, losses):
            self.log(f"val/loss_t{t_val:.2f}", loss, sync_dist=True, batch_size=video.shape[0])
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, sync_dist=True, batch_size=video.shape[0])

    def _schedule_fn(self, total: int):
        self.schedule.check_total(total)
        return functools.partial(self.schedule, total=total)

    def set_schedule_steps(self, total: int) -> None:
        """End the learning-rate schedule at step `total` from the next optimiser step on (the training deadline
        decides the step count while training runs: stale/system/deadline.py)."""
        # a plan shorter than the warmup still needs a valid schedule; the deadline's hard stop ends such a run
        total = max(int(total), self.schedule.warmup + 1)
        self.schedule_steps = total
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.lr_lambdas = [self._schedule_fn(total)] * len(config.scheduler.optimizer.param_groups)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping, except that bf16-mixed may clip a fused optimizer's gradients.

        Lightning's AMP plugin refuses to clip for any optimizer that unscales in its own step (fused AdamW),
        which guards fp16's GradScaler; bf16-mixed has no scaler, so the gradients are already true ones and
        the plain clipping of the base Precision plugin is right (the refusal would stop every GPU run).
        """
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    OPTIMIZER_ARGS = ("params", "fused")  # what configure_optimizers passes the optim node itself

    def configure_optimizers(self):
        decay, keep = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (keep if no_decay(name, p) else decay).append(p)
        groups = [
            {"params": decay, "name": "decay"},  # the optim node's weight_decay
            {"params": keep, "weight_decay": 0.0, "name": "no_decay"},
        ]
        # One fused kernel for the whole update, on CUDA and CPU: on the tiny CPU model (63 tensors) torch's
        # default per-tensor loop took 15.6 ms an update, fused 3.7 ms (stale-bench cpu; BENCHMARKS.md). Not
        # with fp16's GradScaler: a fused AdamW unscales inside its step, after gradient clipping would have run.
        fp16 = self._trainer is not None and self.trainer.precision == "16-mixed"
        fused = self.device.type in ("cuda", "cpu") and not fp16
        takes_fused = "fused" in inspect.signature(self.optimizer).parameters
        opt = self.optimizer(groups, **({"fused": fused or None} if takes_fused else {}))
        total = self.schedule_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else 10_000)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, self._schedule_fn(total))
        # stepped after every optimiser step (not every micro-batch), logged by LearningRateMonitor as lr/*
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
        }

    def sample(
        self,
        labels: torch.Tensor,
        steps: int = 50,
        sampler: str = "euler",
        guidance: float = 1.0,
        seed: int = 0,
        frames: int | None = None,
        size: int | None = None,
        progress: bool = False,
        classifier_guidance: float = 0.0,
        prompts: list[str] | None = None,
    ) -> torch.Tensor:
        """Generate uint8 videos (B, C, T, H, W) on the CPU for `labels`, with stale.diffusion.generate (the same
        path as StalePipeline, so a seed gives the same videos from this system and from its export); with an
        autoencoder they are decoded to pixels, and frames/size are the pixel clip's. model.cond=text: one prompt
        per video (default: self.prompts cycled), guided against the empty caption."""
        text = negative = None
        if self.model.config.cond == "text":
            pool = self.prompts or [""]
            prompts = prompts or [pool[i % len(pool)] for i in range(len(labels))]
            text, negative = self.text_encoder.encode(prompts), self.empty_text
        return generate(
            self.model,
            labels,
            prior=self.objective.prior,
            steps=steps,
            sampler=sampler,
            guidance=guidance,
            classifier_guidance=classifier_guidance,
            seed=seed,
            frames=frames,
            size=size,
            progress=progress,
            prior_scale=self.objective.scale,
            autoencoder=self.autoencoder,
            time_shift_base=self.objective.time_shift_base,
            time_shift_scale=self.objective.time_shift_scale,
            text=text,
            negative=negative,
            scheduler=self.scheduler,
        )

    @contextmanager
    def sampling_with(self, model: nn.Module | None):
        """`sample` uses `model` inside the block (FSDP2: a gathered whole copy, stale/system/training_samples.py); None:
        unchanged."""
        if model is None:
            yield
            return
        own, self.model = self.model, model
        try:
            yield
        finally:
            self.model = own

    # --- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Provenance in every checkpoint: resolved config, git commit and dirty flag, package versions, shards."""
        checkpoint["stale_format"] = CHECKPOINT_FORMAT
        trainer = self._trainer
        checkpoint["provenance"] = {
            **self.provenance,
            "config": self.hparams.get("run_config", {}),
            "shards": shard_list(trainer.datamodule if trainer is not None else None),
            "world_size": trainer.world_size if trainer is not None else 1,
            "global_step": self.global_step,
        }
        if self.logged_loss:  # the run's first logged train/loss: a resumed run's summary still starts there
            step, loss = self.logged_loss[0]
            checkpoint["first_logged_loss"] = {"step": int(step), "loss": float(loss)}
        if self.finetune_base:  # keep only what trains; resume and export rebuild the rest from init_from
            checkpoint["finetune_base"] = self.finetune_base
            trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            for key in ("state_dict", "current_model_state"):
                if key in checkpoint:
                    checkpoint[key] = {k: v for k, v in checkpoint[key].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the loggers' step axis on global_step; warn when the number of devices changed; fill in the frozen
        tensors a fine-tuning checkpoint left out, from this run's init_from (checked to be the same file)."""
        base = checkpoint.get("finetune_base")
        if base:
            if not self.finetune_base or self.finetune_base["sha256"] != base["sha256"]:
                key = "model.pretrained" if "pretrained" in base else "init_from"
                raise ValueError(
                    f"this checkpoint holds only its trained tensors, on top of {key}="
                    f"{base.get('pretrained', base.get('init_from'))} (sha256 {base['sha256'][:12]}); resume it "
                    f"with that {key} (this run has {self.finetune_base})"
                )
            own = {f"model.{k}": v for k, v in self.model.state_dict().items()}
            for key in ("state_dict", "current_model_state"):
                if key in checkpoint:
                    checkpoint[key] = {**own, **checkpoint[key]}
        first = checkpoint.get("first_logged_loss")
        if first:
            self.logged_loss = [(first["step"], torch.tensor(first["loss"]))]
        # Lightning adds one to its logging-step counter on restart, assuming the checkpoint was written in
        # on_train_batch_end, before the counter moves. last.ckpt is written at the end of the (endless) epoch,
        # after it moved: undo that, so that a run resumed from last.ckpt logs step s at s, not s + 1.
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        step = checkpoint.get("global_step", 0)
        if step > 0 and loop.get("_batches_that_stepped") == step:
            loop["_batches_that_stepped"] = step - 1
        old = (checkpoint.get("provenance") or {}).get("world_size")
        trainer = self._trainer
        if old is None or trainer is None or old == trainer.world_size:
            return
        rank_zero_warn(
            f"resuming a run saved with world size {old} on world size {trainer.world_size}. Restored exactly: "
            "weights, EMA, optimiser, learning-rate schedule, step counter, budget spend. Cannot match the "
            "uninterrupted run: the global batch (data.batch_size x devices x accumulation) changes by a factor "
            f"{trainer.world_size / old:g} while optim.lr stays; each rank draws its own data stream and noise, so "
            "the batches after the resume differ; only rank 0's data-loader position is in the checkpoint; "
            "GPU-hours count the new number of devices from here on.",
            category=UserWarning,
        )


__all__ = ["StaleSystem", "no_decay"]
