"""Captions from shard samples: `<key>.txt`, else the `caption` field of `<key>.json` (video2dataset writes both;
stale-shards writes both when its manifest has a caption column).

A clip without a caption (no .txt, no .json caption, or only whitespace) is either skipped (counted as
`missing_caption`) or given the empty caption (counted as `empty_caption`, kept): data.missing_caption=skip|empty.
"""

from __future__ import annotations

import json

from stale.data.reader import Skip, SkipCounter, expand_shards, read_shard, sample_name

MISSING = ("skip", "empty")


def caption_of(sample: dict) -> str | None:
    """The sample's caption, or None when it has none."""
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", "replace").strip()
        if text:
            return text
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            return None  # check_sample counts the bad .json
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(caption, str) and caption.strip():
            return caption.strip()
    return None


def sample_caption(sample: dict, missing: str, counter: SkipCounter | None = None) -> str:
    """The caption, or under missing=empty "" (counted as empty_caption); under missing=skip raises Skip."""
    caption = caption_of(sample)
    if caption is not None:
        return caption
    if missing == "skip":
        raise Skip("missing_caption", f"{sample_name(sample)}: no .txt and no 'caption' in .json")
    if counter is not None:
        counter.skip("empty_caption", sample.get("__url__", "?"), f"{sample_name(sample)}: no caption, given ''")
    return ""


def read_captions(shards, key: str = "data.shards", max_captions: int | None = None) -> list[str]:
    """The captions of the shards in order (videos are not decoded), for text_encoder=learned's vocabulary."""
    counter = SkipCounter("captions", log_first=0)
    out = []
    for url in expand_shards(shards, key):
        for sample in read_shard(url, counter):
            caption = caption_of(sample)
            if caption is not None:
                out.append(caption)
            if max_captions and len(out) >= max_captions:
                return out
    return out
