"""sample_to_dir: generate videos with StalePipeline and write them as mp4s, a GIF grid and a contact sheet.

The library function behind `stale-sample` (stale/cli/sample.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from stale.data.conditioning import load_image, load_video
from stale.data.media import save_videos
from stale.export.pipeline import StalePipeline

log = logging.getLogger("stale")


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pipeline(model: str | Path | None = None, ckpt: str | Path | None = None, weights: str = "ema",
                  device: str | None = "cpu", lora: str | Path | None = None) -> StalePipeline:
    """An export folder (`model`, optionally with a LoRA adapter folder) or a stale-train checkpoint (`ckpt`)."""
    if (model is None) == (ckpt is None):
        raise ValueError(f"give exactly one of model=EXPORT_DIR or ckpt=CHECKPOINT (got model={model!r}, ckpt={ckpt!r})")
    if lora is not None and model is None:
        raise ValueError("lora=ADAPTER_DIR goes with model=BASE_EXPORT_DIR (a checkpoint already holds its adapter)")
    device = resolve_device(device)
    if model is not None:
        return StalePipeline.from_pretrained(model, device=device, lora=lora)
    return StalePipeline.from_checkpoint(ckpt, weights=weights, device=device)


def conditioning(pipe: StalePipeline, image, video, context_frames: int | None, size: int | None):
    """The given frames as uint8 (C, K, H, W), or None: image= (K = the temporal patch) or video= context_frames=K."""
    if image is not None and video is not None:
        raise ValueError("give image=PATH or video=PATH, not both")
    if image is None and video is None:
        if context_frames:
            raise ValueError(f"context_frames={context_frames} needs video=PATH (the frames to continue)")
        return None
    size = size or pipe.config.size
    trained = int(pipe.diffusion.get("context_frames") or 0) if pipe.diffusion.get("context_prob") else 0
    if image is not None:
        context = load_image(image, size).repeat(1, pipe.config.patch[0], 1, 1)  # one latent frame
    else:
        if not context_frames:
            raise ValueError(f"video={video} needs context_frames=K: how many of its frames to keep")
        context = load_video(video, int(context_frames), size)
    if context.shape[1] != trained:
        log.warning("conditioning on %d frames; this model was trained with diffusion.context_frames=%d "
                    "(context_prob %s): expect the generated frames to follow them loosely", context.shape[1],
                    trained, pipe.diffusion.get("context_prob", 0))
    return context


def sample_to_dir(out: str | Path, model: str | Path | None = None, ckpt: str | Path | None = None,
                  weights: str = "ema", num_videos: int = 8, label: int | Sequence[int] | None = None,
                  steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                  classifier_guidance: float | None = None, seed: int = 0, frames: int | None = None,
                  size: int | None = None, batch_size: int | None = None, fps: int = 8, device: str | None = "auto",
                  progress: bool = True, lora: str | Path | None = None, image: str | Path | None = None,
                  video: str | Path | None = None, context_frames: int | None = None, height: int | None = None,
                  width: int | None = None) -> dict[str, Path]:
    """Sample `num_videos` videos and write sample_NNN.mp4, grid.gif, contact_sheet.png and samples.json.
    image=PNG: every video starts with that image (image-to-video); video=MP4 context_frames=K: with its first K
    frames (continuation). The given frames come back unchanged; the model generates the rest."""
    pipe = load_pipeline(model, ckpt, weights, device, lora)
    labels = pipe.labels(num_videos, label)
    settings = pipe.settings(steps=steps, sampler=sampler, guidance=guidance, classifier_guidance=classifier_guidance)
    context = conditioning(pipe, image, video, context_frames, size)
    videos = pipe(num_videos=num_videos, label=labels, seed=seed, frames=frames, size=size,
                  batch_size=batch_size, progress=progress, context=context, height=height, width=width,
                  **settings)  # uint8 (B, C, T, H, W)
    paths = save_videos(videos, out, fps=fps)
    record = {"source": {"model": str(model) if model else None, "ckpt": str(ckpt) if ckpt else None,
                         "weights": None if model else weights},
              "lora": str(lora) if lora else None,
              "conditioning": {"image": str(image) if image else None, "video": str(video) if video else None,
                               "context_frames": 0 if context is None else context.shape[1]},
              "num_videos": num_videos, "labels": labels.tolist(), "seed": seed, **settings,
              "shape": list(videos.shape), "prior": pipe.prior, "device": str(pipe.device)}
    paths["record"] = Path(out) / "samples.json"
    paths["record"].write_text(json.dumps(record, indent=2) + "\n")
    return paths
