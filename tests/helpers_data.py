"""Shared builders for the data tests: real-video shards made once per session (no tests here: the name does not start with test_).

Session-wide caching goes through a marker file under pytest's base temp dir, so every test module that
asks gets the same folders without converting the videos twice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import webdataset as wds

from stale.data.shards import ShardsConfig, convert
from stale.data.testing import mixed_video_folder

# Small clips keep decoding cheap: 8 frames of 16x16 at 8 fps, the default run's clip shape (the square mode: the
# tests below were written for it; tests/test_buckets.py covers resize=aspect).
CLIP = dict(size=16, frames=8, fps=8, resize="square")


def real_shards(tmp_path_factory) -> dict:
    """The mixed-format folder converted by stale-shards: {folder, out, summary}."""
    base = Path(tmp_path_factory.getbasetemp()) / "real-video-shards"
    done = base / "summary.json"
    if not done.is_file():
        folder = mixed_video_folder(base / "videos")
        summary = convert(ShardsConfig(input=str(folder), out=str(base / "shards"), maxcount=4,
                                       split={"train": 0.6, "val": 0.4, "test": 0}, progress=False, **CLIP))
        done.write_text(json.dumps(summary))
    return {"folder": base / "videos", "out": base / "shards", "summary": json.loads(done.read_text())}


def read_samples(pattern: str) -> list[dict]:
    """Every raw sample of the shards a pattern names (in order)."""
    urls = wds.shardlists.expand_urls(pattern)
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k != "__url__" and k != "__local_path__"})
    return path


def relabelled(samples: list[dict], prefix: str, n: int, seed: int = 0) -> list[dict]:
    """n copies of real samples under fresh keys (a bigger shard without decoding more video)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = dict(rng.choice(samples))
        meta = json.loads(s["json"])
        meta["key"] = f"{prefix}{i:05d}"
        s["json"] = json.dumps(meta).encode()
        s["__key__"] = f"{prefix}{i:05d}"
        out.append(s)
    return out
