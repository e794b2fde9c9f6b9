"""The one reader of stale weights: a stale-train checkpoint (read_checkpoint), an export folder (read_export), and
what starts a run from either: init_from=CKPT_OR_EXPORT_DIR and the fine-tuning set-up built on it (prepare).

Checkpoints are read with the safe unpickler (safe_load.py); every constructor a checkpoint or an export names goes
through the allow-list (registry.py). Loading into a possibly different model is stale.models.transfer; which
tensors train is stale.models.finetune. These live together because they recurse: a fine-tuning checkpoint whose
frozen tensors came from init_from leaves them out (a LoRA checkpoint holds only the adapters and the layers
init_from could not fill); it records init_from's path and sha256 under "finetune_base", and resume and export
rebuild the frozen tensors from that file (itself a checkpoint or an export), refusing one whose sha256 changed.

Layout written by Lightning with the EMA callback (WeightAveraging) (conf/callbacks/default.yaml):
  state_dict           the EMA ("stale") weights, keys prefixed "model."
  current_model_state  the raw (last optimiser step) weights, same keys
  hyper_parameters     {"run_config": the resolved Hydra config, with "provenance"}
  finetune_base        (fine-tuning from init_from only) {"init_from", "sha256"}: the state dicts then hold only
                       the trained tensors; the frozen ones are rebuilt from that file
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stale.checkpoint.export_reader import read_export
from stale.checkpoint.frozen_parts import autoencoder_from_node, text_encoder_from_node
from stale.checkpoint.layout import WEIGHTS_FILE, sha256
from stale.checkpoint.registry import build
from stale.checkpoint.safe_load import CheckpointError, load_checkpoint
from stale.models.finetune import Finetune, apply_finetune, has_adapters, merged
from stale.models.transfer import TransferReport, expected_changes, load_matching

WEIGHTS = ("ema", "raw")
PREFIX = "model."  # StaleSystem keeps the network in `self.model`

log = logging.getLogger("stale")


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
            return rebuild(self)
        model = build({**self.run_config["model"], "grad_checkpointing": False}, where=f"{self.path}: run_config.model")
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:  # missing/unexpected keys or shape mismatches, listed by PyTorch
            raise CheckpointError(
                f"checkpoint {self.path}: {self.weights} weights do not fit run_config.model: {err}"
            ) from None
        return model.eval()

    def build_autoencoder(self, device: str | torch.device = "cpu"):
        """The run's autoencoder (vae=diffusers) with its recorded normalisation and weights hash, else None."""
        return autoencoder_from_node(self.run_config.get("vae"), f"{self.path}: run_config.vae", device)

    def build_text_encoder(self, device: str | torch.device = "cpu"):
        """The run's text encoder (model.cond=text; hf: checked against its recorded weights hash), else None."""
        return text_encoder_from_node(
            self.run_config.get("text_encoder"), f"{self.path}: run_config.text_encoder", device
        )


