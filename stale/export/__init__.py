"""Writing exports: safetensors + JSON export folders (export.py) and ONNX / torch.export graphs (onnx.py). They are
read by stale.checkpoint (read_export) and stale.pipeline (StalePipeline)."""

from stale.export.export import export_checkpoint, save_pretrained

__all__ = ["export_checkpoint", "save_pretrained"]
