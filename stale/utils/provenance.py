"""What produced a checkpoint: git commit (and whether the tree was dirty) and package versions."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("stale", "torch", "lightning", "hydra-core", "webdataset", "av", "wandb", "einops", "safetensors", "numpy")


def git_state(path: str | Path | None = None) -> dict:
    """Commit and dirtiness of the stale source tree (not the caller's cwd)."""
    where = Path(path) if path else Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance() -> dict:
    return {"git": git_state(), "packages": package_versions()}
