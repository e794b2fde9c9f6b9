"""The one training step every stale-bench section and experiment times: what Trainer.fit does per step for a
StaleSystem on one device, without Lightning.

It is built from the system itself: the loss is StaleSystem.batch_loss (training_step's objective: label or caption
conditioning, the hinge branch, DoG, frame context, latents, each micro-batch's noise seeded as Lightning's step
seeds it), the optimiser and learning-rate schedule are StaleSystem.configure_optimizers', compilation is
StaleSystem.setup's (compile=...), and gradients are clipped by norm as conf/trainer/*.yaml asks (1.0). Precision
as Lightning's: 32-true, or bf16-mixed (autocast around the loss, backward outside it). Left out: Lightning itself
(hooks, logging, progress bar) and stale-train's callbacks (EMA, NaN guard, budget); the `train` section measures
what Lightning costs on top. tests/test_bench.py checks that k steps land on trainer.fit's losses and weights.
"""

from __future__ import annotations

import functools

import torch

from stale.diffusion.objective import StaleObjective
from stale.system.schedules import Constant, LRSchedule
from stale.system.stale_system import StaleSystem, noise_seed

# the two precisions of the step, under every name a bench key takes (train.precision, gpu.dtype)
PRECISIONS = {name: "32-true" for name in ("32-true", "32", "float32", "fp32")} | {
    name: "bf16-mixed" for name in ("bf16-mixed", "bf16", "bfloat16")
}


def resolve_precision(value, device: str = "cpu", key: str = "precision") -> str:
    """32-true or bf16-mixed: `auto` is bf16-mixed on CUDA (as trainer=gpu) and 32-true elsewhere."""
    if str(value) == "auto":
        return "bf16-mixed" if str(device).startswith("cuda") else "32-true"
    if str(value) not in PRECISIONS:
        raise ValueError(f"{key}={value!r} is not one of auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[str(value)]


def make_system(
    model: torch.nn.Module,
    lr: float = 1e-3,
    objective: StaleObjective | None = None,
    schedule: LRSchedule | None = None,
    weight_decay: float = 0.0,
    **kwargs,
) -> StaleSystem:
    """The StaleSystem the benches wrap around `model`: conf/train.yaml's optimiser (AdamW, betas 0.9/0.99) at `lr`,
    the default objective and a constant learning rate unless given (kwargs: any other StaleSystem argument, e.g.
    compile, autoencoder)."""
    optimizer = functools.partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    return StaleSystem(
        model, objective or StaleObjective(), optimizer=optimizer, schedule=schedule or Constant(warmup=0), **kwargs
    )


class TrainStep:
    """`step(batch)`: loss, backward, clip, AdamW step, schedule step, zero_grad; returns the detached loss.

    `backward(batch)` and `update()` are the two halves, for callers that act between them (the parallel section
    all-reduces gradients there). `steps` is the schedule's length when the system has no schedule_steps (in a fit
    it is trainer.max_steps); `steps_done` is the batch index the next step's noise seed is built from.
    """

    def __init__(
        self,
        system: StaleSystem,
        device: str = "cpu",
        precision: str = "32-true",
        clip: float | None = 1.0,
        steps: int = 10_000,
    ):
        self.system, self.device, self.clip = system.to(device).train(), device, clip
        self.amp, self.dev_type = resolve_precision(precision, device) == "bf16-mixed", torch.device(device).type
        if system.schedule_steps is None:
            system.schedule_steps = steps
        system.setup("fit")  # compiles as stale-train does when the system was built with compile=...
        conf = system.configure_optimizers()
        self.optimizer, self.scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.steps_done = 0

    def backward(self, batch) -> dict[str, torch.Tensor]:
        """The loss parts of `batch` (moved to the device) after their backward."""
        batch = tuple(b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)
        with torch.autocast(self.dev_type, dtype=torch.bfloat16, enabled=self.amp):
            parts = self.system.batch_loss(batch, noise_seed(self.system.seed, self.steps_done, 0))
        parts["loss"].backward()
        return parts

    def update(self) -> None:
        """What follows backward in Lightning's step: clip by norm, optimiser step, schedule step, zero_grad."""
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1

    def __call__(self, batch) -> torch.Tensor:
        loss = self.backward(batch)["loss"].detach()
        self.update()
        return loss


class InMemory:
    """Pre-decoded batches as one iterable for Trainer.fit (a bare list would be read as a list of dataloaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
