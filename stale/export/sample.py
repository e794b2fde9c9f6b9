"""sample_to_dir: generate videos with StalePipeline and write them as mp4s, a GIF grid and a contact sheet.

The library function behind `stale-sample` (stale/cli/sample.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from stale.export.pipeline import StalePipeline
from stale.data.media import save_videos


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pipeline(model: str | Path | None = None, ckpt: str | Path | None = None, weights: str = "ema",
                  device: str | None = "cpu") -> StalePipeline:
    """An export folder (`model`) or a stale-train checkpoint (`ckpt`): exactly one of them."""
    if (model is None) == (ckpt is None):
        raise ValueError(f"give exactly one of model=EXPORT_DIR or ckpt=CHECKPOINT (got model={model!r}, ckpt={ckpt!r})")
    device = resolve_device(device)
    if model is not None:
        return StalePipeline.from_pretrained(model, device=device)
    return StalePipeline.from_checkpoint(ckpt, weights=weights, device=device)


def sample_to_dir(out: str | Path, model: str | Path | None = None, ckpt: str | Path | None = None,
                  weights: str = "ema", num_videos: int = 8, label: int | Sequence[int] | None = None,
                  steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                  classifier_guidance: float | None = None, seed: int = 0, frames: int | None = None,
                  size: int | None = None, batch_size: int | None = None, fps: int = 8, device: str | None = "auto",
                  progress: bool = True) -> dict[str, Path]:
    """Sample `num_videos` videos and write sample_NNN.mp4, grid.gif, contact_sheet.png and samples.json."""
    pipe = load_pipeline(model, ckpt, weights, device)
    labels = pipe.labels(num_videos, label)
    settings = pipe.settings(steps=steps, sampler=sampler, guidance=guidance, classifier_guidance=classifier_guidance)
    videos = pipe(num_videos=num_videos, label=labels, seed=seed, frames=frames, size=size,
                  batch_size=batch_size, progress=progress, **settings)  # uint8 (B, C, T, H, W)
    paths = save_videos(videos, out, fps=fps)
    record = {"source": {"model": str(model) if model else None, "ckpt": str(ckpt) if ckpt else None,
                         "weights": None if model else weights},
              "num_videos": num_videos, "labels": labels.tolist(), "seed": seed, **settings,
              "shape": list(videos.shape), "prior": pipe.prior, "device": str(pipe.device)}
    paths["record"] = Path(out) / "samples.json"
    paths["record"].write_text(json.dumps(record, indent=2) + "\n")
    return paths
