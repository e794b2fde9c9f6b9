"""Generated samples on disk: a folder of mp4 clips plus an optional labels sidecar, `labels.json`.

The sidecar says which class each clip was asked for, so stale-eval can measure label agreement:

    {
      "format": "stale-samples", "version": 1,
      "labels": {"sample_000.mp4": 0, "sample_001.mp4": 1, ...},   # required: file name -> requested class
      "num_classes": 4, "guidance": 1.0, "sampler": "euler", "steps": 50, "seed": 0   # optional, recorded
    }

Writers (stale-train's sampling, stale-sample) call write_labels(); readers call read_labels().
This module imports nothing heavy, so writers can use it freely.
"""

from __future__ import annotations

import json
from pathlib import Path

SIDECAR = "labels.json"
FORMAT = "stale-samples"


class SamplesError(ValueError):
    """A samples folder or its sidecar that cannot be used; the message names the file."""


def sample_files(folder: str | Path) -> list[Path]:
    """The mp4 clips of a samples folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SamplesError(f"samples folder not found: {folder}")
    files = sorted(folder.glob("*.mp4"))
    if not files:
        raise SamplesError(f"no .mp4 clips in {folder}")
    return files


def write_labels(folder: str | Path, labels: dict[str, int], **meta) -> Path:
    """Write <folder>/labels.json: `labels` maps clip file names (not paths) to requested classes."""
    folder = Path(folder)
    clean = {Path(name).name: int(label) for name, label in labels.items()}
    path = folder / SIDECAR
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "labels": clean, **meta}, indent=1))
    return path


def read_labels(folder: str | Path, names: list[str] | None = None) -> dict | None:
    """Read <folder>/labels.json -> the whole sidecar dict, or None when there is none.

    With `names`, every named clip must have a label (an unlabelled clip would silently shrink the sample).
    """
    path = Path(folder) / SIDECAR
    if not path.exists():
        return None
    try:
        side = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SamplesError(f"{path}: not valid JSON ({e})") from e
    labels = side.get("labels") if isinstance(side, dict) else None
    if not isinstance(labels, dict):
        raise SamplesError(f"{path}: needs a 'labels' object mapping clip file names to classes")
    for name, label in labels.items():
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise SamplesError(f"{path}: label of {name!r} is {label!r}, not a class index >= 0")
    if names is not None:
        missing = [n for n in names if n not in labels]
        if missing:
            raise SamplesError(f"{path}: no label for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return side
