"""Write sample videos: one mp4 per clip, an animated GIF grid, a PNG contact sheet and the labels sidecar.

Next to the mp4 codec (video_io) so that every writer of samples (stale-train's sampling, stale-sample, the
ablation script) imports it from below: training does not import evaluation, and `utils` imports no stale module.
The sidecar, <folder>/labels.json, says which class each clip was asked for, so stale-eval can measure label
agreement (its format: docs/evaluation.md; read back by stale.eval.sample_folder.read_labels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stale.data.video_io import write_mp4_file

SIDECAR = "labels.json"
SIDECAR_FORMAT = "stale-samples"


def _upscale(frames: np.ndarray, factor: int) -> np.ndarray:  # (..., H, W, C) nearest-neighbour
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else frames


def contact_sheet(videos: np.ndarray, pad: int = 2, scale: int = 1) -> np.ndarray:
    """videos uint8 (B, T, H, W, C) -> one image: rows are samples, columns are frames."""
    v = _upscale(videos, scale)
    b, t, h, w, c = v.shape
    sheet = np.full((b * (h + pad) + pad, t * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        for j in range(t):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            sheet[y : y + h, x : x + w] = v[i, j]
    return sheet


def gif_grid(videos: np.ndarray, path: Path, fps: int = 8, scale: int = 1, pad: int = 2) -> None:
    """videos uint8 (B, T, H, W, C) -> an animated GIF whose frames tile all samples in a near-square grid."""
    v = _upscale(videos, scale)
    b, t, h, w, c = v.shape
    cols = int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    canvas = np.full((t, rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        canvas[:, y : y + h, x : x + w] = v[i]
    images = [Image.fromarray(f) for f in canvas]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def save_videos(videos: torch.Tensor, out_dir: str | Path, fps: int = 8, prefix: str = "sample") -> dict[str, Path]:
    """videos uint8 (B, C, T, H, W). Writes <prefix>_<i>.mp4, grid.gif and contact_sheet.png; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arr = videos.detach().cpu().permute(0, 2, 3, 4, 1).numpy()  # (B, T, H, W, C)
    scale = max(1, 128 // max(arr.shape[2], arr.shape[3]))  # tiny clips are upscaled so a person can see them
    paths = {}
    for i, clip in enumerate(arr):
        p = out / f"{prefix}_{i:03d}.mp4"
        write_mp4_file(p, np.ascontiguousarray(clip), fps=fps)
        paths[f"mp4_{i}"] = p
    paths["gif"] = out / "grid.gif"
    gif_grid(arr, paths["gif"], fps=fps, scale=scale)
    paths["contact_sheet"] = out / "contact_sheet.png"
    Image.fromarray(contact_sheet(arr, scale=max(1, scale // 2))).save(paths["contact_sheet"])
    return paths


def write_labels(folder: str | Path, labels: dict[str, int], **meta) -> Path:
    """Write <folder>/labels.json: `labels` maps clip file names (not paths) to requested classes."""
    clean = {Path(name).name: int(label) for name, label in labels.items()}
    path = Path(folder) / SIDECAR
    path.write_text(json.dumps({"format": SIDECAR_FORMAT, "version": 1, "labels": clean, **meta}, indent=1))
    return path
