"""The embedded synthetic dataset as a DataModule: generated once into a cache, then streamed like any shards."""

from __future__ import annotations

import os

from stale.data.datamodule import VideoDataModule
from stale.data.synthetic import SyntheticSpec, ensure_synthetic, split_pattern


def default_cache_root() -> str:
    """STALE_CACHE, else XDG_CACHE_HOME/stale, else ~/.cache/stale: never the working directory."""
    if os.environ.get("STALE_CACHE"):
        return os.environ["STALE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stale")


class SyntheticDataModule(VideoDataModule):
    """Coloured moving shapes (stale.data.synthetic), written as real mp4 WebDataset shards on first use."""

    def __init__(
        self,
        root: str | None = None,
        frames: int = 8,
        size: int = 16,
        num_classes: int = 4,
        train_clips: int = 2048,
        val_clips: int = 128,
        test_clips: int = 128,
        style: str = "simple",
        **loader_kwargs,
    ):
        shape = dict(frames=frames, size=size, num_classes=num_classes)
        spec = SyntheticSpec.of(train_clips, val_clips, test_clips, style=style, **shape)
        self.folder = ensure_synthetic(root or default_cache_root(), spec)
        super().__init__(
            shards=split_pattern(self.folder, "train"),
            val_shards=split_pattern(self.folder, "val"),
            **shape,
            **loader_kwargs,
        )
