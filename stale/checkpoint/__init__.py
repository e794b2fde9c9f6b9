"""Reading weights: the safe unpickler, the allow-list of constructors, stale-train checkpoints and export folders,
and init_from / prepare (what a run starts from). Below the system and export, which both read through it."""

from stale.checkpoint.export_reader import Export, ExportError, read_export
from stale.checkpoint.registry import ALLOWED_TARGETS, DisallowedTargetError
from stale.checkpoint.safe_load import CheckpointError, UnsafeCheckpointError, load_checkpoint
from stale.checkpoint.weights import InitFromError, StaleCheckpoint, init_from, prepare, read_checkpoint

__all__ = [
    "ALLOWED_TARGETS",
    "CheckpointError",
    "DisallowedTargetError",
    "Export",
    "ExportError",
    "InitFromError",
    "StaleCheckpoint",
    "UnsafeCheckpointError",
    "init_from",
    "load_checkpoint",
    "prepare",
    "read_checkpoint",
    "read_export",
]
