"""Compute budget: stops cleanly at the first budget another step would overrun, saves a checkpoint, logs spend."""

import csv
from pathlib import Path

import pytest
import torch

from helpers import TINY_RUN, run_cli
from stale.system.budget import ComputeBudget
from stale.train import ConfigError, train

TINY = [*TINY_RUN, "sample.num_videos=2", "sample.steps=2", "sample_every_n_steps=0"]


def rows_of(out: Path) -> list[dict]:
    with open(out / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def test_stale_train_stops_at_flop_budget_with_checkpoint(tmp_path):
    """`stale-train budget.max_flops=...`: 1e6 FLOPs/clip x 4 clips = 4e6 per step; 1.4e7 pays for 3 steps."""
    out = tmp_path / "run"
    proc = run_cli(
        "stale-train",
        *TINY,
        "logger=csv",
        "budget.flops_per_clip=1e6",
        "budget.max_flops=1.4e7",
        "trainer.max_steps=100",
        "trainer.log_every_n_steps=2",
        "optim.lr=1e-3",
        f"hydra.run.dir={out}",
    )
    assert "stopped by" in proc.stdout and "budget.max_flops" in proc.stdout
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    spent = ckpt["callbacks"]["ComputeBudget"]
    assert spent["flops"] == pytest.approx(1.2e7) and spent["flops"] <= 1.4e7  # never exceeded
    rows = rows_of(out)
    # counted every step, logged on the steps the logger writes (every 2nd) and at the step that stopped the run
    assert column(rows, "budget/flops") == {1: 8e6, 2: 1.2e7}
    assert set(column(rows, "budget/flops")) <= set(column(rows, "train/loss")) | {2}
    used = column(rows, "budget/used")
    assert used[2] == pytest.approx(1.2e7 / 1.4e7, rel=1e-6)
    assert set(column(rows, "budget/gpu_hours")) == {1, 2}
    # the schedule decays over the 3 affordable steps, not over trainer.max_steps=100
    assert ckpt["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(1e-3 * 0.1)  # arctan floor at step 3


def test_cost_budget_stops_in_process(tmp_path, compose_train):
    """A money budget smaller than one step: the first step runs, then training stops."""
    out = tmp_path / "run"
    cfg = compose_train(
        *TINY,
        "logger=csv",
        f"paths.output_dir={out}",
        "budget.flops_per_clip=1e6",
        "budget.max_cost=1e-9",
        "budget.cost_per_gpu_hour=2.0",
    )
    train(cfg)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1
    state = ckpt["callbacks"]["ComputeBudget"]
    assert state["cost"] == pytest.approx(state["gpu_seconds"] / 3600 * 2.0)
    assert "budget.max_cost" in state["stop_reason"]
    assert column(rows_of(out), "budget/cost")[0] == pytest.approx(state["cost"])


def test_flop_budget_smaller_than_warmup_fails_before_training(tmp_path, compose_train):
    cfg = compose_train(
        *TINY, "logger=none", f"paths.output_dir={tmp_path}", "budget.flops_per_clip=1e6", "budget.max_flops=8e6"
    )  # 2 steps, warmup 2
    with pytest.raises(ConfigError, match="schedule.warmup=2"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_overrun_rule_and_state():
    b = ComputeBudget(flops_per_clip=10.0, max_flops=100.0, max_gpu_hours=1.0, max_cost=5.0, cost_per_gpu_hour=10.0)
    assert b.max_steps_within(clips_per_step=3) == 3  # 30 FLOPs a step
    b.flops, b.gpu_seconds, b.cost = 70.0, 1800.0, 4.0
    assert b._overrun(30.0, 1.0) is None  # 100 <= 100: exactly at the budget is allowed
    assert "max_flops" in b._overrun(31.0, 1.0)
    assert "max_gpu_hours" in b._overrun(1.0, 1801.0)
    assert "max_cost" in b._overrun(1.0, 361.0)  # 0.1 h x 10 = 1.0 > 5 - 4
    assert b.fractions() == pytest.approx({"flops": 0.7, "gpu_hours": 0.5, "cost": 0.8})
    fresh = ComputeBudget(flops_per_clip=7.0)
    fresh.load_state_dict(b.state_dict())
    assert (fresh.flops, fresh.gpu_seconds, fresh.cost, fresh.flops_per_clip) == (70.0, 1800.0, 4.0, 7.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_flops": -1.0, "flops_per_clip": 1.0}, "budget.max_flops"),
        ({"max_cost": 3.0}, "budget.cost_per_gpu_hour"),
        ({"max_gpu_hours": 0}, "budget.max_gpu_hours"),
        ({"max_flops": 1e9}, "flops_per_clip"),
    ],
)
def test_bad_budget_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ComputeBudget(**kwargs)
