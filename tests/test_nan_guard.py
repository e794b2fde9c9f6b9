"""NaN/inf guard: a step with a non-finite loss or gradient is skipped with weights and optimiser state untouched;
past nan_guard.max_skips, training stops with the step and the loss components."""

import copy
import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import TINY_RUN, compose_train
from stale.system.nan_guard import NaNGuard, NonFiniteLossError
from stale.train import train

TINY = [
    *TINY_RUN,
    "sample.num_videos=2",
    "sample.steps=2",
    "sample_every_n_steps=0",
    "budget.flops_per_clip=1e6",
    "trainer.val_check_interval=4",
    "trainer.max_steps=4",
]


def make_cfg(out: Path, *overrides: str):
    return compose_train(*TINY, "logger=csv", f"paths.output_dir={out}", *overrides)


class Inject(L.Callback):
    """Real non-finite values at chosen optimiser steps: NaN in the model's output (so in the loss), or an
    inf gradient on one weight (finite loss, non-finite gradient norm)."""

    def __init__(self, nan_loss_at=(), inf_grad_at=()):
        self.nan_loss_at, self.inf_grad_at = set(nan_loss_at), set(inf_grad_at)

    def on_train_start(self, trainer, pl_module):  # after EMAWeightAveraging copied the model: it stays clean
        final = pl_module.model.final

        def poison_output(module, args, out):
            return out * float("nan") if module.training and trainer.global_step in self.nan_loss_at else out

        def poison_grad(grad):
            return grad + float("inf") if trainer.global_step in self.inf_grad_at else grad

        final.register_forward_hook(poison_output)
        final.linear.weight.register_hook(poison_grad)


class Snapshots(L.Callback):
    """Weights and optimiser state before and after every optimiser step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _state(trainer, pl_module):
        # the optimiser's state (moments, step counts); its param_groups hold the lr, which the schedule moves
        optim = trainer.optimizers[0].state_dict()["state"]
        return copy.deepcopy({"model": pl_module.model.state_dict(), "optim": optim})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._state(trainer, pl_module)


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def test_skips_leave_weights_and_optimiser_untouched(tmp_path):
    out = tmp_path / "run"
    snaps = Snapshots()
    train(make_cfg(out, "nan_guard.max_skips=2"), callbacks=[Inject(nan_loss_at=[1], inf_grad_at=[2]), snaps])
    for step in (1, 2):  # NaN loss, then inf gradient: skipped
        assert same(snaps.before[step], snaps.after[step]), f"step {step} changed the weights or optimiser"
    # ordinary steps do change them (step 0 has lr 0 under the arctan warmup: only Adam's moments move)
    assert not same(snaps.before[0]["optim"], snaps.after[0]["optim"])
    assert not same(snaps.before[3]["model"], snaps.after[3]["model"])
    assert snaps.after[3]["optim"][0]["step"] == 2  # Adam's own step count: 2 real updates
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["callbacks"]["NaNGuard"] == {"skips": 2, "skipped_steps": [1, 2]}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())  # EMA weights stayed finite
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    norm = {int(r["step"]): float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")}
    skips = {int(r["step"]): float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert math.isnan(loss[1]) and math.isfinite(loss[2]) and not math.isfinite(norm[2])
    assert skips == {0: 0.0, 1: 1.0, 2: 2.0, 3: 2.0}  # a running count, logged every step


def test_stops_after_max_skips_naming_step_and_losses(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite.*'velocity': nan.*max_skips=1") as err:
        train(make_cfg(tmp_path / "run", "nan_guard.max_skips=1"), callbacks=[Inject(nan_loss_at=[1, 2])])
    assert "skipped steps [1]" in str(err.value)


def test_guard_state_survives_resume():
    guard = NaNGuard(max_skips=3)
    guard.skips, guard.skipped_steps = 2, [5, 9]
    fresh = NaNGuard(max_skips=3)
    fresh.load_state_dict(guard.state_dict())
    assert (fresh.skips, fresh.skipped_steps) == (2, [5, 9])
    with pytest.raises(ValueError, match="nan_guard.max_skips"):
        NaNGuard(max_skips=-1)
