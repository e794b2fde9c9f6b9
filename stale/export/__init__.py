"""Export and inference: safetensors + JSON exports, ONNX, StalePipeline."""

from stale.export.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, read_checkpoint
from stale.export.export import export_checkpoint, save_pretrained
from stale.export.pipeline import ExportError, StalePipeline
from stale.export.registry import ALLOWED_TARGETS, DisallowedTargetError

__all__ = [
    "ALLOWED_TARGETS", "CheckpointError", "DisallowedTargetError", "ExportError", "StalePipeline",
    "UnsafeCheckpointError", "export_checkpoint", "load_checkpoint", "read_checkpoint", "save_pretrained",
]
