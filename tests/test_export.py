"""Export from a real stale-train checkpoint: acceptance (train -> stale-export onnx=true -> stale-sample), parity
of checkpoint, export, onnxruntime and torch.export, identical samples, and weights_only loading.

One smoke training run is shared by the whole module. EMA decay 0.5 (instead of 0.995) makes the EMA weights
move within the 6 smoke steps, so that the parity checks compare velocities of a real size, not ~0.
"""

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from helpers import run_cli
from stale.checkpoint.registry import ALLOWED_TARGETS
from stale.data.media import save_videos
from stale.data.video_io import decode_mp4
from stale.export import export_checkpoint
from stale.pipeline import StalePipeline
from stale.pipeline.sample_to_dir import sample_to_dir
from stale.train import build_system

# One thread per process, here and in the commands: the shapes are tiny, and on a shared 2-core machine two
# threads per process made a forward pass of this model 3-40x slower than one (measured; barrier waits).
# Same thread count on both sides also keeps the command's samples bit-identical to the in-process ones.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    run_cli(
        "stale-train", "debug=smoke", "logger=csv", "callbacks.ema.decay=0.5", f"hydra.run.dir={run}", env=ONE_THREAD
    )
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    proc = run_cli("stale-export", f"ckpt={trained}", f"out={out}", "onnx=true", "torch_export=true", env=ONE_THREAD)
    return out, proc


@pytest.fixture(scope="module")
def lightning_side(trained):
    """The reference: the checkpoint as the training code sees it. torch.load(weights_only=True) directly,
    StaleSystem rebuilt by stale.train.build_system from the run's own config, EMA state_dict loaded."""
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    system = build_system(OmegaConf.create(ckpt["hyper_parameters"]["run_config"]))
    system.load_state_dict(ckpt["state_dict"])
    return ckpt, system.eval()


def training_provenance(ckpt: dict) -> dict:
    """Where stale-train puts provenance: a top-level entry, or (checkpoint format 1) inside run_config."""
    return ckpt.get("provenance") or ckpt["hyper_parameters"]["run_config"]["provenance"]


def test_stale_train_checkpoints_load_with_weights_only(trained):
    paths = sorted(trained.parent.glob("*.ckpt"))
    assert trained in paths and len(paths) >= 2  # last.ckpt and the periodic ones (every 3 steps)
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"state_dict", "current_model_state", "hyper_parameters"} <= set(ckpt), path
        assert {"commit", "dirty"} <= training_provenance(ckpt)["git"].keys()


def test_acceptance_train_export_sample(trained, exported, tmp_path):
    out, export_proc = exported
    for name in ("model.safetensors", "config.json", "provenance.json", "denoiser.onnx", "denoiser.pt2"):
        assert (out / name).is_file(), name
    assert "onnx_max_abs_diff" in export_proc.stdout

    samples = tmp_path / "samples"
    proc = run_cli(
        "stale-sample", f"model={out}", f"out={samples}", "num_videos=3", "steps=4", "seed=7", env=ONE_THREAD
    )
    assert "4/4" in proc.stderr  # the progress bar reached the last step
    mp4s = sorted(samples.glob("sample_*.mp4"))
    assert len(mp4s) == 3
    for p in mp4s:
        assert decode_mp4(p.read_bytes(), name=str(p)).shape == (8, 16, 16, 3)  # (T, H, W, C)
    gif = Image.open(samples / "grid.gif")
    assert gif.n_frames == 8
    record = json.loads((samples / "samples.json").read_text())
    assert record["labels"] == [0, 1, 2] and record["steps"] == 4 and record["seed"] == 7

    # The command wrote exactly what the pipeline returns for this seed (the PNG is lossless).
    videos = StalePipeline.from_pretrained(out)(num_videos=3, steps=4, seed=7)
    save_videos(videos, tmp_path / "again")
    sheet = np.asarray(Image.open(samples / "contact_sheet.png"))
    assert np.array_equal(sheet, np.asarray(Image.open(tmp_path / "again" / "contact_sheet.png")))
    assert sheet.std() > 10  # real pictures, not a blank sheet


