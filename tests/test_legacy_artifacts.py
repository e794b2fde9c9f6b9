"""A checkpoint and an export written by stale before "The house in order" (commit 02ef3fd, the debug model;
tests/fixtures/legacy/make_legacy.py says how) still load, resume and sample bit-identically with today's code.
A change to model building, checkpoint reading or export that breaks old files fails here."""

from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file

from stale.train import train

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
# make_legacy.py's run in today's spelling
OVERRIDES = [
    "debug=smoke",
    "model=debug",
    "data.frames=4",
    "data.size=8",
    "sample.num_videos=1",
    "sample.steps=1",
    "callbacks.samples.num_videos=1",
    "sample_every_n_steps=0",
    "trainer.deterministic=true",
    "callbacks.ema.decay=0.8",
    "logger=none",
    "threads=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def expected() -> dict[str, torch.Tensor]:
    return load_file(str(LEGACY / "expected.safetensors"))


def pipelines():
    from stale.pipeline import StalePipeline

    return StalePipeline.from_checkpoint(LEGACY / "step4.ckpt"), StalePipeline.from_pretrained(LEGACY / "export")


def test_legacy_checkpoint_and_export_build_the_same_model():
    want = expected()
    from_ckpt, from_export = pipelines()
    for pipe in (from_ckpt, from_export):
        with torch.no_grad():
            out = pipe.model(want["input"], want["t"], want["label"])
        assert torch.equal(out[0] if isinstance(out, tuple) else out, want["velocity"])


def test_legacy_checkpoint_and_export_sample_bit_identically():
    want = expected()
    from_ckpt, from_export = pipelines()
    assert torch.equal(from_ckpt(num_videos=2, steps=3, seed=0, guidance=2.0), want["samples_ckpt"])
    assert torch.equal(from_export(num_videos=2, steps=3, seed=0, guidance=2.0), want["samples_export"])


class Losses(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def test_legacy_checkpoint_resumes_to_the_same_losses(compose_train, tmp_path):
    losses = Losses()
    train(
        compose_train(
            *OVERRIDES, f"paths.output_dir={tmp_path}", "trainer.max_steps=6", f"ckpt_path={LEGACY / 'step4.ckpt'}"
        ),
        callbacks=[losses],
    )
    assert losses.losses == dict(zip((4, 5), expected()["resume_losses"].tolist()))
