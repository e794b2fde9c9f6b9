"""Safe loading of Lightning checkpoints: `torch.load(weights_only=True)` and nothing else.

A checkpoint is a pickle, and unpickling an untrusted pickle can run any code. `weights_only=True` swaps in
PyTorch's restricted unpickler, which only rebuilds tensors and plain containers and refuses every other global. A
checkpoint written by `stale-train` holds only those, so it loads; one that names any other global is refused with
the file and the global in the message, and there is deliberately no switch to fall back to full unpickling. The
checkpoint's layout: stale/checkpoint/weights.py.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not a stale checkpoint; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds pickled objects other than tensors and plain containers: refused, never run."""


def _unpickler_reason(err: Exception) -> str:
    """The one informative line of PyTorch's long weights_only error (which also advises weights_only=False:
    advice we do not pass on)."""
    text = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it references the global `{m.group(1)}`"
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return m.group(1).strip() if m else text.strip().splitlines()[0]


def load_checkpoint(path: str | Path) -> dict:
    """torch.load(path, weights_only=True) on CPU, with errors that name the file and say what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory (a distributed FSDP2 checkpoint?): export needs one "
            "file; train with trainer.strategy.save_distributed_checkpoint=false (the default)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        # The restricted unpickler refused a real checkpoint (a zip archive, or any file that names a global):
        # that is a refusal, not a corrupt file.
        if "global" in reason or zipfile.is_zipfile(path):
            what = (
                f"{reason}, which is not a tensor or a plain container"
                if "global" in reason
                else f"PyTorch's restricted unpickler rejected it ({reason})"
            )
            raise UnsafeCheckpointError(
                f"refused to load checkpoint {path}: {what}. "
                "Unpickling it could run arbitrary code, so stale loads checkpoints only with "
                "torch.load(weights_only=True) and refuses this one. If the file is your own training run, "
                "the training code stored a non-plain object (for example an OmegaConf DictConfig/ListConfig, "
                "a pathlib.Path or a numpy scalar) in the checkpoint: store plain Python containers instead."
            ) from None
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError) as err:  # truncated zip, wrong magic number, ...
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint ({err})") from None
