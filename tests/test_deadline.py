"""The training deadline (stale/system/deadline.py): plan the steps from the measured rate, stretch the schedule
over them, say so, and keep the plan on resume."""

import json
import logging
import time

import lightning as L
import pytest
import torch

from helpers import TINY_RUN, train_on_stream
from stale.bench import random_batches
from stale.bench.step import InMemory
from stale.system.deadline import TrainingDeadline, plan_steps
from stale.train import build_system

DEADLINE = [
    "trainer.max_steps=null",
    "deadline.max_minutes=0.25",
    "deadline.max_steps=100000",
    "deadline.calibration_steps=10",
    "deadline.skip_steps=2",
    "deadline.margin=0.3",
    "schedule.warmup=20",
    "trainer.val_check_interval=1000",
    "sample_every_n_steps=0",
    "callbacks.model_checkpoint.every_n_train_steps=15",
    "optim.lr=1e-3",
]  # the lr values below


def test_plan_steps_arithmetic():
    # 10 steps/s for 100 s, 10% kept back: 900 more steps after step 50
    assert plan_steps(step=50, rate=10.0, remaining_s=100.0, margin=0.1, max_steps=4000) == 950
    assert plan_steps(step=50, rate=10.0, remaining_s=100.0, margin=0.1, max_steps=500) == 500  # the cap wins
    assert plan_steps(step=50, rate=10.0, remaining_s=-3.0, margin=0.1, max_steps=4000) == 51  # already late


@pytest.mark.parametrize(
    "key,value",
    [("max_minutes", 0), ("max_minutes", True), ("max_steps", 0), ("calibration_steps", 1.5), ("margin", 1.0)],
)
def test_bad_values_name_the_key(key, value):
    kwargs = {"max_minutes": 1.0, "max_steps": 10, key: value}
    with pytest.raises(ValueError, match=rf"deadline\.{key}="):
        TrainingDeadline(**kwargs)


def test_deadline_plans_steps_stretches_schedule_and_resume_keeps_plan(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    steps = train_on_stream(tmp_path / "first", *DEADLINE)
    record = json.loads((tmp_path / "first" / "deadline.json").read_text())
    planned = record["planned_steps"]
    assert 15 < planned < 100000  # decided after the 10 calibration steps, far below the cap
    assert record["decisions"][0]["step"] == 12 and record["decisions"][0]["steps_per_s"] > 0
    assert any(
        "deadline: measured" in r.getMessage() and f"training {planned:,} steps" in r.getMessage()
        for r in caplog.records
    )
    last = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    # the plan keeps 30% of the time back; only a machine that slowed down by more stops at the deadline instead
    assert last["global_step"] == (record["stopped_at"] or planned)
    assert last["callbacks"]["TrainingDeadline"]["planned_steps"] == planned
    # the arctan schedule decayed over the planned steps: the last step's lr is near the floor (0.1 x 1e-3);
    # over the 100000-step cap it would still be near the peak
    lr = {s: float(v["lr/decay"]) for s, v in steps.items() if "lr/decay" in v}
    assert lr[max(lr)] < 0.12e-3, lr[max(lr)]
    assert max(lr.values()) > 0.9e-3  # the warmup reached the peak first

    # resume from the periodic checkpoint after the decision: the plan is kept, no new measurement
    ckpt = tmp_path / "first" / "checkpoints" / "step0000015.ckpt"
    caplog.clear()
    resumed = train_on_stream(tmp_path / "resumed", *DEADLINE, f"ckpt_path={ckpt}")
    again = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert again["global_step"] == planned
    assert any("resumed: keeping the planned step count" in r.getMessage() for r in caplog.records)
    assert resumed[16]["lr/decay"] == steps[16]["lr/decay"]  # the same stretched schedule after the resume


def test_thread_tuner_tries_each_count_keeps_the_fastest_and_saves_it(tmp_path):
    from stale.system.threads import ThreadTuner

    before = torch.get_num_threads()
    tuner = ThreadTuner([1, 2], steps_each=2, skip_steps=1)
    try:
        train_on_stream(tmp_path, "threads=null", "trainer.max_steps=8", "sample_every_n_steps=0", callbacks=[tuner])
        assert {c: len(ts) for c, ts in tuner.times.items()} == {1: 2, 2: 2}  # steps 1-2 on 1 thread, 3-4 on 2
        medians = {c: sorted(ts)[1] for c, ts in tuner.times.items()}  # the upper of two, as the tuner takes it
        assert tuner.chosen == min(medians, key=medians.get) and tuner.done_at == 5
        assert torch.get_num_threads() == tuner.chosen
        last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["callbacks"]["ThreadTuner"] == {"chosen": tuner.chosen}
    finally:
        torch.set_num_threads(before)


class SlowStart(L.Callback):
    """A machine that is busy while the rate is measured and free afterwards: 60 ms more per step until step 12."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step <= 12:
            time.sleep(0.06)


def test_plan_is_raised_when_the_machine_gets_faster(tmp_path, compose_train):
    cfg = compose_train(
        *TINY_RUN,
        "data.frames=2",
        "sample.num_videos=2",
        "sample.steps=2",
        "budget.flops_per_clip=1e6",
        "logger=csv",
        f"paths.output_dir={tmp_path}",
    )
    system = build_system(cfg)
    deadline = TrainingDeadline(
        max_minutes=0.2, max_steps=100000, calibration_steps=6, skip_steps=2, margin=0.3, out_dir=str(tmp_path)
    )
    trainer = L.Trainer(
        max_steps=-1,
        callbacks=[SlowStart(), deadline],
        val_check_interval=20,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(system, InMemory(random_batches(400, 2, 2, 8)), InMemory(random_batches(1, 2, 2, 8)))
    first, *later = deadline.decisions
    assert first["why"].startswith("measured") and first["step"] == 8
    raised = [d for d in later if d["why"].endswith("faster than measured")]
    assert raised and raised[0]["step"] == 20 and raised[0]["planned_steps"] > 1.05 * first["planned_steps"]
    assert trainer.global_step == (deadline.stopped_at or deadline.planned_steps)
    assert json.loads((tmp_path / "deadline.json").read_text())["planned_steps"] == deadline.planned_steps


def test_make_trains_clock_counts_the_set_up(monkeypatch, caplog):
    """make train sets STALE_DEADLINE_FROM to when make started: its venv and install count against the deadline."""
    monkeypatch.setenv("STALE_DEADLINE_FROM", str(time.time() - 90.0))
    left = TrainingDeadline(max_minutes=8.5, max_steps=10).t_deadline - time.monotonic()
    assert 8.5 * 60 - 90 - 5 < left <= 8.5 * 60 - 90
    for stale in ("1000", "soon", str(time.time() + 600)):  # older than the deadline, not a number, in the future
        monkeypatch.setenv("STALE_DEADLINE_FROM", stale)
        caplog.clear()
        left = TrainingDeadline(max_minutes=8.5, max_steps=10).t_deadline - time.monotonic()
        assert 8.5 * 60 - 5 < left <= 8.5 * 60
        assert any("ignoring STALE_DEADLINE_FROM" in r.getMessage() for r in caplog.records)
