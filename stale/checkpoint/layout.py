"""The layout of an export folder, shared by its writer (stale.export) and its readers (export_reader.py, StalePipeline).

model.safetensors   the weights (EMA by default), no pickle
config.json         {"format", "format_version", "model": {"_target_": MODEL_TARGET, ...},
                     "diffusion": {"_target_": DIFFUSION_TARGET, ...}, "sample", "weights", "files", ["vae"],
                     ["text_encoder"]}
provenance.json     what produced it (stale/export/export.py)
vae/, text_encoder/, lora/, denoiser.onnx, denoiser.pt2   optional, listed under config.json "files"
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT = "stale-export"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, PROVENANCE_FILE = "model.safetensors", "config.json", "provenance.json"
VAE_FOLDER = "vae"
TEXT_FOLDER = "text_encoder"
ONNX_FILE, PROGRAM_FILE = "denoiser.onnx", "denoiser.pt2"
LORA_DIR = "lora"
MODEL_TARGET = "stale.models.build_model"
DIFFUSION_TARGET = "stale.diffusion.objective.StaleObjective"
# from the run's `sample` node: StalePipeline's default settings, with these values where the run has none
SAMPLE_DEFAULTS = {"steps": 50, "sampler": "euler", "guidance": 1.0, "classifier_guidance": 0.0}


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
