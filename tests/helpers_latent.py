"""Tiny random-init diffusers autoencoders, saved to folders and loaded through stale's own code (no tests here).

Sizes follow diffusers' own model tests (a few channels, one layer per block): tens of thousands of parameters,
a 9 x 32 x 32 clip encodes in well under a second on one thread. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

# class -> (config, expected (latent channels, spatial factor, temporal factor)): the factors are what the
# class's encoder does with these configs, typed here, not read from stale's code under test
TINY = {
    "AutoencoderKLWan": (dict(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                              temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                              latents_std=[1.5, 2.0, 0.5, 1.0]), (4, 8, 4)),
    "AutoencoderKLCogVideoX": (dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                    norm_num_groups=2, temporal_compression_ratio=4), (4, 8, 4)),
    "AutoencoderKLLTXVideo": (dict(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                   decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                   decoder_layers_per_block=(1, 1, 1, 1, 1),
                                   spatio_temporal_scaling=(True, True, False, False),
                                   decoder_spatio_temporal_scaling=(True, True, False, False),
                                   decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                   upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1), (4, 4, 4)),
    "AutoencoderKLHunyuanVideo": (dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                       norm_num_groups=2, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                       up_block_types=("HunyuanVideoUpBlock3D",) * 4), (4, 8, 4)),
    "AutoencoderKL": (dict(block_out_channels=(8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
                      (4, 2, 1)),
}


def save_tiny_vae(cls: str, folder: Path, seed: int = 0) -> Path:
    """A random-init `cls` with the TINY config, save_pretrained to `folder` (safetensors + config.json)."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, cls)(**TINY[cls][0])
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_vae(tmp_path_factory, cls: str) -> Path:
    """One saved folder per class for the whole session."""
    folder = Path(tmp_path_factory.getbasetemp()) / f"vae-{cls}"
    if not (folder / "config.json").is_file():
        save_tiny_vae(cls, folder)
    return folder
