"""evaluate(): Fréchet DoG distance, label agreement and (optionally) FVD of a samples folder against real shards.

FDD always (weight-free features, stale.eval.features); label agreement when a checkpoint is given and the samples
carry requested labels (labels.json); FVD when `i3d` points to an I3D TorchScript file (docs/evaluation.md). Real
clips are cut and resized exactly as the training loader does, so the two sets differ only in where they came from.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stale.data.reader import read_clips
from stale.data.video_io import ClipSpec, decode_mp4
from stale.diffusion.flow import to_unit_range
from stale.eval.features import FEATURE_NAMES, clip_batches_features
from stale.eval.frechet import frechet_between
from stale.eval.sample_folder import SamplesError, read_labels, sample_files

log = logging.getLogger(__name__)


# --- loading -----------------------------------------------------------------------------------------


def load_sample_clips(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """All mp4 clips of a samples folder -> uint8 (N, T, H, W, 3) and their file names. Shapes must agree."""
    clips, names = [], []
    for path in sample_files(folder):
        clip = decode_mp4(path.read_bytes(), name=str(path))
        if clips and clip.shape != clips[0].shape:
            raise SamplesError(f"{path}: shape {clip.shape} differs from {names[0]}'s {clips[0].shape}")
        clips.append(clip)
        names.append(path.name)
    return np.stack(clips), names


def load_real_clips(
    pattern, frames: int, size: int, max_clips: int | None = None, label_key: str | None = "label"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Real clips from shards, cut like validation batches: uint8 (N, frames, size, size, 3), labels (N,), shards.

    Read by stale.data.reader like training's: bad samples are skipped and counted (logged), and when
    none decodes the error counts them by reason and names the fix (label_key=null for unlabelled shards).
    """
    spec = ClipSpec(frames=frames, size=size, start="first", crop="center")  # cut like validation clips
    clips, labels, urls, skips = read_clips(pattern, spec, label_key, max_clips=max_clips)
    if skips:
        log.warning("real=%r: skipped %s", pattern, ", ".join(f"{r}={n}" for r, n in skips.most_common()))
    if len(clips) < 2:
        raise SamplesError(f"real={pattern!r} gave {len(clips)} clip(s); a Fréchet distance needs >= 2")
    return np.stack(clips), np.array(labels, dtype=np.int64), urls


def sample_labels(folder, names: list[str], mode: str = "auto", num_classes: int | None = None):
    """Requested labels of the samples -> (labels (N,) or None, where they came from).

    auto: labels.json when present, else none. sidecar: labels.json, required. cycle: clip i asked for
    class i mod num_classes (stale-train's order before it wrote a sidecar). none: skip agreement.
    """
    if mode not in ("auto", "sidecar", "cycle", "none"):
        raise ValueError(f"labels={mode!r} is not one of auto, sidecar, cycle, none")
    if mode == "none":
        return None, "none (labels=none)"
    if mode == "cycle":
        if not num_classes:
            raise ValueError("labels=cycle needs the number of classes: pass ckpt=")
        return np.arange(len(names)) % num_classes, f"cycle: clip i asked for class i mod {num_classes}"
    side = read_labels(folder, names)
    if side is None:
        if mode == "sidecar":
            raise SamplesError(f"labels=sidecar but {Path(folder) / 'labels.json'} does not exist")
        return None, "none (no labels.json in the samples folder)"
    return np.array([side["labels"][n] for n in names], dtype=np.int64), str(Path(folder) / "labels.json")


# --- FVD (optional) ----------------------------------------------------------------------------------


def i3d_features(
    detector, clips: np.ndarray, size: int = 224, batch: int = 8, device: str = "cpu", kwargs: dict | None = None
) -> np.ndarray:
    """Features of uint8 clips (N, T, H, W, 3) from an I3D TorchScript module.

    Preprocessing follows the common PyTorch FVD port (universome/fvd-comparison, StyleGAN-V): frames
    scaled to [0, 1], short side resized to `size` (bilinear), centre crop, then mapped to [-1, 1]; here mapped
    to [-1, 1] first (flow.to_unit_range), which is the same since bilinear weights sum to 1;
    called as detector(x (B, 3, T, size, size), rescale=False, resize=False, return_features=True).
    """
    kwargs = {"rescale": False, "resize": False, "return_features": True} if kwargs is None else dict(kwargs)
    out = []
    for i in range(0, len(clips), batch):
        x = to_unit_range(torch.as_tensor(clips[i : i + batch]).to(device))  # (B, T, H, W, 3) in [-1, 1]
        b, t, h, w, _ = x.shape
        frames = x.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w)
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        frames = frames[..., top : top + size, left : left + size]
        x = frames.reshape(b, t, 3, size, size).permute(0, 2, 1, 3, 4)  # (B, 3, T, size, size)
        with torch.no_grad():
            f = detector(x, **kwargs)
        out.append(torch.as_tensor(f).float().reshape(b, -1).cpu())
    return torch.cat(out).numpy()


