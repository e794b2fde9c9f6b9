"""Read an export folder (stale-export's output; layout.py): its JSON config (allow-listed targets only), its
safetensors weights, and the frozen parts it carries (vae/, text_encoder/). No pickle anywhere. StalePipeline and
init_from read exports through this one function. A pretrained backbone's export (config.json "transformer") is
rebuilt from its own transformer/ folder, or from its pretrained base (checked by hash) plus its diffusers-format
LoRA, with stale's own parts from model.safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from stale.checkpoint.frozen_parts import autoencoder_from_node, text_encoder_from_node
from stale.checkpoint.layout import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE
from stale.checkpoint.registry import build, check_targets
from stale.models.pretrained.lora import PREFIX, base_sha256, load_diffusers_lora


class ExportError(ValueError):
    """An export folder that is incomplete, malformed or from an unknown format; the message names the file."""


@dataclass
class Export:
    path: Path
    config: dict  # config.json
    model: torch.nn.Module  # with the export's weights (and a LoRA adapter, if one was given)
    objective: object  # the StaleObjective of config.json's "diffusion" node (its prior and scale)
    autoencoder: object = None  # a latent model's stale.latent Autoencoder, from the export's own copy
    text_encoder: object = None  # a model.cond=text model's stale.text encoder


def backbone_node(path: Path, config: dict) -> dict:
    """The model node of a backbone export, its own transformer folder resolved against the export folder."""
    node, transformer = dict(config["model"]), config["transformer"]
    if "folder" in transformer:
        folder = path / str(transformer["folder"])
        if not (folder / "config.json").is_file():
            raise ExportError(
                f"{path / CONFIG_FILE}: transformer.folder={transformer['folder']!r} is no model folder "
                f"inside {path} ({folder / 'config.json'} does not exist)"
            )
        node.update(pretrained=str(folder), subfolder=None, revision=None)
    elif "base" not in transformer or "lora" not in transformer:
        raise ExportError(f"{path / CONFIG_FILE}: 'transformer' names neither a folder nor a base and a lora")
    return node


def check_base(model: torch.nn.Module, base: dict, cfg_path: Path) -> None:
    """A LoRA goes only onto the base it was trained on: the same weights, by their hash."""
    found = base_sha256(model)
    if found != base.get("sha256"):
        raise ExportError(
            f"{cfg_path}: the LoRA's base model.pretrained={base.get('pretrained')} (subfolder "
            f"{base.get('subfolder')}) holds other weights than it was trained on (sha256 {found[:12]}..., not "
            f"{str(base.get('sha256'))[:12]}...): restore that base"
        )


def read_export(
    path: str | Path, device: str | torch.device = "cpu", lora: str | Path | None = None, frozen_parts: bool = True
) -> Export:
    """Load an export folder. `lora`: an adapter folder (stale-export merge=false) injected into the model
    (stale.models.finetune.load_adapter); frozen_parts=False skips the autoencoder and text encoder (init_from
    needs only the weights)."""
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise ExportError(f"{f} does not exist: {path} is not a stale export (run stale-export first)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ExportError(
            f"{cfg_path}: format={config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r}"
        )
    if not isinstance(config.get("format_version"), int) or config["format_version"] > FORMAT_VERSION:
        raise ExportError(
            f"{cfg_path}: format_version={config.get('format_version')!r}; this stale reads "
            f"versions <= {FORMAT_VERSION}"
        )
    for key in ("model", "diffusion"):
        if not isinstance(config.get(key), dict):
            raise ExportError(f"{cfg_path} has no '{key}' mapping")
    check_targets(config, str(cfg_path))  # refuse before building anything
    transformer = config.get("transformer")  # a pretrained backbone's: where its diffusers module is
    if transformer is not None and not isinstance(transformer, dict):
        raise ExportError(f"{cfg_path}: 'transformer' must be a mapping, got {transformer!r}")
    model = build(backbone_node(path, config) if transformer else config["model"], where=f"{cfg_path}: model")
    objective = build(config["diffusion"], where=f"{cfg_path}: diffusion")  # validates the prior
    if transformer and "base" in transformer:
        check_base(model, transformer["base"], cfg_path)
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{weights_path} is not a readable safetensors file: {err}") from None
    try:
        result = model.load_state_dict(state, strict=not transformer)
    except RuntimeError as err:
        raise ExportError(f"{weights_path} does not fit the model in {cfg_path}: {err}") from None
    if transformer:  # stale's own parts only: the transformer's weights came from its folder or the base
        missing = [k for k in result.missing_keys if not k.startswith(PREFIX)]
        if missing or result.unexpected_keys:
            raise ExportError(
                f"{weights_path} does not fit the backbone in {cfg_path}: missing {missing[:4]}, "
                f"unexpected {list(result.unexpected_keys)[:4]}"
            )
        if "lora" in transformer:
            try:
                load_diffusers_lora(model, path / str(transformer["lora"]))
            except (ValueError, RuntimeError, OSError, SafetensorError) as err:
                raise ExportError(f"{cfg_path}: transformer.lora: {err}") from None
    if lora is not None:
        from stale.models.finetune import load_adapter  # imports peft: only when asked for

        load_adapter(model, lora)
    if not frozen_parts:
        return Export(path, config, model, objective)
    vae = config.get("vae")
    autoencoder = None
    if vae is not None:
        if not isinstance(vae, dict) or not (path / str(vae.get("pretrained"))).is_dir():
            raise ExportError(f"{cfg_path}: 'vae' names no autoencoder folder inside {path}")
        try:
            autoencoder = autoencoder_from_node(vae, f"{cfg_path}: vae", device, folder=path / vae["pretrained"])
        except ValueError as err:
            raise ExportError(str(err)) from None
    text = config.get("text_encoder")
    text_encoder = None
    if text is not None:
        local = path / str(text.get("pretrained")) if text.get("name") == "hf" else None
        if local is not None and not local.is_dir():
            raise ExportError(f"{cfg_path}: 'text_encoder' names no text encoder folder inside {path}")
        try:
            text_encoder = text_encoder_from_node(text, f"{cfg_path}: text_encoder", device, folder=local)
        except ValueError as err:
            raise ExportError(str(err)) from None
    return Export(path, config, model, objective, autoencoder, text_encoder)