def read_checkpoint(path: str | Path, weights: str = "ema") -> StaleCheckpoint:
    """Load a stale-train checkpoint safely and pick the EMA (default) or raw weights."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {WEIGHTS}")
    path = Path(path)
    ckpt = load_checkpoint(path)
    run_config = (ckpt.get("hyper_parameters") or {}).get("run_config") if isinstance(ckpt, dict) else None
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise CheckpointError(
            f"checkpoint {path} has no hyper_parameters.run_config.model: it was not written by stale-train"
        )
    has_ema = "current_model_state" in ckpt  # WeightAveraging moves the raw weights there
    if weights == "ema" and not has_ema:
        raise CheckpointError(
            f"checkpoint {path} has no EMA weights (it was trained without the EMA callback): use weights=raw"
        )
    source = ckpt["current_model_state"] if weights == "raw" and has_ema else ckpt.get("state_dict")
    if not isinstance(source, dict) or not any(k.startswith(PREFIX) for k in source):
        raise CheckpointError(f"checkpoint {path} has no model weights (no '{PREFIX}*' keys in its state dict)")
    state = {k[len(PREFIX) :]: v for k, v in source.items() if k.startswith(PREFIX)}
    # stale_format 1 kept provenance inside run_config; later checkpoints carry a top-level "provenance" entry
    prov = ckpt.get("provenance") if isinstance(ckpt.get("provenance"), dict) else run_config.get("provenance")
    return StaleCheckpoint(
        path=path,
        run_config=run_config,
        state_dict=state,
        weights=weights,
        global_step=ckpt.get("global_step"),
        epoch=ckpt.get("epoch"),
        provenance=prov,
        extra={k: ckpt[k] for k in ("pytorch-lightning_version", "stale_format", "finetune_base") if k in ckpt},
    )


# Model config fields that change what the weights compute without changing any tensor's name or shape.
SAME_TENSORS_OTHER_MEANING = ("pos", "pos_base", "pattern")


class InitFromError(ValueError):
    """init_from weights that do not fit the configured model in a way the config change does not explain."""


@dataclass
class SourceWeights:
    path: Path
    state_dict: dict[str, torch.Tensor]
    model: dict  # the source's model config (StaleConfig fields)
    sha256: str  # of the checkpoint file, or of the export's model.safetensors


def read_weights(path: str | Path) -> SourceWeights:
    """Weights and model config of a stale-train checkpoint (EMA weights, or the raw ones of a run without the EMA
    callback) or an export folder."""
    path = Path(path)
    if path.is_dir():
        model = read_export(path, frozen_parts=False).model
        return SourceWeights(path, model.state_dict(), dataclasses.asdict(model.config), sha256(path / WEIGHTS_FILE))
    try:
        ckpt = read_checkpoint(path, "ema")
    except CheckpointError as err:
        if "has no EMA weights" not in str(err):
            raise
        log.warning("init_from %s has no EMA weights: using its raw weights", path)
        ckpt = read_checkpoint(path, "raw")
    model = ckpt.build_model()
    if has_adapters(model):  # a LoRA checkpoint: start from the adapted weights
        model = merged(model)
    return SourceWeights(path, model.state_dict(), dataclasses.asdict(model.config), sha256(path))


def init_from(model: nn.Module, path: str | Path, strict: bool = True) -> tuple[TransferReport, dict]:
    """Load `path` into `model` (in place) as far as it fits; stop on changes the configs do not explain unless
    strict=False. Returns the report and the record a checkpoint keeps (path, sha256)."""
    source = read_weights(path)
    target = dataclasses.asdict(model.config)
    report = load_matching(model, source.state_dict, expected_changes(source.model, target))
    for line in report.lines():
        log.info("init_from %s: %s", path, line)
    for key in SAME_TENSORS_OTHER_MEANING:  # every tensor fits, yet the weights will see other inputs
        if source.model.get(key) != target.get(key):
            log.warning(
                "init_from %s: model.%s was %s when these weights trained and is %s now; every tensor "
                "loads, but attention sees tokens in another way until training adapts it (expect a higher "
                "loss in the first steps)",
                path,
                key,
                source.model.get(key),
                target.get(key),
            )
    if report.unexpected and strict:
        raise InitFromError(
            f"init_from={path}: {len(report.unexpected)} tensors are new, dropped or reshaped and the model config "
            f"change does not explain them: {', '.join(report.unexpected[:8])}"
            f"{' ...' if len(report.unexpected) > 8 else ''}. Set init_from_strict=false to start anyway "
            "(they keep their fresh initialisation)"
        )
    return report, {"init_from": str(Path(path).resolve()), "sha256": source.sha256}


@dataclass
class Prepared:
    model: nn.Module
    report: TransferReport | None = None
    base: dict | None = None  # {"init_from", "sha256"} when the frozen tensors come from init_from


def check_base(finetune: dict | None, init_path: str | None, pretrained: bool = False) -> Finetune:
    """The finetune node, built (its own checks), against init_from: LoRA needs a frozen base to adapt (init_from,
    or a pretrained backbone's own weights)."""
    ft = Finetune(**{k: v for k, v in (finetune or {}).items() if k != "_target_"})
    if ft.lora and not init_path and not pretrained:
        raise InitFromError(
            "finetune=lora needs init_from=CKPT_OR_EXPORT_DIR: adapters on a random base learn "
            "nothing useful (use finetune=full to train from scratch)"
        )
    return ft


def prepare(model: nn.Module, finetune: dict | None, init_path: str | None, strict: bool = True) -> Prepared:
    """init_from, then the finetune mode: the model stale-train trains (and export rebuilds)."""
    pretrained = getattr(model, "pretrained_base", None)  # a pretrained backbone brings its own base weights
    ft = check_base(finetune, init_path, pretrained is not None)
    report, base = init_from(model, init_path, strict) if init_path else (None, None)
    if base is None and pretrained is not None and (ft.lora or ft.freeze):
        base = pretrained()  # hashed before the adapters rename the layers
    # what no base filled trains whatever the mode: init_from's new layers, a backbone's hinge head
    apply_finetune(
        model, ft, train_anyway=tuple(report.untrained) if report else tuple(getattr(model, "untrained", ()))
    )
    frozen = any(not p.requires_grad for p in model.parameters())
    return Prepared(model, report, base if frozen else None)


def rebuild(ckpt: StaleCheckpoint) -> nn.Module:
    """The model of a checkpoint that left its frozen tensors out: base from init_from (same sha256), the finetune
    set-up of the run, then the checkpoint's own tensors."""
    run, base = ckpt.run_config, ckpt.extra["finetune_base"]
    model = build({**run["model"], "grad_checkpointing": False}, where=f"{ckpt.path}: run_config.model")
    if "pretrained" in base:  # a pretrained backbone: built from its own weights, which must be the same
        found = model.pretrained_base()["sha256"]
        if found != base["sha256"]:
            raise CheckpointError(
                f"checkpoint {ckpt.path} holds only its trained tensors; its frozen base is model.pretrained="
                f"{base['pretrained']}, whose weights have changed (sha256 {found[:12]}..., not "
                f"{base['sha256'][:12]}...): restore them"
            )
        prepare(model, run.get("finetune"), None)
    else:
        path = Path(base["init_from"])
        found = sha256(path / WEIGHTS_FILE if path.is_dir() else path) if path.exists() else None
        if found != base["sha256"]:
            raise CheckpointError(
                f"checkpoint {ckpt.path} holds only its trained tensors; its frozen base is init_from={path}, "
                f"which {'is missing' if found is None else 'has changed (sha256 differs)'}: restore that file"
            )
        prepare(model, run.get("finetune"), str(path), strict=bool(run.get("init_from_strict", True)))
    full = model.state_dict()
    extra = sorted(set(ckpt.state_dict) - set(full))
    if extra:
        raise CheckpointError(f"checkpoint {ckpt.path}: tensors {extra[:4]} do not fit the rebuilt model")
    full.update(ckpt.state_dict)
    model.load_state_dict(full, strict=True)
    return model.eval()
