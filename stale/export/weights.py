"""Start from weights: init_from=CKPT_OR_EXPORT_DIR and the fine-tuning set-up built on it.

Reading goes through the one reader of each format: read_checkpoint (a stale-train checkpoint, EMA weights;
a LoRA checkpoint is rebuilt and merged) and StalePipeline.from_pretrained (an export folder). Loading into a possibly different
model is stale.models.transfer; which tensors train is stale.models.finetune.

A fine-tuning checkpoint whose frozen tensors came from init_from leaves them out (a LoRA checkpoint holds only
the adapters and the layers init_from could not fill): it records init_from's path and sha256 under
"finetune_base", and resume and export rebuild the frozen tensors from that file, refusing one whose sha256 changed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stale.export.checkpoint import CheckpointError, StaleCheckpoint, read_checkpoint
from stale.export.export import WEIGHTS_FILE, sha256
from stale.models.finetune import Finetune, apply_finetune, has_adapters, merged
from stale.models.transfer import TransferReport, expected_changes, load_matching

log = logging.getLogger("stale")


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
        from stale.export.pipeline import StalePipeline  # the export reader; it imports checkpoint.py itself

        model = StalePipeline.from_pretrained(path).model
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
            log.warning("init_from %s: model.%s was %s when these weights trained and is %s now; every tensor "
                        "loads, but attention sees tokens in another way until training adapts it (expect a higher "
                        "loss in the first steps)", path, key, source.model.get(key), target.get(key))
    if report.unexpected and strict:
        raise InitFromError(
            f"init_from={path}: {len(report.unexpected)} tensors are new, dropped or reshaped and the model config "
            f"change does not explain them: {', '.join(report.unexpected[:8])}"
            f"{' ...' if len(report.unexpected) > 8 else ''}. Set init_from_strict=false to start anyway "
            "(they keep their fresh initialisation)")
    return report, {"init_from": str(Path(path).resolve()), "sha256": source.sha256}


@dataclass
class Prepared:
    model: nn.Module
    report: TransferReport | None = None
    base: dict | None = None  # {"init_from", "sha256"} when the frozen tensors come from init_from


def prepare(model: nn.Module, finetune: dict | None, init_path: str | None, strict: bool = True) -> Prepared:
    """init_from, then the finetune mode: the model stale-train trains (and export rebuilds)."""
    ft = Finetune(**{k: v for k, v in (finetune or {}).items() if k != "_target_"})
    if ft.lora and not init_path:
        raise InitFromError("finetune=lora needs init_from=CKPT_OR_EXPORT_DIR: adapters on a random base learn "
                            "nothing useful (use finetune=full to train from scratch)")
    report, base = init_from(model, init_path, strict) if init_path else (None, None)
    apply_finetune(model, ft, train_anyway=tuple(report.untrained) if report else ())
    frozen = any(not p.requires_grad for p in model.parameters())
    return Prepared(model, report, base if frozen else None)


def rebuild(ckpt: StaleCheckpoint) -> nn.Module:
    """The model of a checkpoint that left its frozen tensors out: base from init_from (same sha256), the finetune
    set-up of the run, then the checkpoint's own tensors."""
    run, base = ckpt.run_config, ckpt.extra["finetune_base"]
    from stale.export.registry import build

    model = build({**run["model"], "grad_checkpointing": False}, where=f"{ckpt.path}: run_config.model")
    path = Path(base["init_from"])
    found = sha256(path / WEIGHTS_FILE if path.is_dir() else path) if path.exists() else None
    if found != base["sha256"]:
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds only its trained tensors; its frozen base is init_from={path}, which "
            f"{'is missing' if found is None else 'has changed (sha256 differs)'}: restore that file")
    prepare(model, run.get("finetune"), str(path), strict=bool(run.get("init_from_strict", True)))
    full = model.state_dict()
    extra = sorted(set(ckpt.state_dict) - set(full))
    if extra:
        raise CheckpointError(f"checkpoint {ckpt.path}: tensors {extra[:4]} do not fit the rebuilt model")
    full.update(ckpt.state_dict)
    model.load_state_dict(full, strict=True)
    return model.eval()
