"""Latent diffusion: pretrained diffusers video autoencoders and the stale-encode latent cache."""
