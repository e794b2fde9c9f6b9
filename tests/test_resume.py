"""Exact resume: N steps straight and k steps + resume to N give equal per-step losses on CPU in deterministic mode.

What this covers: weights, EMA ("stale") weights, AdamW state, lr schedule, step counters, the per-step noise
(a function of seed, batch index and rank), NaN-guard and budget state, and the data position through
Lightning's loader-state protocol (a loader with state_dict/load_state_dict is saved under
loops.fit_loop.combined_loader). The data here is an in-memory, seed-deterministic stream of real synthetic
clips with num_workers=0; the WebDataset loader's own position is the data module's job (its loader must
implement the same protocol). Validation and sampling run in between and must not disturb training.
"""

import copy

import pytest
import torch

from helpers import ClipStream, StopAt, nested_equal, train_on_stream


class ForgetfulStream(ClipStream):
    """The negative control: a loader that loses its position on resume, as a plain DataLoader would."""

    def load_state_dict(self, state: dict) -> None:
        self.pos = 0


def test_resume_is_exact(tmp_path, capsys):
    straight = train_on_stream(tmp_path / "straight")  # 6 steps; checkpoints at 3 and 6, validation at 3 and 6
    # (1) from the periodic checkpoint written at step 3 (written in on_train_batch_end, mid-epoch)
    ckpt3 = tmp_path / "straight" / "checkpoints" / "step0000003.ckpt"
    resumed = train_on_stream(tmp_path / "resumed", f"ckpt_path={ckpt3}")
    # (2) from last.ckpt of a run stopped after step 3 (written at the end of the endless epoch)
    train_on_stream(tmp_path / "stopped", "sample_every_n_steps=0", callbacks=[StopAt(3)])
    stopped_ckpt = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(stopped_ckpt, weights_only=True)["global_step"] == 3
    from_last = train_on_stream(tmp_path / "from-last", "sample_every_n_steps=0", f"ckpt_path={stopped_ckpt}")
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
    straight = train_on_stream(tmp_path / "straight", "trainer.max_steps=4", "sample_every_n_steps=0")
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "step0000003.ckpt", weights_only=True)
    ckpt = copy.deepcopy(ckpt)
    ckpt["provenance"]["world_size"] = 2
    moved = tmp_path / "two-devices.ckpt"
    torch.save(ckpt, moved)
    with pytest.warns(UserWarning, match=r"world size 2 on world size 1.*global batch") as record:
        resumed = train_on_stream(
            tmp_path / "resumed",
            "trainer.max_steps=4",
            "sample_every_n_steps=0",
            f"ckpt_path={moved}",
            stream_cls=ForgetfulStream,
        )
    assert any("only rank 0's data-loader position" in str(w.message) for w in record)
    assert resumed[3]["train/loss"] != straight[3]["train/loss"]  # the batch of step 3 was not restored
    assert resumed[3]["lr/decay"] == straight[3]["lr/decay"]  # the schedule was