def load_i3d(path: str | Path, device: str = "cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"i3d={path}: no such TorchScript file")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(f"i3d={path}: not a TorchScript module ({e})") from e


# --- the whole evaluation ----------------------------------------------------------------------------


def fdd(clips_a: np.ndarray, clips_b: np.ndarray, batch: int = 64) -> float:
    """Fréchet DoG distance between two sets of uint8 clips (N, T, H, W, 3)."""
    return frechet_between(clip_batches_features(clips_a, batch).numpy(), clip_batches_features(clips_b, batch).numpy())


def evaluate(
    samples: str | Path,
    real,
    ckpt: str | Path | None = None,
    i3d: str | Path | None = None,
    out: str | Path | None = None,
    max_real: int | None = None,
    labels: str = "auto",
    agreement_t: float = 1.0,
    batch: int = 32,
    device: str = "cpu",
    i3d_size: int = 224,
    i3d_kwargs: dict | None = None,
    seed: int = 0,
    label_key: str | None = "label",
    weights: str = "ema",
) -> dict:
    """Evaluate a samples folder against real shards; writes the JSON report to `out` (default <samples>/eval.json).
    weights: the checkpoint's head to score labels with, ema (what stale-train samples with) or raw.
    label_key: the real clips' label, read only with a checkpoint (null: unlabelled shards, no real accuracy)."""
    t0 = time.perf_counter()
    gen, names = load_sample_clips(samples)
    n, t, h, w, _ = gen.shape
    if h != w:
        log.warning("samples are %dx%d; real clips are centre-cropped square to %d", h, w, h)
    label_key = label_key if ckpt else None  # only the head's accuracy on real clips reads their labels
    real_clips, real_labels, real_urls = load_real_clips(
        real, frames=t, size=h, max_clips=max_real, label_key=label_key
    )
    report: dict = {
        "samples": {"folder": str(Path(samples).resolve()), "clips": n, "frames": t, "height": h, "width": w},
        "real": {
            "pattern": str(real),
            "shards": len(real_urls),
            "clips": len(real_clips),
            "max_real": max_real,
            "label_key": label_key,
        },
    }
    gen_f = clip_batches_features(gen, batch).numpy()
    real_f = clip_batches_features(real_clips, batch).numpy()
    report["fdd"] = {
        "value": frechet_between(gen_f, real_f),
        "generated_clips": n,
        "real_clips": len(real_clips),
        "frames_per_clip_used": t - 1,
        "features": len(FEATURE_NAMES),
        "generated_mean": dict(zip(FEATURE_NAMES, np.round(gen_f.mean(0), 3).tolist())),
        "real_mean": dict(zip(FEATURE_NAMES, np.round(real_f.mean(0), 3).tolist())),
    }

    if ckpt:
        from stale.checkpoint import read_checkpoint
        from stale.eval.agreement import agreement, head_predictions

        source = read_checkpoint(ckpt, weights)  # allow-listed model targets, weights_only loading
        model, run_config = source.build_model().to(device), source.run_config
        k = model.config.num_classes
        prior = run_config.get("diffusion", {}).get("prior", "uniform")
        requested, source = sample_labels(samples, names, labels, k)
        kw = dict(t=agreement_t, prior=prior, batch=batch, seed=seed)
        section: dict = {
            "checkpoint": str(Path(ckpt).resolve()),
            "t": agreement_t,
            "labels_from": source,
            "num_classes": k,
        }
        if requested is not None:
            pred, _ = head_predictions(model, gen, **kw)
            section.update(agreement(requested, pred, k))
            section["predicted"] = dict(zip(names, pred.tolist()))
        valid = real_labels < k
        if label_key is not None and valid.any():  # the head's accuracy on real clips: the ceiling the agreement is
            real_pred, _ = head_predictions(model, real_clips, **kw)  # read against (unlabelled shards: none)
            section["real_accuracy"] = agreement(real_labels[valid], real_pred[valid], k)["agreement"]
            section["real_clips"] = int(valid.sum())
        report["label_agreement"] = section

    if i3d:
        detector = load_i3d(i3d, device)
        try:
            g = i3d_features(detector, gen, i3d_size, batch, device, i3d_kwargs)
            r = i3d_features(detector, real_clips, i3d_size, batch, device, i3d_kwargs)
        except RuntimeError as e:
            raise ValueError(
                f"i3d={i3d}: the module failed on clips of {t} frames at {i3d_size}px "
                f"(I3D needs enough frames, often >= 10; check i3d_kwargs): {e}"
            ) from e
        report["fvd"] = {
            "value": frechet_between(g, r),
            "generated_clips": n,
            "real_clips": len(real_clips),
            "detector": str(Path(i3d).resolve()),
            "feature_dim": int(g.shape[1]),
            "size": i3d_size,
        }

    report["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(out) if out else Path(samples) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    report["out"] = str(out)
    return report


def summary_lines(report: dict) -> list[str]:
    """Human-readable lines for the terminal."""
    f = report["fdd"]
    lines = [
        f"FDD {f['value']:.3f}  ({f['generated_clips']} generated vs {f['real_clips']} real clips "
        f"from {report['real']['pattern']}, {f['frames_per_clip_used']} frames each)"
    ]
    la = report.get("label_agreement")
    if la:
        if "agreement" in la:
            lines.append(
                f"label agreement {la['agreement']:.3f} over {la['n']} clips at t={la['t']} "
                f"(chance {la['chance']:.3f}; labels from {la['labels_from']})"
            )
        else:
            lines.append(f"label agreement: skipped, {la['labels_from']}")
        if "real_accuracy" in la:
            lines.append(f"hinge head on real clips: accuracy {la['real_accuracy']:.3f} over {la['real_clips']} clips")
    if "fvd" in report:
        v = report["fvd"]
        lines.append(f"FVD {v['value']:.3f}  ({v['generated_clips']} vs {v['real_clips']} clips, {v['detector']})")
    lines.append(f"report: {report['out']}")
    return lines
