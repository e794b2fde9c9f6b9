"""Safe loading of Lightning checkpoints: `torch.load(weights_only=True)` and nothing else.

A checkpoint is a pickle. Unpickling an untrusted pickle can run any code (an object's `__reduce__` names
a callable and its arguments, and the unpickler calls it). `weights_only=True` swaps in PyTorch's
restricted unpickler, which only rebuilds tensors and plain containers (dict, list, tuple, str, numbers)
and refuses every other global. A checkpoint written by `stale-train` holds only those, so it loads; one
that names any other global is refused here with the file and the global in the message, and there is
deliberately no switch to fall back to full unpickling.

Layout written by Lightning with the EMA callback (WeightAveraging) (conf/callbacks/default.yaml):
  state_dict           the EMA ("stale") weights, keys prefixed "model."
  current_model_state  the raw (last optimiser step) weights, same keys
  hyper_parameters     {"run_config": the resolved Hydra config, with "provenance"}
  finetune_base        (fine-tuning from init_from only) {"init_from", "sha256"}: the state dicts then hold only
                       the trained tensors; the frozen ones are rebuilt from that file (stale/export/weights.py)
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stale.export.registry import build

WEIGHTS = ("ema", "raw")
PREFIX = "model."  # StaleSystem keeps the network in `self.model`


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
        raise CheckpointError(f"checkpoint {path} is a directory (a distributed FSDP2 checkpoint?): export needs one "
                              "file; train with trainer.strategy.save_distributed_checkpoint=false (the default)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        # The restricted unpickler refused a real checkpoint (a zip archive, or any file that names a global):
        # that is a refusal, not a corrupt file.
        if "global" in reason or zipfile.is_zipfile(path):
            what = (f"{reason}, which is not a tensor or a plain container" if "global" in reason
                    else f"PyTorch's restricted unpickler rejected it ({reason})")
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


@dataclass
class StaleCheckpoint:
    """What an export needs from a Lightning checkpoint: the run config and one set of model weights."""

    path: Path
    run_config: dict  # the resolved Hydra config of the training run (plain containers)
    state_dict: dict[str, torch.Tensor]  # model weights, without the "model." prefix
    weights: str  # "ema" or "raw"
    global_step: int | None = None
    epoch: int | None = None
    provenance: dict | None = None  # what trained it: git commit, package versions, ... (see read_checkpoint)
    extra: dict = field(default_factory=dict)  # Lightning version, stale_format

    def build_model(self) -> torch.nn.Module:
        """The model named by run_config["model"] (allow-listed targets only), with these weights, in eval mode.
        A fine-tuning checkpoint that left its frozen tensors out is rebuilt from its init_from base (weights.py)."""
        if "finetune_base" in self.extra:
            from stale.export.weights import rebuild  # weights.py reads checkpoints through this module

            return rebuild(self)
        model = build({**self.run_config["model"], "grad_checkpointing": False}, where=f"{self.path}: run_config.model")
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:  # missing/unexpected keys or shape mismatches, listed by PyTorch
            raise CheckpointError(f"checkpoint {self.path}: {self.weights} weights do not fit run_config.model: {err}") from None
        return model.eval()

    def build_autoencoder(self, device: str | torch.device = "cpu"):
        """The run's autoencoder (vae=diffusers) with its recorded normalisation and weights hash, else None."""
        return autoencoder_from_node(self.run_config.get("vae"), f"{self.path}: run_config.vae", device)


    def build_text_encoder(self, device: str | torch.device = "cpu"):
        """The run's text encoder (model.cond=text; hf: checked against its recorded weights hash), else None."""
        return text_encoder_from_node(self.run_config.get("text_encoder"), f"{self.path}: run_config.text_encoder",
                                      device)


def text_encoder_from_node(node: dict | None, where: str, device: str | torch.device = "cpu", folder=None):
    """A run config's or an export's `text_encoder` node -> a stale.text encoder (None without one). `folder`
    replaces the recorded pretrained (an export's own copy)."""
    if not isinstance(node, dict) or node.get("name", "none") in ("none", None):
        return None
    from stale.text.encoders import TextEncoderError, load_text_encoder

    try:
        return load_text_encoder(node, device=device, folder=folder)
    except TextEncoderError as err:
        raise CheckpointError(f"{where}: {err}") from None


def autoencoder_from_node(node: dict | None, where: str, device: str | torch.device = "cpu", folder=None):
    """A run config's or an export's `vae` node -> a stale.latent Autoencoder (None for pixel space). `folder`
    replaces the recorded vae.pretrained (an export's own copy)."""
    if not isinstance(node, dict) or node.get("name", "diffusers") in ("none", None):
        return None
    from stale.latent.autoencoder import AutoencoderError, load_autoencoder

    kwargs = {k: node.get(k) for k in ("pretrained", "subfolder", "dtype", "normalization", "shift", "scale",
                                       "sha256")}
    if folder is not None:
        kwargs.update(pretrained=str(folder), subfolder=None)
    try:
        return load_autoencoder(**kwargs, device=device)
    except AutoencoderError as err:
        raise CheckpointError(f"{where}: {err}") from None


def read_checkpoint(path: str | Path, weights: str = "ema") -> StaleCheckpoint:
    """Load a stale-train checkpoint safely and pick the EMA (default) or raw weights."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {WEIGHTS}")
    path = Path(path)
    ckpt = load_checkpoint(path)
    run_config = (ckpt.get("hyper_parameters") or {}).get("run_config") if isinstance(ckpt, dict) else None
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} has no hyper_parameters.run_config.model: "
                              "it was not written by stale-train")
    has_ema = "current_model_state" in ckpt  # WeightAveraging moves the raw weights there
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"checkpoint {path} has no EMA weights (it was trained without the "
                              "EMA callback): use weights=raw")
    source = ckpt["current_model_state"] if weights == "raw" and has_ema else ckpt.get("state_dict")
    if not isinstance(source, dict) or not any(k.startswith(PREFIX) for k in source):
        raise CheckpointError(f"checkpoint {path} has no model weights (no '{PREFIX}*' keys in its state dict)")
    state = {k[len(PREFIX):]: v for k, v in source.items() if k.startswith(PREFIX)}
    # stale_format 1 kept provenance inside run_config; later checkpoints carry a top-level "provenance" entry
    prov = ckpt.get("provenance") if isinstance(ckpt.get("provenance"), dict) else run_config.get("provenance")
    return StaleCheckpoint(path=path, run_config=run_config, state_dict=state, weights=weights,
                           global_step=ckpt.get("global_step"), epoch=ckpt.get("epoch"), provenance=prov,
                           extra={k: ckpt[k] for k in ("pytorch-lightning_version", "stale_format", "finetune_base") if k in ckpt})
