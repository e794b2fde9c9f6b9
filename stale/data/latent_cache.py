"""Reading a stale-encode latent cache (written by stale.latent.cache): its info.json, its bucket list, and the
empty caption's encoding. Its members are the ones named here; the loader (data=latents) reads them as any shard."""

from __future__ import annotations

import json
from pathlib import Path

from stale.data import buckets as bucketing
from stale.data.reader import expand_shards

FORMAT, FORMAT_VERSION = "stale-latents", 1
INFO = "info.json"
MEMBER = "latent.npy"
# text_encoder=hf (model.cond=text, docs/text.md): each clip's caption embedding (L, D) and mask (L,) beside its
# latent, and the empty caption's encoding once for the whole cache (what caption dropout and guidance use)
TEXT_MEMBERS = ("text.npy", "text_mask.npy")
EMPTY_TEXT = "empty_caption.safetensors"


class CacheError(ValueError):
    """A cache that cannot be written or read as asked; the message names the folder or key."""


def cache_info(shards, key: str = "data.shards") -> tuple[dict, Path]:
    """The info.json beside the first shard of a latent cache, and its path."""
    urls = expand_shards(shards, key)
    path = Path(urls[0]).parent / INFO
    if not path.is_file():
        raise CacheError(
            f"{key}: {path} does not exist: data=latents reads shards written by stale-encode "
            "(their folder holds its info.json)"
        )
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise CacheError(
            f"{key}: {path} is not a stale-encode cache (format={info.get('format')!r}): mp4 shards "
            "train with data=shards (add vae=diffusers to encode them on the fly), or encode them once "
            "with stale-encode and train on its out= with data=latents"
        )
    return info, path


def check_cache_clip(info: dict, path: Path, frames: int | None, size: int | None) -> None:
    """data.frames / data.size, when set with data=latents, must be the clip the cache holds."""
    for key, value in (("frames", frames), ("size", size)):
        if value is not None and value != info[key]:
            raise CacheError(
                f"data.{key}={value}, but the cache {path} holds clips of {key} {info[key]}: leave "
                f"data.{key} unset (null) with data=latents, or encode again"
            )


def cache_buckets(info: dict, path: Path, buckets=None, key: str = "data.buckets") -> list | None:
    """The bucket list a cache was encoded with (None: one clip shape), the one training takes: its latents have the
    shapes they were encoded at, so `buckets` (data.buckets), when set, must be the same list."""
    cached = info.get("buckets")
    if buckets is None:
        return cached
    if cached is None:
        raise CacheError(
            f"{key}={buckets!r}, but the cache {path} holds clips of one shape ({info['frames']} x "
            f"{info['size']} x {info['size']} pixels): encode it with stale-encode buckets=... (then "
            f"leave {key} unset), or drop {key}"
        )
    if bucketing.parse_buckets(buckets, key=key) != bucketing.parse_buckets(cached, key=f"{path} buckets"):
        raise CacheError(
            f"{key}={buckets!r} differs from the buckets the cache {path} was encoded with: {cached}. "
            f"Leave {key} unset (null) to train the cache's (data.bucket_batch_max caps their batch "
            "sizes), or encode again with stale-encode buckets=..."
        )
    return cached


def load_empty_text(folder: str | Path) -> tuple:
    """The empty caption's (embedding (1, L, D), mask (1, L)) stored once in a cache with caption embeddings."""
    from safetensors.torch import load_file

    t = load_file(str(Path(folder) / EMPTY_TEXT))
    return t["text"], t["mask"].bool()
