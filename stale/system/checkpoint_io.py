"""Checkpoint writing that is atomic on every local filesystem and fails loudly when the disk is full.

Lightning's writer commits a temporary file from the system temp dir with shutil.move: with checkpoints on another
filesystem than /tmp that move is a copy that first truncates the last good checkpoint (RELIABILITY.md,
tests/test_crash_signals.py). This plugin writes beside the target, fsyncs, renames into place (os.replace) and
fsyncs the folder; a full disk raises CheckpointWriteError naming the checkpoint and the free space, the previous
checkpoint intact. Remote paths (s3://, gs://, ...) keep Lightning's writer.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one at the same path is untouched."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` through a temporary file in the same folder, fsync, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        buf = io.BytesIO()  # serialise first: torch's zip writer turns ENOSPC into an opaque RuntimeError
        torch.save(obj, buf)
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            free = shutil.disk_usage(path.parent).free
            kept = "the previous checkpoint there is intact" if path.exists() else "there was no earlier one"
            raise CheckpointWriteError(
                e.errno,
                f"could not write checkpoint {path}: {os.strerror(e.errno)} ({free / 2**20:.1f} MiB free in "
                f"{path.parent}); {kept}. Free space or point callbacks.*.dirpath elsewhere, then resume with "
                f"ckpt_path=",
            ) from e
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems do not fsync folders; the data itself is already synced


class SafeCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, path)
