"""Latent training's costs and gains (docs/latent.md): encode speed, cache size, and the training step on cached
latents against the step on pixels for the same pixel clip, in one run.

The autoencoder is `vae` (a folder or hub id, loaded as stale-train loads it) or, when null, diffusers'
AutoencoderKLWan with its default config: Wan 2.1's architecture at its real size with random weights (the
speed of a convolutional network does not depend on its weights, and nothing can be downloaded here).
Every variant is the same training step (stale.bench.step: the system's loss, backward, clipping, AdamW) on
in-memory batches: the pixel model on uint8 clips; the latent model (a StaleSystem with the autoencoder, as
stale-train builds it) on cached moments, from which the system draws its normalised latents (timed with it);
and the same latent system on uint8 clips, which it encodes first (vae=diffusers with data=shards). Variants
take turns round by round, so a change in the machine's load reaches all of them.
"""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import torch

from stale.bench import build, median, random_batches, take_turns, timed
from stale.bench.step import TrainStep, make_system
from stale.diffusion import flow


def _autoencoder(vae: str | None, device: str):
    from stale.latent.autoencoder import Autoencoder, load_autoencoder

    if vae:
        return load_autoencoder(vae, device=device, normalization="vae"), vae
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan()  # diffusers' default config: Wan 2.1's VAE (base_dim 96, z_dim 16)
    return Autoencoder(model, "AutoencoderKLWan", {"pretrained": None}).to(
        device
    ), "AutoencoderKLWan default config (Wan 2.1 architecture), random weights"


def _cache_bytes(moments: torch.Tensor, dtype) -> int:
    """Bytes of one clip's cache members as stale-encode writes them (npy + json), tar headers excluded."""
    buf = io.BytesIO()
    np.save(buf, moments.numpy().astype(dtype))
    meta = {
        "label": 0,
        "source": "shards/train-000000.tar:clip_000000",
        "clip": {"frames": 0, "size": 0},
        "latent_shape": list(moments.shape),
    }
    return buf.getbuffer().nbytes + len(json.dumps(meta))


def run(
    vae: str | None = None,
    model: str = "tiny",
    frames: int = 9,
    size: int = 64,
    batch_size: int = 4,
    latent_patch=(1, 2, 2),
    steps: int = 5,
    rounds: int = 3,
    encode_clips: int = 4,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    ae, name = _autoencoder(vae, device)
    c, t, h, w = ae.latent_shape(frames, size)
    pixels = random_batches(2, batch_size, frames, size, seed=seed)
    # encode: clips/s at batch 1 (stale-encode's batch_size is yours to choose; 1 bounds memory)
    clip = flow.to_unit_range(pixels[0][0][:1].to(device))
    moments = ae.encode(clip)  # warm-up; its moments give the cache's bytes per clip
    encode_s = timed(lambda: ae.encode(clip), device, encode_clips)
    cached = [(ae.encode(flow.to_unit_range(v.to(device))), y) for v, y in pixels]  # (B, 2C, T', H', W')

    torch.manual_seed(seed)
    pixel_step = TrainStep(make_system(build(model, frames, size)), device)
    torch.manual_seed(seed)
    latent_net = build(model, t, h, in_channels=c, patch=list(latent_patch))
    latent_step = TrainStep(make_system(latent_net, autoencoder=ae), device)
    plans = {"pixels": (pixel_step, pixels), "cached latents": (latent_step, cached)}
    plans["latents encoded on the fly"] = (latent_step, pixels)
    variants = {k: lambda step=step, it=itertools.cycle(b): step(next(it)) for k, (step, b) in plans.items()}
    for fn in variants.values():
        fn()  # warm-up
    times = take_turns(variants, rounds, device, steps)
    pixel_ms = 1e3 * median(times["pixels"])
    tokens = {
        "pixels": frames * (size // 4) ** 2,
        "cached latents": t * (h // latent_patch[1]) * (w // latent_patch[2]),
    }
    tokens["latents encoded on the fly"] = tokens["cached latents"]
    rows = [
        {
            "variant": k,
            "step_ms": round(1e3 * median(v), 1),
            "vs_pixels": round(pixel_ms / (1e3 * median(v)), 2),
            "tokens_per_clip": tokens[k],
        }
        for k, v in times.items()
    ]
    uint8_bytes = 3 * frames * size * size
    summary = {
        "autoencoder": name,
        "pixel_clip": [3, frames, size, size],
        "latent_clip": [c, t, h, w],
        "encode_clips_per_s": round(1 / encode_s, 2),
        "encode_ms_per_clip": round(1e3 * encode_s, 1),
        "cache_bytes_per_clip_float32": _cache_bytes(moments[0].cpu(), np.float32),
        "cache_bytes_per_clip_float16": _cache_bytes(moments[0].cpu(), np.float16),
        "uint8_pixel_bytes_per_clip": uint8_bytes,
        "step_ratio_pixels_over_cached": round(median(times["pixels"]) / median(times["cached latents"]), 2),
    }
    return {
        "rows": rows,
        "summary": summary,
        "notes": [
            f"{model} model, batch {batch_size}; pixels patch (1, 4, 4) as conf/model/{model}.yaml, latents "
            f"patch {tuple(latent_patch)}; median over {rounds} rounds x {steps} steps, variants "
            "interleaved; encode timed at batch 1 over "
            f"{encode_clips} clips; cache bytes: the moments (2C channels) as .npy + the .json"
        ],
    }