def test_export_contents(trained, exported, lightning_side):
    out, _ = exported
    ckpt, _ = lightning_side
    run = ckpt["hyper_parameters"]["run_config"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["_target_"] in ALLOWED_TARGETS and config["diffusion"]["_target_"] in ALLOWED_TARGETS
    for key in ("name", "frames", "size", "num_classes", "patch", "pattern"):
        assert config["model"][key] == run["model"][key], key
    assert config["diffusion"]["prior"] == run["diffusion"]["prior"]
    assert config["weights"] == "ema" and config["files"]["onnx"] == "denoiser.onnx"

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["training"] == training_provenance(ckpt)
    assert prov["checkpoint"]["sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    assert prov["checkpoint"]["global_step"] == 6
    assert prov["run_config"]["model"] == run["model"] and "packages" in prov["export"]

    weights = load_file(out / "model.safetensors")
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert set(weights) == {k.removeprefix("model.") for k in ema}
    assert all(torch.equal(weights[k], ema["model." + k]) for k in weights)  # EMA by default
    assert not all(torch.equal(weights[k], raw["model." + k]) for k in weights)


def test_raw_weights_export(trained, lightning_side, tmp_path):
    ckpt, _ = lightning_side
    export_checkpoint(trained, tmp_path, weights="raw")
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(v, ckpt["current_model_state"]["model." + k]) for k, v in weights.items())
    assert json.loads((tmp_path / "config.json").read_text())["weights"] == "raw"


def test_parity_checkpoint_export_onnxruntime_torch_export(exported, lightning_side):
    out, _ = exported
    _, system = lightning_side
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 16, 16, generator=g) * 2 - 1  # batch 3: not the traced batch (2)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([0, 4, 2])  # 4 = the null label
    with torch.no_grad():
        ref = system(x, t, y)[0]
        export = StalePipeline.from_pretrained(out).model(x, t, y)[0]
        program = torch.export.load(str(out / "denoiser.pt2")).module()(x, t, y)  # our own file: trusted
    session = ort.InferenceSession(str(out / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    (onnx,) = session.run(["velocity"], {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})

    assert ref.abs().max() > 0.05  # a trained velocity, so a 1e-4 tolerance means something
    diffs = {
        "export": (export - ref).abs().max().item(),
        "onnxruntime": np.abs(onnx - ref.numpy()).max(),
        "torch.export": (program - ref).abs().max().item(),
    }
    print("max abs diff vs checkpoint (fp32):", diffs, "max |v| =", ref.abs().max().item())
    assert all(d <= 1e-4 for d in diffs.values()), diffs


def test_samples_identical_from_checkpoint_and_export(trained, exported, lightning_side):
    out, _ = exported
    _, system = lightning_side
    from_export, from_ckpt = StalePipeline.from_pretrained(out), StalePipeline.from_checkpoint(trained)
    labels = torch.tensor([3, 0, 1])
    a = system.sample(labels, steps=3, sampler="euler", guidance=1.0, seed=11)  # what stale-train does
    b = from_export(num_videos=3, label=labels, steps=3, sampler="euler", guidance=1.0, seed=11)
    c = from_ckpt(num_videos=3, label=labels, steps=3, sampler="euler", guidance=1.0, seed=11)
    assert torch.equal(a, b) and torch.equal(b, c)
    # the default guidance (3) and classifier guidance: the system and both pipelines, bit for bit
    for settings in ({"guidance": 3.0}, {"guidance": 3.0, "classifier_guidance": 2.0}):
        a = system.sample(labels, steps=3, sampler="euler", seed=11, **settings)
        assert torch.equal(a, from_export(num_videos=3, label=labels, steps=3, sampler="euler", seed=11, **settings))
        assert torch.equal(a, from_ckpt(num_videos=3, label=labels, steps=3, sampler="euler", seed=11, **settings))
    assert not torch.equal(b, from_export(num_videos=3, label=labels, steps=3, guidance=1.0, seed=12))


@pytest.mark.parametrize(
    "settings", [["guidance=3"], ["guidance=3", "classifier_guidance=2"]], ids=["cfg3", "cfg3+classifier2"]
)
def test_stale_sample_cli_writes_the_same_videos_from_checkpoint_and_export(trained, exported, tmp_path, settings):
    """`stale-sample ckpt=last.ckpt` and `stale-sample model=EXPORT_DIR` agree."""
    out, _ = exported
    frames = {}
    for name, source in (("ckpt", f"ckpt={trained}"), ("model", f"model={out}")):
        run_cli(
            "stale-sample",
            source,
            f"out={tmp_path / name}",
            "num_videos=2",
            "steps=2",
            "seed=3",
            "device=cpu",
            "progress=false",
            *settings,
            env=ONE_THREAD,
        )
        record = json.loads((tmp_path / name / "samples.json").read_text())
        assert record["guidance"] == 3.0 and record["classifier_guidance"] == (2.0 if len(settings) == 2 else 0.0)
        frames[name] = [decode_mp4(p.read_bytes()) for p in sorted((tmp_path / name).glob("sample_*.mp4"))]
    assert len(frames["ckpt"]) == 2
    for a, b in zip(frames["ckpt"], frames["model"]):
        assert np.array_equal(a, b)
    unguided = StalePipeline.from_pretrained(out)(num_videos=2, steps=2, seed=3, guidance=1.0)
    assert not np.array_equal(frames["model"][0], unguided[0].permute(1, 2, 3, 0).numpy())


def test_sample_from_checkpoint(trained, exported, tmp_path):
    """stale-sample ckpt=PATH goes through sample_to_dir(ckpt=...): same videos as from the export."""
    out, _ = exported
    paths = sample_to_dir(tmp_path / "a", ckpt=trained, num_videos=2, steps=2, seed=3, device="cpu", progress=False)
    sample_to_dir(tmp_path / "b", model=out, num_videos=2, steps=2, seed=3, device="cpu", progress=False)
    record = json.loads(paths["record"].read_text())
    assert record["source"] == {"model": None, "ckpt": str(trained), "weights": "ema"}
    sheets = [np.asarray(Image.open(tmp_path / d / "contact_sheet.png")) for d in ("a", "b")]
    assert np.array_equal(*sheets)
    with pytest.raises(ValueError, match="exactly one of model=EXPORT_DIR or ckpt=CHECKPOINT"):
        sample_to_dir(tmp_path / "c", model=out, ckpt=trained)
