"""The frozen parts a run config or an export names: its autoencoder (vae) and text encoder, loaded through the
latent and text packages, with errors that name the file they came from."""

from __future__ import annotations

import torch

from stale.checkpoint.safe_load import CheckpointError


def text_encoder_from_node(node: dict | None, where: str, device: str | torch.device = "cpu", folder=None):
    """A run config's or an export's `text_encoder` node -> a stale.text encoder (None without one). `folder`
    replaces the recorded pretrained (an export's own copy)."""
    from stale.text.encoders import TextEncoderError, load_text_encoder

    if not isinstance(node, dict):
        return None
    try:  # None for an empty node, or name: none (load_text_encoder reads both the _target_ and the old name)
        return load_text_encoder(node, device=device, folder=folder)
    except TextEncoderError as err:
        raise CheckpointError(f"{where}: {err}") from None


def autoencoder_from_node(node: dict | None, where: str, device: str | torch.device = "cpu", folder=None):
    """A run config's or an export's `vae` node -> a stale.latent Autoencoder (None for pixel space). `folder`
    replaces the recorded vae.pretrained (an export's own copy)."""
    # a run config's node: {"_target_": ...} or {} (vae=none); before the node had a _target_, name: diffusers | none.
    # An export's node carries neither: it always has an autoencoder
    if not isinstance(node, dict) or not node or node.get("name", "diffusers") in ("none", None):
        return None
    from stale.latent.autoencoder import AutoencoderError, load_autoencoder

    kwargs = {k: node.get(k) for k in ("pretrained", "subfolder", "dtype", "normalization", "shift", "scale", "sha256")}
    if folder is not None:
        kwargs.update(pretrained=str(folder), subfolder=None)
    try:
        return load_autoencoder(**kwargs, device=device)
    except AutoencoderError as err:
        raise CheckpointError(f"{where}: {err}") from None
