"""Export and inference: safetensors + JSON exports, ONNX, StalePipeline."""
