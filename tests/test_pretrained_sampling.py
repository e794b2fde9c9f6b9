"""Sampling a pretrained backbone through stale's one path equals the family's diffusers pipeline.

With the Gaussian prior and Euler steps on the family's grid (samplers.scheduler_times of the pipeline's
FlowMatchEulerDiscreteScheduler), stale.diffusion.generate from the same initial noise gives the latents that
WanPipeline and LTXPipeline give with output_type="latent", with and without classifier-free guidance against a
negative prompt. First, the grid itself against diffusers' schedulers.

Tolerance: atol = rtol = 1e-5 on latents of magnitude ~4 (float32 ulp there: 5e-7). The two paths differ only in
float rounding: stale passes t = 1 - sigma and the adapter takes sigma = 1 - t back; stale's Euler step is
t' - t where the scheduler's is sigma' - sigma; stale batches the conditional and the negative branch in one
forward where WanPipeline runs two (LTXPipeline batches them in the other order). Measured after 4 steps: Wan
2.4e-7 (w = 1) and 9.5e-7 (w = 4), LTX 1.1e-6 and 1.3e-6. A wrong grid, sign, timestep scale or
guidance formula moves the latents by 1e-1 (the test checks that stale's own grid is that far off).
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import compose_train, tiny_pipeline
from stale.diffusion import flow
from stale.diffusion.generate import generate
from stale.diffusion.samplers import scheduler_times
from stale.models.pretrained import load_backbone
from stale.training.checks import ConfigError
from stale.training.resolve import check_config

TOL = dict(atol=1e-5, rtol=1e-5)
PROMPTS = ["a red square moving left", "blue"]
TEXT_LEN = 16  # caption tokens: the tiny encoder's captions are short, so the pipelines' 512 would only cost time


def diffusers_sigmas(config: dict, steps: int, tokens: int, linear: bool) -> torch.Tensor:
    """The sigmas the family's pipeline sets: diffusers' own scheduler, mu from diffusers' own calculate_shift."""
    import diffusers
    import numpy as np
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    config = dict(config)
    scheduler = getattr(diffusers, config.pop("_class_name", "FlowMatchEulerDiscreteScheduler"))(**config)
    kw = {}
    if config.get("use_dynamic_shifting"):
        c = scheduler.config
        kw["mu"] = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    if linear:  # as LTXPipeline passes them
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(steps, **kw)
    return scheduler.sigmas


UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
GRIDS = {
    "wan-480p": (dict(shift=3.0), False),
    "wan-720p": (dict(shift=5.0), False),
    "no-shift": (dict(), False),
    "ltx-dynamic": (dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024), True),
    "ltx-terminal": (
        dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, shift_terminal=0.1),
        True,
    ),
    "dynamic-linear-type": (dict(use_dynamic_shifting=True, time_shift_type="linear"), False),
    "fixed-linear-sigmas": (dict(shift=7.0), True),  # HunyuanVideoPipeline's: fixed flow_shift, linear sigmas
    # the Wan hub repositories' own scheduler (stale's Euler on its grid)
    "wan-hub-unipc": (dict(_class_name="UniPCMultistepScheduler", **UNIPC, flow_shift=3.0), False),
    "unipc-linear-sigmas": (dict(_class_name="UniPCMultistepScheduler", **UNIPC, flow_shift=5.0), True),
}


# one step cannot be stretched to a terminal sigma (diffusers: nan; stale: an error, below)
CASES = [(name, steps) for name in GRIDS for steps in (1, 7, 50) if steps > 1 or "shift_terminal" not in GRIDS[name][0]]


@pytest.mark.parametrize("name, steps", CASES)
def test_scheduler_times_are_the_schedulers_sigmas(name, steps):
    config, linear = GRIDS[name]
    tokens = 3 * 30 * 44  # an LTX-like latent clip: the dynamic shift depends on it
    ts = scheduler_times(steps, {**config, "sigmas": "linear" if linear else None}, tokens)
    assert ts.shape == (steps + 1,) and ts[0].item() == pytest.approx(0.0, abs=2e-6) and ts[-1].item() == 1.0
    assert bool((ts[1:] > ts[:-1]).all())  # stale's samplers take an increasing grid
    torch.testing.assert_close(1 - ts, diffusers_sigmas(config, steps, tokens, linear), atol=1e-6, rtol=0)


