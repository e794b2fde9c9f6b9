"""Export a trained model out of Lightning: safetensors weights + plain-JSON config, and optional graphs.

The folder's files (stale/checkpoint/layout.py, docs/export.md): model.safetensors (the EMA weights by default, no
pickle), config.json (the model and diffusion nodes, default sampling settings, weights, files), provenance.json
(the training run's commit, packages and config, the checkpoint, the exporting environment), and optionally vae/,
denoiser.onnx (stale/export/onnx.py), denoiser.pt2 (torch.export; its loader may unpickle, so StalePipeline never
reads it) and lora/ (merge=false: the adapter in peft's layout, model.safetensors the base without it). A
pretrained backbone's export is a diffusers folder too (stale/export/backbone.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from stale.checkpoint.layout import (
    CONFIG_FILE,
    DIFFUSION_TARGET,
    FORMAT,
    FORMAT_VERSION,
    LORA_DIR,
    MODEL_TARGET,
    ONNX_FILE,
    PROGRAM_FILE,
    PROVENANCE_FILE,
    SAMPLE_DEFAULTS,
    TEXT_FOLDER,
    VAE_FOLDER,
    WEIGHTS_FILE,
    sha256,
)
from stale.checkpoint.registry import build
from stale.checkpoint.weights import read_checkpoint
from stale.export.backbone import is_backbone, save_backbone, save_pipeline_index, write_notes
from stale.export.onnx import check_onnx, export_onnx, export_program
from stale.models.finetune import Finetune, has_adapters, merged, save_adapter, unmerged_base
from stale.utils.provenance import provenance

log = logging.getLogger("stale")


def model_node(model: torch.nn.Module, name: str | None = None) -> dict:
    """The config.json node that rebuilds `model`: every StaleConfig field, so later default changes cannot drift it."""
    fields = dataclasses.asdict(model.config)
    fields["grad_checkpointing"] = False  # a training-time memory option
    # `name` picks SIZES defaults in build_model; every field is given explicitly, so it only labels the size.
    return {"_target_": MODEL_TARGET, "name": name or "tiny", **fields}


def diffusion_node(diffusion: dict | None) -> dict:
    node = {k: v for k, v in (diffusion or {}).items() if k != "_target_"}
    return {"_target_": DIFFUSION_TARGET, **node}


def _json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return path


def save_pretrained(
    model: torch.nn.Module,
    out: str | Path,
    *,
    name: str | None = None,
    diffusion: dict | None = None,
    sample: dict | None = None,
    weights: str = "ema",
    provenance_record: dict | None = None,
    autoencoder=None,
    text_encoder=None,
    merge: bool = True,
) -> dict[str, Path]:
    """Write model.safetensors, config.json and provenance.json for `model` into `out` (and the autoencoder's
    copy into out/vae/ for a latent model; a text model's encoder: text_encoder=hf's copy, with its tokenizer,
    into out/text_encoder/, the learned encoder's vocabulary into config.json). A pretrained backbone also writes
    its diffusers parts (stale/export/backbone.py); merge: a backbone's LoRA folded into transformer/ (true) or
    written as pytorch_lora_weights.safetensors (false)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = None
    if is_backbone(model):
        backbone = save_backbone(model, out, merge, build(diffusion_node(diffusion), where="diffusion").prior)
        state = backbone.state
    else:
        # safetensors refuses tensors that share memory or are not contiguous: store independent copies.
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    paths = {"weights": out / WEIGHTS_FILE}
    save_file(
        state, str(paths["weights"]), metadata={"format": "pt", "stale_export": str(FORMAT_VERSION), "weights": weights}
    )
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": backbone.node if backbone else model_node(model, name),
        "diffusion": diffusion_node(diffusion),
        "sample": {k: v for k, v in (sample or {}).items() if k in SAMPLE_DEFAULTS},
        "weights": weights,
        "files": {"weights": WEIGHTS_FILE},
    }
    if backbone:
        config["transformer"] = backbone.entry
        paths.update(backbone.paths)
        config["files"].update(backbone.files)
    if autoencoder is not None:
        paths["vae"] = autoencoder.save(out / VAE_FOLDER)
        config["vae"] = {**autoencoder.node(), "source": autoencoder.source["pretrained"], "pretrained": VAE_FOLDER}
        config["files"]["vae"] = VAE_FOLDER
    if text_encoder is not None:
        node = dict(text_encoder.source)
        if node["name"] == "hf":
            paths["text_encoder"] = text_encoder.save(out / TEXT_FOLDER)
            node.update(source=node["pretrained"], pretrained=TEXT_FOLDER, subfolder=None, tokenizer_subfolder=None)
            config["files"]["text_encoder"] = TEXT_FOLDER
        config["text_encoder"] = node
    if backbone and "folder" in backbone.entry:  # a whole transformer: a diffusers pipeline folder when it can be
        index = save_pipeline_index(out, model, autoencoder, text_encoder)
        if index is not None:
            paths["pipeline"] = index
            config["files"]["pipeline"] = index.name
    if backbone:
        paths["notes"] = write_notes(out, config)
        config["files"]["notes"] = paths["notes"].name
    paths["config"] = _json(out / CONFIG_FILE, config)
    paths["provenance"] = _json(out / PROVENANCE_FILE, provenance_record or {"export": provenance()})
    return paths


