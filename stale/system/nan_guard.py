"""NaN/inf guard: skip an optimiser step whose loss or gradient is not finite, stop after too many (RELIABILITY.md).

On every optimiser step the guard measures the global gradient norm (before clipping; train/grad_norm) and checks
it and the micro-batch losses for NaN/inf; the flag is summed over ranks, so every rank acts alike. skip: all
gradients are dropped, so AdamW leaves weights and moments untouched while the step counter, schedule and budget
move on. stop: after `max_skips` skipped steps (counted across resume) the next one raises NonFiniteLossError.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many steps with a non-finite loss or gradient norm."""


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """Global L2 norm of all gradients (a 0-d tensor on the gradients' device; 0 when there are none)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2: sharded gradients, a replicated norm


class NaNGuard(L.Callback):
    def __init__(self, max_skips: int = 10):
        if not isinstance(max_skips, int) or isinstance(max_skips, bool) or max_skips < 0:
            raise ValueError(f"nan_guard.max_skips={max_skips!r} must be an integer >= 0")
        self.max_skips = max_skips
        self.skips = 0  # skipped steps in the whole run (saved in checkpoints)
        self.skipped_steps: list[int] = []  # the last few skipped steps, for the record
        self._bad_loss: torch.Tensor | None = None  # any non-finite micro-batch loss since the last step
        self._parts: dict = {}

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())  # stays on the device: no host sync per micro-batch
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        self._parts = getattr(pl_module, "last_loss_parts", {}) or {"loss": loss.detach()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norm = grad_norm(pl_module)  # under FSDP2 already the norm over every rank's shards (grad_norm)
        bad_loss = self._bad_loss if self._bad_loss is not None else torch.zeros((), dtype=torch.bool)
        self._bad_loss = None
        flag = (bad_loss.to(norm.device) | ~torch.isfinite(norm)).float()
        flag = trainer.strategy.reduce(flag, reduce_op="sum")  # the same decision on every rank
        pl_module.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False)
        if flag.item() == 0:
            pl_module.log("train/skipped_steps", float(self.skips), on_step=True, on_epoch=False)
            return
        step = trainer.global_step
        parts = {k: float(v) for k, v in self._parts.items()}
        what = f"step {step}: non-finite loss or gradient (loss parts {parts}, grad norm {float(norm):.4g})"
        if self.skips >= self.max_skips:
            raise NonFiniteLossError(
                f"stopping at {what}; {self.skips} step(s) were skipped before (nan_guard.max_skips="
                f"{self.max_skips}, skipped steps {self.skipped_steps}). Lower optim.lr, check the data, or "
                f"resume from an earlier checkpoint."
            )
        optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients: nothing changes
        self.skips += 1
        self.skipped_steps = (self.skipped_steps + [step])[-20:]
        log.warning("nan_guard: skipped %s (%d of at most %d)", what, self.skips, self.max_skips)
        pl_module.log("train/skipped_steps", float(self.skips), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"skips": self.skips, "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skips = int(state_dict.get("skips", 0))
        self.skipped_steps = list(state_dict.get("skipped_steps", []))
