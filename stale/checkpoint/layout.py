"""The layout of an export folder, shared by its writer (stale.export) and its readers (export_reader.py, StalePipeline).

model.safetensors   the weights (EMA by default), no pickle
config.json         {"format", "format_version", "model": {"_target_": MODEL_TARGET, ...},
                     "diffusion": {"_target_": DIFFUSION_TARGET, ...}, "sample", "weights", "files", ["vae"],
                     ["text_encoder"]}
provenance.json     what produced it (stale/export/export.py)
vae/, text_encoder/, lora/, denoiser.onnx, denoiser.pt2   optional, listed under config.json "files"

A pretrained backbone's export (model._target_ = BACKBONE_TARGET) is at the same time a diffusers folder: stale
reads config.json, diffusers reads model_index.json and the component subfolders (transformer/,
pytorch_lora_weights.safetensors), and each ignores the other's files. model.safetensors then holds only stale's
own parts (joy_token, head.*), and config.json's "transformer" says where the transformer is: {"folder":
"transformer"} (the export's own copy, resolved against the export folder) or {"base": {pretrained, subfolder,
revision, sha256}, "lora": LORA_WEIGHTS_FILE}. docs/export.md has the table of files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from stale.models.pretrained.lora import LORA_WEIGHTS

FORMAT = "stale-export"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, PROVENANCE_FILE = "model.safetensors", "config.json", "provenance.json"
VAE_FOLDER = "vae"
TEXT_FOLDER = "text_encoder"
ONNX_FILE, PROGRAM_FILE = "denoiser.onnx", "denoiser.pt2"
LORA_DIR = "lora"
MODEL_TARGET = "stale.models.build_model"
BACKBONE_TARGET = "stale.models.load_backbone"  # a pretrained diffusers backbone's model node
TRANSFORMER_FOLDER = "transformer"  # a backbone's diffusers module (its save_pretrained)
LORA_WEIGHTS_FILE = LORA_WEIGHTS  # a backbone's LoRA in diffusers' format (stale/models/pretrained/lora.py)
PIPELINE_INDEX = "model_index.json"  # diffusers' pipeline index
NOTES_FILE = "README.md"
DIFFUSION_TARGET = "stale.diffusion.objective.StaleObjective"
# from the run's `sample` node: StalePipeline's default settings, with these values where the run has none
# (scheduler: a diffusers flow scheduler's config, the sampling grid of a backbone's family; None: stale's grid)
SAMPLE_DEFAULTS = {"steps": 50, "sampler": "euler", "guidance": 1.0, "classifier_guidance": 0.0, "scheduler": None}


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
