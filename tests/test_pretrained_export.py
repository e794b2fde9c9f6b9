"""Back to the ecosystem: a pretrained backbone's export (stale/export/backbone.py) is read by diffusers and by stale.
A full fine-tune's transformer/ loads with WanTransformer3DModel.from_pretrained and the export folder runs as a
WanPipeline; a LoRA's pytorch_lora_weights.safetensors loads with pipe.load_lora_weights and changes its latents;
StalePipeline rebuilds the whole backbone (joy token, hinge head, prior) from either folder alone. Tiny random-init
Wan pipeline, trained for 4 steps by stale-train's own code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import LTX_RUN, WAN_RUN, compose_train, tiny_pipeline
from stale.checkpoint import read_checkpoint
from stale.checkpoint.export_reader import ExportError
from stale.export import export_checkpoint
from stale.models.finetune import merged
from stale.pipeline import StalePipeline
from stale.pipeline.sample_to_dir import sample_to_dir
from stale.train import train


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory, "wan")


def trained(root, wan, *overrides):
    cfg = compose_train(*WAN_RUN, f"pipeline={wan}", f"paths.output_dir={root}", *overrides)
    train(cfg)
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def full_ckpt(wan, tmp_path_factory):
    return trained(tmp_path_factory.mktemp("full"), wan, "finetune=full", "diffusion.prior=uniform")


@pytest.fixture(scope="module")
def lora_ckpt(wan, tmp_path_factory):
    # alpha != rank: the update's scale alpha / rank must survive diffusers' format
    args = ("finetune=lora", "finetune.rank=2", "finetune.alpha=4.0", "diffusion.prior=gaussian")
    return trained(tmp_path_factory.mktemp("lora"), wan, *args)


def inputs(seed=0):
    """A latent clip (B, 4, 3, 2, 2), times, and caption embeddings (B, 8, 16) with a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 8, 16, generator=g)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    return x, torch.tensor([0.3, 0.8]), torch.zeros(2, dtype=torch.long), text, mask


@torch.no_grad()
def velocity(model, seed=0):
    return model.eval()(*inputs(seed))[0]


@torch.no_grad()
def diffusers_velocity(transformer, seed=0):
    """The diffusers module's own forward on the same inputs, as stale's velocity (Wan predicts noise - data)."""
    x, t, _, text, mask = inputs(seed)
    text = text * mask[..., None]  # Wan's pipeline: zero caption rows past each prompt's length
    return -transformer.eval()(hidden_states=x, timestep=(1 - t) * 1000, encoder_hidden_states=text)[0]


def latents(pipe, side: int = 16):
    """Two Euler steps of the diffusers pipeline from a fixed seed, left in latent space (LTXPipeline takes sides of
    32k pixels)."""
    return pipe(
        prompt="a red square moving left",
        height=side,
        width=side,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        max_sequence_length=8,
    ).frames


def test_full_fine_tune_exports_a_transformer_and_a_pipeline_that_diffusers_and_stale_load(wan, full_ckpt, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    model = read_checkpoint(full_ckpt).build_model()  # the fine-tuned backbone, EMA weights, in memory
    export_checkpoint(full_ckpt, tmp_path / "export")
    out = tmp_path / "moved"
    shutil.move(tmp_path / "export", out)  # the export stands alone: nothing points back to where it was written
    config = json.loads((out / "config.json").read_text())
    assert (config["model"]["pretrained"], config["model"]["subfolder"]) == ("transformer", None)
    stale_parts = {"joy_token"} | {f"head.{k}" for k in model.head.state_dict()}
    assert set(load_file(str(out / "model.safetensors"))) == stale_parts  # the transformer lives in transformer/

    # diffusers: the transformer folder holds exactly the fine-tuned weights, which moved away from the base
    loaded = WanTransformer3DModel.from_pretrained(str(out / "transformer"))
    ours, base = model.transformer.state_dict(), load_file(str(wan / "transformer/diffusion_pytorch_model.safetensors"))
    assert loaded.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())
    assert sum(not torch.equal(base[k], ours[k]) for k in base) > len(base) // 2
    # the uniform prior is written where a diffusers user looks, and diffusers still loads the config
    assert json.loads((out / "transformer/config.json").read_text())["stale_prior"] == "uniform"
    assert "wrong prior" in (out / "README.md").read_text()
    # the export folder is a WanPipeline folder: its transformer is the fine-tuned one, and it runs
    pipe = WanPipeline.from_pretrained(str(out))
    assert all(torch.equal(v, ours[k]) for k, v in pipe.transformer.state_dict().items())
    assert torch.isfinite(latents(pipe)).all()

    # stale: the whole backbone (joy token, hinge head, uniform prior) from the moved folder, bit for bit
    stale = StalePipeline.from_pretrained(out)
    assert stale.prior == "uniform"
    assert torch.equal(velocity(stale.model), velocity(model))
    assert torch.equal(stale.model.head.linear.weight, model.head.linear.weight)


def test_the_export_samples_on_the_pipelines_grid(wan, full_ckpt, tmp_path):
    """backbone=wan read the pipeline's scheduler/ once: the checkpoint and the export hold its grid, StalePipeline and
    stale-sample follow it by default, and a scheduler= override changes the videos."""
    on_disk = json.loads((wan / "scheduler" / "scheduler_config.json").read_text())
    assert read_checkpoint(full_ckpt).run_config["sample"]["scheduler"]["shift"] == on_disk["shift"] == 3.0
    export_checkpoint(full_ckpt, tmp_path / "export")
    pipe = StalePipeline.from_pretrained(tmp_path / "export")
    assert pipe.defaults["scheduler"]["shift"] == on_disk["shift"]
    args = dict(num_videos=1, steps=3, seed=0, prompt="a red square moving left")
    default = pipe(**args)
    assert torch.equal(default, pipe(**args, scheduler={"pretrained": str(wan), "subfolder": "scheduler"}))
    assert not torch.equal(default, pipe(**args, scheduler={"shift": 1.0}))
    paths = sample_to_dir(tmp_path / "videos", model=tmp_path / "export", progress=False, **args)
    assert json.loads(paths["record"].read_text())["scheduler"]["shift"] == on_disk["shift"]


