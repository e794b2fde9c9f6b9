"""The Lightning system: wires the Stale Transformer to the Stale objective, the optimiser and sampling.

The model, the objective and the samplers know nothing of Lightning; this file is the only place they meet.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from stale.diffusion import flow
from stale.diffusion.objective import StaleObjective
from stale.diffusion.samplers import SAMPLERS, time_grid
from stale.system.schedules import lr_multiplier


def to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], done on the device so the loader ships bytes."""
    return video.float().div_(127.5).sub_(1.0)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class StaleSystem(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        objective: StaleObjective,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple = (0.9, 0.99),
        schedule: dict | None = None,
        val_times: tuple = (0.1, 0.3, 0.5, 0.7, 0.9),
        run_config: dict | None = None,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"optim.lr={lr} must be > 0")
        self.model, self.objective = model, objective
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.schedule = dict(schedule or {"name": "constant", "warmup": 0})
        self.val_times = tuple(val_times)
        self.null_label = model.config.num_classes
        # Everything needed to rebuild this system from a checkpoint, without pickled objects.
        self.save_hyperparameters({"run_config": run_config or {}})

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        return self.model(x, t, y)

    def training_step(self, batch, batch_idx):
        video, label = batch
        parts = self.objective(self.model, to_unit_range(video), label, self.null_label)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=False, on_step=True)
        self.log("loss", parts["loss"].detach(), prog_bar=True, logger=False)
        return parts["loss"]

    def validation_step(self, batch, batch_idx):
        """Velocity loss on held-out clips at a fixed grid of t with fixed noise: comparable across runs."""
        video, label = batch
        x = to_unit_range(video)
        g = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)
        z = flow.sample_prior(x.shape, self.objective.prior, generator=g).to(x)
        losses = []
        for t_val in self.val_times:
            t = torch.full((x.shape[0],), t_val, device=x.device)
            v, _ = self.model(flow.interpolate(z, x, t), t, label)
            losses.append((v.float() - flow.velocity_target(z, x)).pow(2).mean())
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # no weight decay on norms, biases and embeddings (1-D tensors and the label table)
            (no_decay if p.ndim < 2 or "y_embed" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=fused or None)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 10_000
        sched_kwargs = {k: v for k, v in self.schedule.items() if k not in ("name", "warmup")}
        fn = lr_multiplier(self.schedule["name"], int(self.schedule.get("warmup", 0)), total, **sched_kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, steps: int = 50, sampler: str = "euler", guidance: float = 1.0,
               seed: int = 0, frames: int | None = None, size: int | None = None, progress: bool = False,
               classifier_guidance: float = 0.0) -> torch.Tensor:
        """Generate uint8 videos (B, C, T, H, W) for `labels`.

        sampler: euler | heun | rk4 (stale/diffusion/samplers.py). guidance: classifier-free guidance
        weight (1 = plain conditional). classifier_guidance: scale of the hinge head's margin gradient
        (0 = off; a heuristic for the uniform prior, see stale/diffusion/guidance.py). The same seed gives
        the same videos: the prior is drawn on the CPU from `seed` and the samplers are deterministic.
        """
        from stale.diffusion.guidance import classifier_free, classifier_guided, input_gradient
        from stale.diffusion.hinge import margin
        from stale.diffusion.samplers import get_sampler

        solve = get_sampler(sampler)  # fails on an unknown name before any work
        cfg = self.model.config
        shape = (len(labels), cfg.in_channels, frames or cfg.frames, size or cfg.size, size or cfg.size)
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = flow.sample_prior(shape, self.objective.prior, generator=g).to(self.device)
        labels = labels.to(self.device)
        null = torch.full_like(labels, self.null_label)

        velocity = classifier_free(lambda x_t, t: self.model(x_t, t, labels)[0],
                                   lambda x_t, t: self.model(x_t, t, null)[0], guidance)
        if classifier_guidance:
            # the head is trained label-free (null label), so it is read the same way here
            head_margin = lambda x_t, t: margin(self.model(x_t, t, null)[1].float(), labels)  # noqa: E731
            velocity = classifier_guided(velocity, input_gradient(head_margin), classifier_guidance)

        was_training = self.model.training
        self.model.eval()
        try:
            out = solve(velocity, x, time_grid(steps, x.device), clamp=self.objective.prior == "uniform",
                        progress=progress)
        finally:
            self.model.train(was_training)
        return to_uint8(out)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["stale_format"] = 1
