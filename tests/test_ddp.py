"""Multi-process training on CPU (gloo) through Lightning, torchrun and Hydra multirun.

Run as a script (`python tests/test_ddp.py BATCH DEVICES OUT`) this file is the DDP worker of
test_ddp_step_matches_one_process: Lightning's launcher starts the second rank by running it again.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/helpers.py when this file runs as the DDP worker

from helpers import LITE_RUN, compose_train, run_cli  # noqa: E402

# --------------------------------------------------------------------------------------------------------
# One global batch, one process or two: the same loss at every step and the same weights at the end.


def _fixed_batch(folder: Path, path: Path, n: int = 4) -> None:
    """n real clips with their labels, plus a fixed prior sample z and time t for each clip."""
    from stale.data.video_io import decode_mp4
    from stale.diffusion import flow

    videos, labels = [], []
    with tarfile.open(sorted(folder.glob("val-*.tar"))[0]) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.endswith(".mp4") and len(videos) < n:
                video = decode_mp4(tar.extractfile(member).read())  # (T, H, W, 3)
                meta = json.loads(tar.extractfile(member.name[:-4] + ".json").read())
                videos.append(torch.from_numpy(video).permute(3, 0, 1, 2))  # (C, T, H, W)
                labels.append(meta["label"])
    video = torch.stack(videos)  # (B, C, T, H, W) uint8
    g = torch.Generator().manual_seed(7)
    z = flow.sample_prior(video.shape, "uniform", generator=g)
    t = torch.linspace(0.2, 0.8, n)
    torch.save({"video": video, "label": torch.tensor(labels), "z": z, "t": t}, path)


def _fit_fixed_batch(batch_path: Path, devices: int, out: Path) -> None:
    """Three optimizer steps on one fixed global batch, split over `devices` processes by Lightning.

    The noise is part of the data (z, t per clip), so the loss is a function of the clips a rank holds:
    the global loss is the mean of the ranks' losses, and DDP's averaged gradient is the one-process one.
    """
    import lightning as L
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, TensorDataset

    from stale.diffusion import flow
    from stale.diffusion.hinge import hinge_loss
    from stale.system.stale_system import StaleSystem

    class FixedNoiseSystem(StaleSystem):
        records: list = []

        def training_step(self, batch, batch_idx):
            video, label, z, t, index = batch
            x = flow.to_unit_range(video)
            v, scores = self.model(flow.interpolate(z, x, t), t, label)
            loss = (v.float() - flow.velocity_target(z, x)).pow(2).mean() + 0.1 * hinge_loss(scores.float(), label)
            losses, indices = self.all_gather(loss.detach()), self.all_gather(index)  # every rank's
            self.records.append({"loss": losses.mean().item(), "indices": indices.reshape(devices, -1).tolist()})
            return loss

    cfg = compose_train(
        f"trainer={'ddp_cpu' if devices > 1 else 'cpu'}",
        f"trainer.devices={devices}",
        "schedule=constant",
        "schedule.warmup=0",
        "optim.lr=1e-3",
        f"paths.output_dir={out}",
    )  # the tolerance below
    L.seed_everything(0)
    system = FixedNoiseSystem(
        instantiate(cfg.model, _convert_="all"),
        instantiate(cfg.diffusion),
        optimizer=instantiate(cfg.optim, _convert_="all"),
        schedule=instantiate(cfg.schedule),
    )
    b = torch.load(batch_path)
    data = TensorDataset(b["video"], b["label"], b["z"], b["t"], torch.arange(len(b["label"])))
    loader = DataLoader(data, batch_size=len(data) // devices, shuffle=False)  # Lightning adds the rank split
    trainer = instantiate(
        cfg.trainer,
        max_steps=3,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(system, train_dataloaders=loader)
    if trainer.is_global_zero:
        torch.save({"records": system.records, "params": system.model.state_dict()}, out / f"result{devices}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(400)
def test_ddp_step_matches_one_process(tiny_shards, tmp_path):
    """2 gloo processes x 2 clips == 1 process x 4 clips: first-step loss, the next steps, final weights."""
    batch = tmp_path / "batch.pt"
    _fixed_batch(tiny_shards["folder"], batch)
    _fit_fixed_batch(batch, 1, tmp_path)  # the reference, in this process
    proc = subprocess.run(
        [sys.executable, __file__, str(batch), "2", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = torch.load(tmp_path / "result1.pt"), torch.load(tmp_path / "result2.pt")

    assert [r["indices"] for r in one["records"]] == [[[0, 1, 2, 3]]] * 3
    halves = [sorted(map(sorted, r["indices"])) for r in two["records"]]  # each rank its own half, every step
    assert all(len(h) == 2 and len(h[0]) == 2 and sorted(h[0] + h[1]) == [0, 1, 2, 3] for h in halves)
    loss1, loss2 = [r["loss"] for r in one["records"]], [r["loss"] for r in two["records"]]
    assert loss2[0] == pytest.approx(loss1[0], rel=1e-6, abs=0)  # same weights, same clips and noise
    assert loss2 == pytest.approx(loss1, rel=1e-5, abs=0)  # steps 2, 3: DDP's averaged gradient is the same
    assert abs(loss1[2] - loss1[0]) > 1e-3  # and the steps did change the weights
    # AdamW moves a weight by up to lr = 1e-3 a step whatever its gradient's size, so float noise in the tiny
    # gradients of the zero-initialised adaLN layers shows as ~5e-6 (one weight in 32768 reached 5.4e-5 after
    # the model's joy-token change); a gradient that is not averaged over the ranks would show as ~1e-3.
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=0, atol=2e-4)


# --------------------------------------------------------------------------------------------------------
# The commands of docs/scaling.md.


def _assert_one_run(run_dir: Path, logs: set[str]) -> None:
    """Everything of a 2-process run in one dir: rank-zero outputs once, one log per process."""
    assert {p.name for p in run_dir.glob("*.log")} == logs
    assert len(list((run_dir / "samples").glob("*.mp4"))) == 1  # sample.num_videos=1, written once
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert max(int(r["step"]) for r in rows) == 1  # 2 steps (0, 1), logged once, by rank zero
    assert sum(1 for r in rows if r.get("val/loss")) == 1


@pytest.mark.ddp
@pytest.mark.timeout(400)
def test_multirun_of_ddp_trials(tiny_shards, tmp_path):
    """`stale-train -m trainer=ddp_cpu optim.lr=a,b`: Lightning starts rank 1 of each trial in that trial's dir,
    the second trial starts clean, and the sweep ends with its summary."""
    sweep = tmp_path / "sweep"
    run_cli(
        "stale-train",
        "-m",
        "trainer=ddp_cpu",
        "optim.lr=1e-3,2e-3",
        *LITE_RUN,
        *tiny_shards["overrides"],
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=380,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no stray outputs/ or multirun/ dirs
    for trial, lr in (("0", "optim.lr=0.001"), ("1", "optim.lr=0.002")):
        _assert_one_run(sweep / trial, {"train.log", "train_rank1.log"})
        assert (sweep / trial / ".hydra" / "config.yaml").is_file()
        # rank 1 was started as a plain run of this trial: its overrides, its dir, no `-m`
        child = next(
            line for line in (sweep / trial / "train.log").read_text().splitlines() if "starting rank 1:" in line
        )
        assert lr in child and "hydra.mode=RUN" in child and f"{sweep / trial}'" in child and " -m " not in child
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (sweep / trial / "train_rank1.log").read_text()
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1"] and all(r["status"] == "COMPLETED" for r in rows)
    assert ["optim.lr=0.001" in r["overrides"] for r in rows] == [True, False]
    losses = [float(r["val/loss"]) for r in rows]
    best = yaml.safe_load((sweep / "best_trial.yaml").read_text())
    assert best["value"] == pytest.approx(min(losses)) and best["trial"] == losses.index(min(losses))
    assert best["output_dir"] == str(sweep / str(best["trial"]))


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_script(tiny_shards, tmp_path):
    """scripts/torchrun.sh: torchrun starts both ranks; they share RUN_DIR and log to one file each."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run_dir), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "torchrun.sh"), "2", "trainer=ddp_cpu", *LITE_RUN, *tiny_shards["overrides"]],
        capture_output=True,
        text=True,
        timeout=380,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    _assert_one_run(run_dir, {"train_rank0.log", "train_rank1.log"})
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_rank1.log").read_text()


# --------------------------------------------------------------------------------------------------------
# The GPU configs, composed and instantiated (trainer=fsdp runs as trainer=fsdp_cpu here: tests/test_fsdp2.py).


@pytest.mark.parametrize("name", ["ddp", "fsdp", "ddp_cpu", "fsdp_cpu"])
def test_distributed_trainer_configs(name):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    from stale.parallel.strategies import HydraDDPStrategy, HydraFSDP2Strategy

    cfg = compose_train(f"trainer={name}", "trainer.num_nodes=4")
    assert cfg.trainer.num_nodes == 4 and "devices" in cfg.trainer
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy.process_group_backend == ("gloo" if name.endswith("_cpu") else None)
    if name.startswith("fsdp"):  # FSDP2: one full checkpoint file (stale-export reads it), bf16 on GPUs
        assert isinstance(strategy, HydraFSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
        assert cfg.trainer.strategy.save_distributed_checkpoint is False
        assert cfg.trainer.precision == ("bf16-mixed" if name == "fsdp" else 32)
    else:
        assert isinstance(strategy, HydraDDPStrategy)


if __name__ == "__main__":  # the DDP worker (both ranks)
    _fit_fixed_batch(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