def test_lora_exports_diffusers_lora_weights_that_load_lora_weights_loads(wan, lora_ckpt, tmp_path):
    from diffusers import WanPipeline

    model = read_checkpoint(lora_ckpt).build_model()  # the base with its trained adapter, in memory
    out = tmp_path / "lora"
    export_checkpoint(lora_ckpt, out, merge=False)
    assert not (out / "transformer").exists() and not (out / "model_index.json").exists()
    keys = set(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert (
        "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys
        and "transformer.blocks.1.ffn.net.2.lora_B.weight" in keys
    )
    assert all(k.startswith("transformer.blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    # diffusers: the base pipeline's latents change once the LoRA is loaded ...
    pipe = WanPipeline.from_pretrained(str(wan))
    before = latents(pipe)
    pipe.load_lora_weights(str(out))
    assert not torch.allclose(latents(pipe), before, atol=1e-4)
    # ... and its transformer computes the adapted model's velocity (stale's joy token off: diffusers has none)
    model.config.joy = False
    assert torch.equal(diffusers_velocity(pipe.transformer), velocity(model))
    model.config.joy = True

    # stale: base (checked by hash) + LoRA + stale's parts from the export, bit for bit
    stale = StalePipeline.from_pretrained(out)
    assert stale.prior == "gaussian"
    assert torch.equal(velocity(stale.model), velocity(model))
    sample_to_dir(tmp_path / "s", model=out, prompt="a red square", num_videos=1, steps=2, device="cpu", progress=False)
    assert (tmp_path / "s" / "sample_000.mp4").stat().st_size > 0
    stale.save_pretrained(tmp_path / "again", merge=False)  # a loaded LoRA writes the same adapter back
    assert torch.equal(velocity(StalePipeline.from_pretrained(tmp_path / "again").model), velocity(model))

    # a LoRA refuses a base whose weights are not the ones it trained on
    config = json.loads((out / "config.json").read_text())
    config["transformer"]["base"]["sha256"] = "0" * 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"LoRA's base model.pretrained=.*holds other weights"):
        StalePipeline.from_pretrained(out)


def test_lora_merged_exports_the_full_transformer(wan, lora_ckpt, tmp_path):
    from diffusers import WanTransformer3DModel

    model = read_checkpoint(lora_ckpt).build_model()
    out = tmp_path / "merged"
    export_checkpoint(lora_ckpt, out)  # merge=true, the default
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    plain = merged(model).transformer.state_dict()
    loaded = WanTransformer3DModel.from_pretrained(str(out / "transformer")).state_dict()
    assert loaded.keys() == plain.keys() and all(torch.equal(v, plain[k]) for k, v in loaded.items())
    assert "stale_prior" not in json.loads((out / "transformer/config.json").read_text())  # Gaussian: native
    assert (out / "model_index.json").is_file()
    # merging rounds W + (alpha / r) B A once, so the velocity agrees to float precision, not bit for bit
    torch.testing.assert_close(velocity(StalePipeline.from_pretrained(out).model), velocity(model))
    sample_to_dir(tmp_path / "s", model=out, prompt="a red square", num_videos=1, steps=2, device="cpu", progress=False)
    assert (tmp_path / "s" / "sample_000.mp4").stat().st_size > 0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ltx_exports_load_in_diffusers_and_in_stale(mode, tmp_path_factory, tmp_path):
    """LTX-Video too: a LoRA export loads with LTXPipeline.load_lora_weights and changes its latents, a full one with
    LTXVideoTransformer3DModel.from_pretrained holds the fine-tuned weights; StalePipeline rebuilds either bit for bit."""
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel

    ltx = tiny_pipeline(tmp_path_factory, "ltx")
    prior = {"lora": "gaussian", "full": "uniform"}[mode]
    cfg = compose_train(
        *LTX_RUN,
        f"pipeline={ltx}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"finetune={mode}",
        f"diffusion.prior={prior}",
    )
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model = read_checkpoint(ckpt).build_model()
    out = tmp_path / "export"
    export_checkpoint(ckpt, out, merge=False)
    if mode == "lora":
        keys = set(load_file(str(out / "pytorch_lora_weights.safetensors")))
        assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
        pipe = LTXPipeline.from_pretrained(str(ltx))
        before = latents(pipe, 32)
        pipe.load_lora_weights(str(out))
        assert not torch.allclose(latents(pipe, 32), before, atol=1e-4)
    else:
        loaded = LTXVideoTransformer3DModel.from_pretrained(str(out / "transformer")).state_dict()
        ours = model.transformer.state_dict()
        assert loaded.keys() == ours.keys() and all(torch.equal(v, ours[k]) for k, v in loaded.items())
        assert json.loads((out / "transformer/config.json").read_text())["stale_prior"] == "uniform"
        assert torch.isfinite(latents(LTXPipeline.from_pretrained(str(out)), 32)).all()
    stale = StalePipeline.from_pretrained(out)
    assert stale.prior == prior
    assert stale.defaults["scheduler"]["sigmas"] == "linear"  # LTXPipeline's grid
    assert torch.equal(velocity(stale.model), velocity(model))