def check_backbone_export(source, model: torch.nn.Module, merge: bool, onnx: bool, torch_export: bool) -> None:
    """What a backbone's export cannot write, refused before anything is written."""
    if onnx or torch_export:
        raise ValueError(
            f"onnx=true / torch_export=true: not supported for a pretrained backbone ({model.config.family}); "
            "export with onnx=false torch_export=false (diffusers reads transformer/)"
        )
    if merge or not has_adapters(model):
        return
    # merge=false keeps the pretrained base as it is: a base tensor that trained beside the adapter has no place
    trained = [k for k in source.state_dict if k.startswith("transformer.") and ".lora_" not in k]
    if trained:
        raise ValueError(
            f"merge=false: {len(trained)} tensors of the pretrained transformer trained beside the LoRA "
            f"({', '.join(trained[:3])}), which diffusers' LoRA format cannot carry: export with merge=true"
        )


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    weights: str = "ema",
    onnx: bool = False,
    torch_export: bool = False,
    opset: int | None = None,
    trace_batch: int = 2,
    check: bool = True,
    tolerance: float = 1e-4,
    merge: bool = True,
) -> dict:
    """Export a stale-train checkpoint (loaded with weights_only=True) to `out`. Returns paths and checks.
    merge: for a LoRA checkpoint, fold the adapter into the weights (true) or write it beside the base (false)."""
    ckpt, out = Path(ckpt), Path(out)
    source = read_checkpoint(ckpt, weights)
    model = source.build_model()
    run = source.run_config
    adapter = None
    backbone = is_backbone(model)
    if backbone:
        check_backbone_export(source, model, merge, onnx, torch_export)
    elif has_adapters(model):
        adapter = None if merge else model
        model = merged(model) if merge else build({**run["model"], "grad_checkpointing": False}, where=str(ckpt))
        if not merge:
            model.load_state_dict(unmerged_base(adapter), strict=True)
        model.eval()
    record = {
        "training": source.provenance,  # git commit, package versions, ... of the training run
        "run_config": {k: v for k, v in run.items() if k != "provenance"},
        "checkpoint": {
            "path": str(ckpt.resolve()),
            "sha256": sha256(ckpt),
            "global_step": source.global_step,
            "epoch": source.epoch,
            "weights": weights,
            **source.extra,
        },
        "export": provenance(),
    }
    if record["training"] is None:
        log.warning(
            "checkpoint %s carries no provenance; provenance.json records "
            "only the checkpoint and the exporting environment",
            ckpt,
        )
    paths = save_pretrained(
        model,
        out,
        name=run["model"].get("name"),
        diffusion=run.get("diffusion"),
        sample=run.get("sample"),
        weights=weights,
        provenance_record=record,
        autoencoder=source.build_autoencoder(),
        text_encoder=source.build_text_encoder(),
        merge=merge,
    )
    result: dict = {"paths": paths, "checks": {}}
    config = json.loads(paths["config"].read_text())
    if adapter is not None:
        ft = Finetune(**{k: v for k, v in run["finetune"].items() if k != "_target_"})
        paths.update(save_adapter(adapter, ft, out / LORA_DIR))
        config["files"]["lora"] = LORA_DIR
        _json(paths["config"], config)
    if onnx or torch_export:
        program = export_program(model, trace_batch)
        if torch_export:
            paths["torch_export"] = out / PROGRAM_FILE
            torch.export.save(program, str(paths["torch_export"]))
            config["files"]["torch_export"] = PROGRAM_FILE
        if onnx:
            paths["onnx"] = export_onnx(model, out / ONNX_FILE, opset=opset, program=program)
            config["files"]["onnx"] = ONNX_FILE
            if check and importlib.util.find_spec("onnxruntime") is None:
                log.warning("onnxruntime is not installed: %s was written but not checked", paths["onnx"])
            elif check:
                diff = check_onnx(paths["onnx"], model)
                result["checks"]["onnx_max_abs_diff"] = diff
                if not diff <= tolerance:
                    raise RuntimeError(
                        f"{paths['onnx']}: onnxruntime differs from PyTorch by {diff:.3g} (> {tolerance:g}) in fp32"
                    )
        _json(paths["config"], config)
    written = {p.name for p in paths.values()} | ({ONNX_FILE + ".data"} if onnx else set())
    for name in (ONNX_FILE, ONNX_FILE + ".data", PROGRAM_FILE):
        if (out / name).exists() and name not in written:
            log.warning(
                "%s is left over from an earlier export into %s (config.json does not list it): "
                "delete it or export into an empty folder",
                out / name,
                out,
            )
    return result
