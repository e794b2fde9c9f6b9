"""What produced a checkpoint: git commit (and whether the tree was dirty), package versions, the command
line and the shards it read. StaleSystem.on_save_checkpoint writes this, with the resolved config, into
every checkpoint under the key "provenance"."""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "stale",
    "torch",
    "lightning",
    "hydra-core",
    "omegaconf",
    "webdataset",
    "av",
    "wandb",
    "einops",
    "safetensors",
    "numpy",
)


def git_state(path: str | Path | None = None) -> dict:
    """Commit and dirtiness of the stale source tree (not the caller's cwd).

    `dirty` ignores untracked files; `diff_sha1` fingerprints the uncommitted changes to tracked files, so
    two dirty runs can be told apart. All None when the code is not in a git checkout (an installed wheel).
    """
    where = Path(path) if path else Path(__file__).resolve().parents[2]
    none = {"commit": None, "dirty": None, "diff_sha1": None}

    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return none
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        diff = git("diff", "HEAD").stdout if dirty else ""
        return {
            "commit": head.stdout.strip(),
            "dirty": dirty,
            "diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if dirty else None,
        }
    except (OSError, subprocess.SubprocessError):
        return none


def package_versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def shard_list(datamodule) -> dict:
    """The train and validation shards a data module reads, with their sizes where they are local files."""
    out = {}
    for split, attr in (("train", "train_urls"), ("val", "val_urls")):
        urls = getattr(datamodule, attr, None) if datamodule is not None else None
        if urls is None:
            continue
        out[split] = [{"url": str(u), "bytes": os.path.getsize(u) if os.path.isfile(str(u)) else None} for u in urls]
    return out


def provenance() -> dict:
    """Computed once when a run starts: the code that was imported is the code that trained."""
    return {
        "git": git_state(),
        "packages": package_versions(),
        "argv": list(sys.argv),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
