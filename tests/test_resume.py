"""Exact resume: N steps straight and k steps + resume to N give equal per-step losses on CPU in deterministic mode.

What this covers: weights, EMA ("stale") weights, AdamW state, lr schedule, step counters, the per-step noise
(a function of seed, batch index and rank), NaN-guard and budget state, and the data position through
Lightning's loader-state protocol (a loader with state_dict/load_state_dict is saved under
loops.fit_loop.combined_loader). The data here is an in-memory, seed-deterministic stream of real synthetic
clips with num_workers=0; the WebDataset loader's own position is the data module's job (its loader must
implement the same protocol). Validation and sampling run in between and must not disturb training.
"""

import copy
import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader, TensorDataset

from stale.data.synthetic import SyntheticSpec, make_clip
from stale.train import train

TINY = ["debug=smoke", "model=debug", "data.frames=4", "data.size=8",
        "sample.num_videos=1", "sample.steps=1", "callbacks.samples.num_videos=1", "sample_every_n_steps=2",
        "budget.flops_per_clip=1e6", "trainer.deterministic=true", "callbacks.ema.decay=0.8", "logger=csv"]


def clips(n: int, seed: int):
    spec = SyntheticSpec(frames=4, size=8, num_classes=4)
    rng = np.random.default_rng(seed)
    labels = rng.integers(4, size=n)
    video = np.stack([make_clip(rng, spec, int(y)) for y in labels])  # (N, T, H, W, C)
    return torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous(), torch.from_numpy(labels)


class ClipStream:
    """An endless stream of batches; batch i depends only on (seed, i). Lightning saves `pos` in checkpoints.

    Sized (a nominal length), so that Lightning does not prefetch: the saved position is exactly the number
    of batches training consumed.
    """

    def __init__(self, video, labels, batch_size: int, seed: int):
        self.video, self.labels, self.batch_size, self.seed, self.pos = video, labels, batch_size, seed, 0

    def __len__(self):
        return 1_000_000

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.pos)
            idx = torch.randint(len(self.video), (self.batch_size,), generator=g)
            self.pos += 1
            yield self.video[idx], self.labels[idx]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class ForgetfulStream(ClipStream):
    """The negative control: a loader that loses its position on resume, as a plain DataLoader would."""

    def load_state_dict(self, state: dict) -> None:
        self.pos = 0


class StreamData(L.LightningDataModule):
    def __init__(self, stream_cls=ClipStream):
        super().__init__()
        self.stream_cls = stream_cls
        self.train_video, self.train_labels = clips(16, seed=1)
        self.val_video, self.val_labels = clips(4, seed=2)

    def train_dataloader(self):
        return self.stream_cls(self.train_video, self.train_labels, batch_size=4, seed=0)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.val_video, self.val_labels), batch_size=4)


def run(out: Path, *overrides: str, stream_cls=ClipStream, callbacks=()) -> dict[int, dict]:
    with initialize_config_module("stale.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.output_dir={out}", *overrides])
    train(cfg, datamodule=StreamData(stream_cls), callbacks=callbacks)
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    per_step: dict[int, dict] = {}
    for r in rows:  # one row per logging call: merge them per step
        per_step.setdefault(int(r["step"]), {}).update({k: v for k, v in r.items() if v not in ("", None)})
    return per_step


def nested_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


class StopAt(L.Callback):
    """Stops training after a given step, as a budget or a time limit would: last.ckpt is written there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_resume_is_exact(tmp_path, capsys):
    straight = run(tmp_path / "straight")  # 6 steps; checkpoints at 3 and 6, validation at 3 and 6
    # (1) from the periodic checkpoint written at step 3 (written in on_train_batch_end, mid-epoch)
    ckpt3 = tmp_path / "straight" / "checkpoints" / "step0000003.ckpt"
    resumed = run(tmp_path / "resumed", f"ckpt_path={ckpt3}")
    # (2) from last.ckpt of a run stopped after step 3 (written at the end of the endless epoch)
    run(tmp_path / "stopped", "sample_every_n_steps=0", callbacks=[StopAt(3)])
    stopped_ckpt = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(stopped_ckpt, weights_only=True)["global_step"] == 3
    from_last = run(tmp_path / "from-last", "sample_every_n_steps=0", f"ckpt_path={stopped_ckpt}")
    # the end-of-run report's "train/loss first -> last" starts at the run's first step, not at the resume
    report = capsys.readouterr().out.split("stale-train finished")[-1]
    first = f"{float(straight[0]['train/loss']):.4g} at step 0 -> {float(straight[5]['train/loss']):.4g} at step 5"
    assert first in report, report

    for other in (resumed, from_last):
        for step in (3, 4, 5):  # the CSV's step axis is global_step in every run
            for key in ("train/loss", "train/velocity", "train/hinge", "lr/decay", "train/grad_norm"):
                assert straight[step][key] == other[step][key], f"{key} differs at step {step}"
        assert straight[5]["val/loss"] == other[5]["val/loss"]  # validation (EMA weights) after step 6

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    for name in ("resumed", "from-last"):
        b = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert a["global_step"] == b["global_step"] == 6
        assert nested_equal(a["state_dict"], b["state_dict"])  # EMA weights
        assert nested_equal(a["current_model_state"], b["current_model_state"])  # live weights
        assert nested_equal(a["averaging_state"], b["averaging_state"])
        assert nested_equal(a["optimizer_states"], b["optimizer_states"])
        assert nested_equal(a["lr_schedulers"], b["lr_schedulers"])
        loader = [c["loops"]["fit_loop"]["state_dict"]["combined_loader"] for c in (a, b)]
        assert loader[0] == loader[1] == [{"pos": 6}]  # the data position
        assert a["callbacks"]["ComputeBudget"]["flops"] == b["callbacks"]["ComputeBudget"]["flops"] == 6 * 4e6
        assert a["callbacks"]["NaNGuard"] == b["callbacks"]["NaNGuard"]
    assert not nested_equal(a["state_dict"], a["current_model_state"])  # the EMA really differs from live


def test_resume_on_other_world_size_warns_and_lost_data_position_shows(tmp_path):
    """A checkpoint from a 2-device run resumed on 1 device warns about what cannot match. With a loader
    that forgets its position (the control for the test above) the losses after the resume differ."""
    straight = run(tmp_path / "straight", "trainer.max_steps=4", "sample_every_n_steps=0")
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "step0000003.ckpt", weights_only=True)
    ckpt = copy.deepcopy(ckpt)
    ckpt["provenance"]["world_size"] = 2
    moved = tmp_path / "two-devices.ckpt"
    torch.save(ckpt, moved)
    with pytest.warns(UserWarning, match=r"world size 2 on world size 1.*global batch") as record:
        resumed = run(tmp_path / "resumed", "trainer.max_steps=4", "sample_every_n_steps=0", f"ckpt_path={moved}",
                      stream_cls=ForgetfulStream)
    assert any("only rank 0's data-loader position" in str(w.message) for w in record)
    assert resumed[3]["train/loss"] != straight[3]["train/loss"]  # the batch of step 3 was not restored
    assert resumed[3]["lr/decay"] == straight[3]["lr/decay"]  # the schedule was