def test_scheduler_times_refuse_what_they_do_not_reproduce():
    with pytest.raises(ValueError, match="_class_name='UniPCMultistepScheduler' is not a flow-matching scheduler"):
        scheduler_times(4, {"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0}, 64)  # no flow sigmas
    with pytest.raises(ValueError, match="_class_name='DDIMScheduler' is not a flow-matching scheduler"):
        scheduler_times(4, {"_class_name": "DDIMScheduler"}, 64)
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min' is not supported; supported: flow_shift"):
        scheduler_times(4, {"_class_name": "UniPCMultistepScheduler", **UNIPC, "final_sigmas_type": "sigma_min"}, 64)
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported; supported: shift"):
        scheduler_times(4, {"use_karras_sigmas": True}, 64)
    with pytest.raises(ValueError, match=r"sample.scheduler.sigmas='even' is not one of \[None, 'linear'\]"):
        scheduler_times(4, {"sigmas": "even"}, 64)
    with pytest.raises(ValueError, match="steps=1 with sample.scheduler.shift_terminal=0.1: use steps >= 2"):
        scheduler_times(1, {"shift_terminal": 0.1}, 64)


# LTX-Video's own scheduler (its hub scheduler_config.json): the dynamic shift by token count, stretched to a terminal
LTX_SCHEDULER = dict(
    use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, shift_terminal=0.1
)


def wan_case(folder):
    """WanPipeline and stale's backbone from the same folder (joy off: the family's forward). Wan's pipeline zeroes
    the caption past its length and passes no mask; stale gets the encoder's raw rows and the mask, so the adapter
    must zero them the same way."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder))
    model = load_backbone(str(folder), joy=False)
    tok = pipe.tokenizer(
        PROMPTS + [""], padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        raw = pipe.text_encoder(tok.input_ids, tok.attention_mask).last_hidden_state  # (3, L, D), not zeroed
    emb, neg = pipe.encode_prompt(
        PROMPTS, negative_prompt=[""] * len(PROMPTS), max_sequence_length=TEXT_LEN, do_classifier_free_guidance=True
    )
    clip = dict(height=64, width=64, num_frames=9)  # latents (3, 8, 8): the tiny vae compresses 4x in time, 8x in space

    def run(latents, **kw):  # (B, C, T, H, W) -> (B, C, T, H, W)
        return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, latents=latents, **clip, **kw).frames

    captions = dict(text=(raw[:2], tok.attention_mask[:2]), negative=(raw[2:], tok.attention_mask[2:]))
    return run, model, captions, dict(pipe.scheduler.config), (3, 8, 8)


def ltx_case(folder):
    """LTXPipeline (with LTX-Video's dynamic-shift scheduler) and stale's backbone from the same folder. LTXPipeline
    takes and returns packed latents (its own _pack_latents / _unpack_latents) and passes linear sigmas; its RoPE
    scale follows the tiny vae (4x in time and space) at frame_rate 25, so the backbone gets the same."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    pipe = LTXPipeline.from_pretrained(str(folder))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER)
    ts, ss = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
    model = load_backbone(str(folder), joy=False, rope_scale=[ts / 25, ss, ss])
    emb, mask, neg, neg_mask = pipe.encode_prompt(
        PROMPTS, negative_prompt=[""] * len(PROMPTS), max_sequence_length=TEXT_LEN, do_classifier_free_guidance=True
    )
    grid = (3, 32 // ss, 32 // ss)  # latents of a 9-frame 32 x 32 clip
    clip = dict(height=32, width=32, num_frames=(grid[0] - 1) * ts + 1)

    def run(latents, **kw):
        packed = pipe(
            prompt_embeds=emb,
            prompt_attention_mask=mask,
            negative_prompt_embeds=neg,
            negative_prompt_attention_mask=neg_mask,
            latents=LTXPipeline._pack_latents(latents, 1, 1),  # (B, S, C)
            **clip,
            **kw,
        ).frames
        return LTXPipeline._unpack_latents(packed, *grid, 1, 1)  # (B, C, T, H, W)

    captions = dict(text=(emb, mask), negative=(neg[:1], neg_mask[:1]))
    return run, model, captions, {**dict(pipe.scheduler.config), "sigmas": "linear"}, grid


@pytest.fixture(scope="module", params=["wan", "ltx"])
def family(request, tmp_path_factory):
    folder = tiny_pipeline(tmp_path_factory, request.param)
    return {"wan": wan_case, "ltx": ltx_case}[request.param](folder)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_sampling_equals_the_familys_pipeline(family, guidance):
    run, model, captions, scheduler, (T, H, W) = family
    steps, seed, shape = 4, 3, (len(PROMPTS), model.config.in_channels, T, H, W)
    # generate draws its prior on the CPU from `seed`; the pipeline gets that same draw as its latents
    latents = flow.sample_prior(shape, "gaussian", generator=torch.Generator().manual_seed(seed))
    expected = run(latents.clone(), num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
    labels = torch.zeros(len(PROMPTS), dtype=torch.long)  # a text model's labels only count the videos
    common = dict(prior="gaussian", sampler="euler", steps=steps, guidance=guidance, seed=seed, frames=T, height=H)
    got = generate(model, labels, width=W, **common, **captions, scheduler=scheduler, output_type="latent")
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)
    # the grid matters: stale's even, unshifted grid lands far away, so the tolerance above can fail
    even = generate(model, labels, width=W, **common, **captions, output_type="latent")
    assert (even - expected).abs().max() > 1e3 * TOL["atol"]


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_backbone_runs_read_the_pipelines_scheduler_once(family, tmp_path_factory):
    """backbone=wan|ltx sample on their pipeline's grid: resolve reads scheduler/scheduler_config.json into the run's
    config (what the checkpoint and the export hold), LTX with LTXPipeline's linear sigmas."""
    folder = tiny_pipeline(tmp_path_factory, family)
    on_disk = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    # 9 frames, 32 pixels: a clip both families take (Wan: 1 + 4k, sides of 16k; LTX: 1 + 8k, sides of 32k)
    cfg = compose_train(
        f"backbone={family}", f"pipeline={folder}", "data.frames=9", "data.size=32", "data.style=captioned"
    )
    run = check_config(cfg).config.sample.scheduler
    assert run["_class_name"] == on_disk["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert run["shift"] == on_disk["shift"] and run["use_dynamic_shifting"] == on_disk["use_dynamic_shifting"]
    assert run.get("sigmas") == {"wan": None, "ltx": "linear"}[family]
    assert "pretrained" not in run  # the grid itself, not where it came from


def test_bad_schedulers_fail_before_training_naming_the_key(tmp_path_factory):
    folder = tiny_pipeline(tmp_path_factory, "wan")
    run = ["backbone=wan", f"pipeline={folder}", "data.frames=9", "data.size=16", "data.style=captioned"]
    with pytest.raises(ConfigError, match=r"sample.scheduler.shfit: .*did you mean sample.scheduler.shift\?"):
        check_config(compose_train(*run, "+sample.scheduler.shfit=2.0"))
    with pytest.raises(ConfigError, match=r"sample.scheduler.pretrained: no scheduler_config.json in .*nowhere"):
        check_config(compose_train(*run, "sample.scheduler.pretrained=/nowhere"))
    with pytest.raises(ConfigError, match=r"sample.scheduler: use_karras_sigmas=True is not supported"):
        check_config(compose_train(*run, "+sample.scheduler.use_karras_sigmas=true"))
    # stale's own models may sample on a flow scheduler's grid too; a mapping, not a string
    with pytest.raises(ConfigError, match=r"sample.scheduler='euler' must be null or a mapping"):
        check_config(compose_train("debug=smoke", "sample.scheduler=euler"))
