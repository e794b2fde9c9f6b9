"""Generated samples on disk: a folder of mp4 clips plus an optional labels sidecar, `labels.json`, written by
stale.data.media.write_labels (its docstring shows the format) and read here.
"""

from __future__ import annotations

import json
from pathlib import Path

from stale.data.media import SIDECAR


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
