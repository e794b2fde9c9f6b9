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
from stale.data.media import save_videos, write_labels
from stale.pipeline.stale_pipeline import StalePipeline

log = logging.getLogger("stale")


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pipeline(
    model: str | Path | None = None,
    ckpt: str | Path | None = None,
    weights: str = "ema",
    device: str | None = "cpu",
    lora: str | Path | None = None,
) -> StalePipeline:
    """An export folder (`model`, optionally with a LoRA adapter folder) or a stale-train checkpoint (`ckpt`)."""
    if (model is None) == (ckpt is None):
        raise ValueError(
            f"give exactly one of model=EXPORT_DIR or ckpt=CHECKPOINT (got model={model!r}, ckpt={ckpt!r})"
        )
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
        log.warning(
            "conditioning on %d frames; this model was trained with diffusion.context_frames=%d "
            "(context_prob %s): expect the generated frames to follow them loosely",
            context.shape[1],
            trained,
            pipe.diffusion.get("context_prob", 0),
        )
    return context


def read_prompts(prompt: str | None, prompts: str | Path | None) -> list[str] | None:
    """prompt="..." or prompts=FILE (one per line, blank lines ignored) -> the prompt list, or None."""
    if prompt is not None and prompts is not None:
        raise ValueError('give prompt="..." or prompts=FILE, not both')
    if prompts is not None:
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"prompts={prompts}: no such file (one prompt per line)")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompts={prompts} holds no prompt")
        return lines
    return None if prompt is None else [str(prompt)]


def sample_to_dir(
    out: str | Path,
    model: str | Path | None = None,
    ckpt: str | Path | None = None,
    weights: str = "ema",
    num_videos: int | None = None,
    label: int | Sequence[int] | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    classifier_guidance: float | None = None,
    seed: int = 0,
    frames: int | None = None,
    size: int | None = None,
    batch_size: int | None = None,
    fps: int = 8,
    device: str | None = "auto",
    progress: bool = True,
    lora: str | Path | None = None,
    image: str | Path | None = None,
    video: str | Path | None = None,
    context_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    prompt: str | None = None,
    prompts: str | Path | None = None,
    negative_prompt: str | None = None,
    scheduler: dict | None = None,
) -> dict[str, Path]:
    """Sample `num_videos` videos and write sample_NNN.mp4, grid.gif, contact_sheet.png, samples.json and, for
    class-conditional samples, labels.json (the class each clip was asked for: stale-eval's label agreement).
    image=PNG: every video starts with that image (image-to-video); video=MP4 context_frames=K: with its first K
    frames (continuation). The given frames come back unchanged; the model generates the rest."""
    pipe = load_pipeline(model, ckpt, weights, device, lora)
    # a text model (model.cond=text): prompt="..." or prompts=FILE (one per line), cycled over num_videos (default:
    # one video per prompt), guided against negative_prompt or the empty caption
    text = read_prompts(prompt, prompts)
    num_videos = num_videos or (len(text) if text else 8)
    text = None if text is None else [text[i % len(text)] for i in range(num_videos)]
    labels = pipe.labels(num_videos, label if text is None else 0)
    settings = pipe.settings(
        steps=steps, sampler=sampler, guidance=guidance, classifier_guidance=classifier_guidance, scheduler=scheduler
    )
    context = conditioning(pipe, image, video, context_frames, size)
    videos = pipe(
        num_videos=num_videos,
        label=labels,
        seed=seed,
        frames=frames,
        size=size,
        batch_size=batch_size,
        progress=progress,
        context=context,
        height=height,
        width=width,
        prompt=text,
        negative_prompt=negative_prompt,
        **settings,
    )  # uint8 (B, C, T, H, W)
    paths = save_videos(videos, out, fps=fps)
    record = {
        "source": {
            "model": str(model) if model else None,
            "ckpt": str(ckpt) if ckpt else None,
            "weights": None if model else weights,
        },
        "lora": str(lora) if lora else None,
        "conditioning": {
            "image": str(image) if image else None,
            "video": str(video) if video else None,
            "context_frames": 0 if context is None else context.shape[1],
        },
        "num_videos": num_videos,
        "labels": None if text else labels.tolist(),
        "prompts": text,
        "negative_prompt": negative_prompt,
        "seed": seed,
        **settings,
        "shape": list(videos.shape),
        "prior": pipe.prior,
        "device": str(pipe.device),
    }
    paths["record"] = Path(out) / "samples.json"
    paths["record"].write_text(json.dumps(record, indent=2) + "\n")
    if text is None and bool((labels < pipe.null_label).all()):  # unconditional clips ask for no class
        names = {paths[f"mp4_{i}"].name: int(y) for i, y in enumerate(labels)}
        paths["labels"] = write_labels(out, names, num_classes=pipe.config.num_classes, seed=seed, **settings)
    return paths
