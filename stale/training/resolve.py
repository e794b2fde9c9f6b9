"""resolve(cfg): the composed config against the frozen parts a run trains with, once, before anything trains.

The frozen parts are the autoencoder (vae=diffusers), a stale-encode cache's info.json (data=latents), the data
module and the text encoder (model.cond=text). They fix values the config leaves open: the latent clip
(model.in_channels / frames / size), the normalisation and weights hash (vae.shift / scale / sha256), the uniform
prior's scale on latents (diffusion.prior_scale = sqrt(3): docs/latent.md), a cache's clip and buckets (data.frames /
size / buckets), the text encoder's widths and vocabulary (model.text_*, text_encoder.words / sha256) and the
sampling grid of a pipeline's scheduler (sample.scheduler).
resolve returns them with a new config holding those values (the one the checkpoint and the export record); the
composed config is left as it was.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from stale.data.captions import read_captions
from stale.data.latent_cache import cache_buckets, cache_info, check_cache_clip
from stale.diffusion.samplers import read_scheduler
from stale.models import config_of
from stale.training.checks import (
    ConfigError,
    build,
    check_clip,
    check_composed,
    check_model,
    has_autoencoder,
    is_latent_data,
)


@dataclass
class Resolved:
    config: DictConfig  # the run's config with every derived value filled in
    autoencoder: Any = None  # stale.latent Autoencoder, or None in pixel space
    datamodule: Any = None  # the LightningDataModule, built once
    text_encoder: Any = None  # model.cond=text: the stale.text encoder
    empty_text: Any = None  # ... and the empty caption's encoding (caption dropout, guidance)


def _with(cfg: DictConfig, values: dict) -> DictConfig:
    """A copy of cfg with `values` ({"model": {...}, ...}) merged in, new keys allowed (StaleConfig fields that the
    YAML does not list, such as model.in_channels)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.merge_with(values)
    return out


def resolve(cfg: DictConfig, datamodule=None, *, data: bool = True) -> Resolved:
    """Check `cfg`, load its frozen parts and return them with the resolved config. data=False stops before the
    data module and the text encoder (check_config); `datamodule` replaces cfg.data (notebooks, tests)."""
    check_composed(cfg)
    autoencoder, derived = resolve_autoencoder(cfg)
    run = resolve_scheduler(_with(cfg, derived))
    check_clip(run, autoencoder)
    resolved = Resolved(run, autoencoder=autoencoder)
    text = run.model.get("cond", "label") == "text"
    if not data:
        # a text model's config needs its encoder's widths (checked with the data), a pretrained backbone's are its own
        if not text or run.model.get("pretrained"):
            check_model_config(run)
        return resolved
    # _convert_: plain lists in the DataModule's hparams, so checkpoints load with weights_only=True
    resolved.datamodule = (
        datamodule if datamodule is not None else instantiate(run.data, _convert_="all", captions=text)
    )
    if text:
        resolved.text_encoder, resolved.empty_text, derived = resolve_text(run, resolved.datamodule)
        resolved.config = run = _with(run, derived)
    check_model_config(run)
    return resolved


def check_config(cfg: DictConfig) -> Resolved:
    """Every check that needs no data: resolve without the data module and the text encoder."""
    return resolve(cfg, data=False)


