"""Real DDP (gloo, 2 CPU processes launched by `stale-train`): resume a 1-device checkpoint on 2 devices,
with a NaN in rank 1's loss only.

Checks at once that (a) resuming after a change of trainer.devices works and warns about what cannot match,
and (b) the NaN guard takes the same action on every rank: rank 0's loss is finite, rank 1's is NaN, and both
skip the step, so their weights stay identical. The two test callbacks below are added from the command line
(`+callbacks.<name>._target_=...`), as a user would add their own. (ddp_spawn cannot be used in-process:
Lightning's EMAWeightAveraging holds a local function that does not pickle.)
"""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import QUIET_RUN, TINY_RUN, run_cli
from stale.train import train

TINY = [*TINY_RUN, *QUIET_RUN]


class NaNOnRank1(L.Callback):
    """NaN in rank 1's model output at one optimiser step (rank 0 stays finite)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_start(self, trainer, pl_module):
        def poison(module, args, out):
            hit = module.training and trainer.global_rank == 1 and trainer.global_step == self.step
            return out * float("nan") if hit else out

        pl_module.model.final.register_forward_hook(poison)


class SaveRankWeights(L.Callback):
    """Each rank writes its live weights after every optimiser step."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.save(
            {k: v.clone() for k, v in pl_module.model.state_dict().items()},
            f"{self.folder}/rank{trainer.global_rank}-step{trainer.global_step}.pt",
        )


@pytest.mark.slow
@pytest.mark.ddp
def test_resume_on_two_devices_and_nan_on_one_rank(tmp_path, compose_train):
    one = compose_train(*TINY, f"paths.output_dir={tmp_path / 'one'}", "trainer.max_steps=3")
    train(one)
    weights = tmp_path / "weights"
    weights.mkdir()
    tests_dir = str(Path(__file__).parent)
    proc = run_cli(
        "stale-train",
        *TINY,
        "trainer.max_steps=5",
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        f"ckpt_path={tmp_path / 'one' / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={tmp_path / 'two'}",
        "+callbacks.nan_rank1._target_=test_resume_ddp.NaNOnRank1",
        "+callbacks.nan_rank1.step=3",
        "+callbacks.save._target_=test_resume_ddp.SaveRankWeights",
        f"+callbacks.save.folder={weights}",
        env={"PYTHONPATH": tests_dir},
        timeout=240,
    )
    assert "world size 1 on world size 2" in " ".join((proc.stdout + proc.stderr).split())

    for step in (4, 5):  # after the skipped step 3 and after a normal step 4: the ranks agree
        w0, w1 = (torch.load(weights / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
    start = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)["current_model_state"]
    w4, w5 = (torch.load(weights / f"rank0-step{s}.pt", weights_only=True) for s in (4, 5))
    assert all(torch.equal(start[f"model.{k}"], w4[k]) for k in w4)  # rank 0 skipped step 3, its loss finite
    assert not all(torch.equal(w4[k], w5[k]) for k in w4)  # and stepped again at step 4
    with open(tmp_path / "two" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    skips = {int(r["step"]): float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert skips == {3: 1.0, 4: 1.0}
    last = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5 and last["provenance"]["world_size"] == 2
    # 3 steps x 4 clips on one device, then 2 steps x 4 clips x 2 devices
    assert last["callbacks"]["ComputeBudget"]["flops"] == pytest.approx((3 * 4 + 2 * 8) * 1e6)