def resolve_scheduler(cfg: DictConfig) -> DictConfig:
    """sample.scheduler as the scheduler config it names (a pipeline's scheduler/ folder read once, here), so the
    checkpoint and the export hold the grid itself, not a path; a bad one stops here, naming the key."""
    spec = cfg.sample.get("scheduler")
    if spec is None:
        return cfg
    try:
        config = read_scheduler(OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    with open_dict(cfg):
        cfg.sample.scheduler = config
    return cfg


def check_model_config(cfg: DictConfig):
    """The model's config (StaleConfig or BackboneConfig: its own ranges checked by its constructor), checked against
    parallelism."""
    try:
        model = config_of(OmegaConf.to_container(cfg.model, resolve=True))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    check_model(cfg, model)
    return model


def resolve_autoencoder(cfg: DictConfig) -> tuple[Any, dict]:
    """vae=diffusers: load the autoencoder (a bad vae.pretrained stops here, naming the path) and check the pixel
    clip against its shape rules (naming the key and the nearest valid values); with data=latents, read the cache's
    info.json too (its clip, buckets, statistics and the weights that encoded it). Returns the Autoencoder and the
    values that follow; (None, {}) in pixel space."""
    if not has_autoencoder(cfg):
        return None, {}
    from stale.latent.autoencoder import AutoencoderError

    stats = {}
    data: dict = {}
    frames, size, info = cfg.data.frames, cfg.data.size, None
    if is_latent_data(cfg):
        buckets = cfg.data.get("buckets")
        try:
            info, info_path = cache_info(cfg.data.shards, "data.shards")
            check_cache_clip(info, info_path, cfg.data.get("frames"), cfg.data.get("size"))
            # a cache encoded with buckets trains with them: data.buckets may only repeat its list
            buckets = cache_buckets(
                info, info_path, OmegaConf.to_container(buckets) if OmegaConf.is_config(buckets) else buckets
            )
        except ValueError as e:  # CacheError, ShardError
            raise ConfigError(str(e)) from None
        frames, size = info["frames"], info["size"]
        data = {"frames": frames, "size": size, "buckets": buckets}
        if cfg.vae.get("stats") is None:
            stats = {"stats": info["stats"]}
    autoencoder = build(cfg.vae, **stats, _convert_="all")  # a bad vae.pretrained stops here, naming the path
    try:
        if info is not None and info["vae"]["sha256"] != autoencoder.source["sha256"]:
            raise ConfigError(
                f"data.shards: the cache {info_path} was encoded by the autoencoder at "
                f"{info['vae']['pretrained']!r} (weights sha256 {info['vae']['sha256'][:12]}...), "
                f"but vae.pretrained={cfg.vae.pretrained!r} holds other weights "
                f"({autoencoder.source['sha256'][:12]}...)"
            )
        c, t, h, _ = autoencoder.latent_shape(frames, size)
    except AutoencoderError as e:
        raise ConfigError(str(e)) from None
    derived = {
        "data": data,
        "model": {"in_channels": c, "frames": t, "size": h},
        "vae": {
            "shift": [float(v) for v in autoencoder.shift],
            "scale": [float(v) for v in autoencoder.scale],
            "sha256": autoencoder.source["sha256"],
            "normalization": autoencoder.normalization,
        },
    }
    if cfg.diffusion.get("prior_scale") is None:
        derived["diffusion"] = {"prior_scale": math.sqrt(3.0)}
    return autoencoder, derived


def resolve_text(cfg: DictConfig, datamodule) -> tuple[Any, Any, dict]:
    """model.cond=text: load (hf) or build (learned: a vocabulary of the training captions) the text encoder.
    Returns (encoder, the empty caption's encoding, the values that follow). A stale-encode cache with caption
    embeddings must have been made by the same encoder (weights hash)."""
    from stale.text.encoders import build_vocabulary, text_encoder_kind

    node, vocabulary = cfg.text_encoder, {}
    learned = text_encoder_kind(node) == "learned"
    if learned and not node.get("words"):
        captions = read_captions(datamodule.train_urls, "data.shards", node.get("vocab_captions"))
        if not captions:
            raise ConfigError("text_encoder=learned: the training shards hold no caption (.txt or .json 'caption')")
        vocabulary = {"words": build_vocabulary(captions, int(node.get("max_words", 5000)))}
    encoder = build(node, **vocabulary, _convert_="all")  # a bad pretrained folder stops here, naming it
    derived = {"text_encoder": {"sha256": encoder.source["sha256"]}, "model": {"text_len": encoder.max_length}}
    if learned:
        derived["text_encoder"]["words"] = list(encoder.words)
        derived["model"].update(
            text_vocab=encoder.vocab_size, text_layers=encoder.layers, text_dim=0
        )  # the model's width
    else:
        derived["model"].update(text_dim=encoder.dim, text_vocab=0)
    cached = getattr(datamodule, "text_info", None)  # a stale-encode cache with caption embeddings
    if cached is None:
        return encoder, encoder.empty(), derived
    if cached["sha256"] != encoder.source["sha256"] or cached["max_length"] != encoder.max_length:
        raise ConfigError(
            f"data.shards: the cache's captions were encoded by {cached['pretrained']!r} "
            f"(sha256 {cached['sha256'][:12]}..., max_length {cached['max_length']}), not by "
            f"text_encoder.pretrained={cfg.text_encoder.pretrained!r} (sha256 "
            f"{encoder.source['sha256'][:12]}..., max_length {encoder.max_length})"
        )
    return encoder, datamodule.empty_text, derived
