"""A pretrained backbone's export: back to the diffusers ecosystem (the layout is stale/checkpoint/layout.py's).

A full fine-tune (or a LoRA with merge=true) writes the diffusers module itself into transformer/ with its own
save_pretrained, and, when the vae and the text encoder came from the transformer's own pipeline, the pipeline's
model_index.json beside them, so `WanPipeline.from_pretrained(EXPORT)` runs it. A LoRA with merge=false writes
pytorch_lora_weights.safetensors in diffusers' key format instead (stale/models/pretrained/lora.py), for
`pipe.load_lora_weights(EXPORT)` on the base pipeline. stale's own parts (the joy token, the hinge head) go into
model.safetensors either way, so StalePipeline rebuilds the whole backbone from the folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stale.checkpoint.layout import BACKBONE_TARGET, LORA_WEIGHTS_FILE, NOTES_FILE, PIPELINE_INDEX, TRANSFORMER_FOLDER
from stale.models.finetune import has_adapters, merged
from stale.models.pretrained import PretrainedBackbone
from stale.models.pretrained.lora import PREFIX, base_sha256, save_diffusers_lora

log = logging.getLogger("stale")
WRITTEN = ("transformer", "vae", "text_encoder")  # the pipeline components an export writes itself
LIBRARIES = ("diffusers", "transformers")  # where the other components of model_index.json may come from


def is_backbone(model: torch.nn.Module) -> bool:
    return isinstance(model, PretrainedBackbone)


def backbone_node(model: PretrainedBackbone, folder: str | None = None) -> dict:
    """The config.json node that rebuilds `model` through load_backbone: the run's BackboneConfig fields (the widths
    come from the transformer's own config.json again). folder: the export's own transformer folder."""
    fields = dataclasses.asdict(model.config)
    own = set(type(model).widths(dict(model.transformer.config))) - {"in_channels", "text_dim"}  # these are checked
    fields = {k: v for k, v in fields.items() if k not in own and k != "family"}
    fields["grad_checkpointing"] = False  # a training-time memory option
    if folder is not None:
        fields.update(pretrained=folder, subfolder=None, revision=None)
    return {"_target_": BACKBONE_TARGET, **fields}


@dataclass
class Written:
    node: dict  # config.json "model"
    entry: dict  # config.json "transformer"
    state: dict  # model.safetensors: stale's own tensors
    paths: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def save_backbone(model: PretrainedBackbone, out: Path, merge: bool, prior: str) -> Written:
    """transformer/ (full, or merged LoRA) or pytorch_lora_weights.safetensors (merge=false) into `out`."""
    state = {
        k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith(PREFIX)
    }
    c = model.config
    if has_adapters(model) and not merge:
        path = save_diffusers_lora(model, out)
        base = {"pretrained": c.pretrained, "subfolder": c.subfolder, "revision": c.revision}
        entry = {"base": {**base, "sha256": base_sha256(model)}, "lora": LORA_WEIGHTS_FILE}
        return Written(backbone_node(model), entry, state, {"lora": path}, {"lora": LORA_WEIGHTS_FILE})
    plain = merged(model) if has_adapters(model) else model  # peft's merge, unwrapped: the module's own names
    folder = out / TRANSFORMER_FOLDER
    plain.transformer.save_pretrained(str(folder), safe_serialization=True)
    if prior != "gaussian":  # diffusers ignores unknown config keys, warning with their values when it loads
        config = json.loads((folder / "config.json").read_text())
        config["stale_prior"] = prior
        config["stale_note"] = f"trained from stale's {prior} prior: sample it with StalePipeline ({NOTES_FILE})"
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    entry = {"folder": TRANSFORMER_FOLDER, "class": c.family}
    return Written(
        backbone_node(model, TRANSFORMER_FOLDER), entry, state, {"transformer": folder}, {"transformer": folder.name}
    )


def pipeline_source(model: PretrainedBackbone, autoencoder, text_encoder) -> str | None:
    """The pipeline repository the transformer, the vae and the text encoder all came from, else None."""
    c = model.config
    if autoencoder is None or text_encoder is None or c.subfolder != "transformer":
        return None
    sources = {c.pretrained, autoencoder.source.get("pretrained"), text_encoder.source.get("pretrained")}
    return c.pretrained if len(sources) == 1 else None


def save_pipeline_index(out: Path, model: PretrainedBackbone, autoencoder, text_encoder) -> Path | None:
    """model_index.json and the pipeline's components stale does not write (tokenizer, scheduler, ...), copied from
    the source pipeline through their own classes, so that diffusers loads `out` as a pipeline. None (and a log line)
    when the parts did not come from one pipeline."""
    source = pipeline_source(model, autoencoder, text_encoder)
    if source is None:
        log.info("the vae and text encoder did not come from the transformer's pipeline: no %s", PIPELINE_INDEX)
        return None
    from diffusers import DiffusionPipeline

    revision = model.config.revision
    try:
        index = dict(DiffusionPipeline.load_config(source, revision=revision))
    except (OSError, ValueError) as err:
        log.warning("%s has no readable %s (%s): the export is no pipeline folder", source, PIPELINE_INDEX, err)
        return None
    missing = [name for name in WRITTEN if name not in index]
    if missing:
        log.warning("%s's %s has no %s component: the export is no pipeline folder", source, PIPELINE_INDEX, missing)
        return None
    for name, spec in index.items():
        if name.startswith("_") or name in WRITTEN or not isinstance(spec, list) or spec[0] is None:
            continue  # private keys, stale's own copies, plain settings (Wan 2.2's boundary_ratio), absent parts
        library, cls = spec
        component = getattr(importlib.import_module(library), cls, None) if library in LIBRARIES else None
        if not hasattr(component, "from_pretrained"):
            raise ValueError(
                f"{source}/{PIPELINE_INDEX}: component {name}={spec} is not a {' or '.join(LIBRARIES)} class "
                "with from_pretrained: it cannot be copied into the export"
            )
        component.from_pretrained(source, subfolder=name, revision=revision).save_pretrained(str(out / name))
    path = out / PIPELINE_INDEX
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def write_notes(out: Path, config: dict) -> Path:
    """README.md: how the ecosystem loads this export, and the prior it must be sampled from."""
    prior, family = config["diffusion"].get("prior", "uniform"), config["transformer"].get("class", "")
    entry = config["transformer"]
    lines = [f"# stale export: a fine-tuned {config['model'].get('pretrained') if 'base' in entry else family}", ""]
    lines += ["With stale (the joy token, the hinge head and the prior included):", ""]
    lines += ["    stale-sample model=THIS_FOLDER prompt='...'", ""]
    pipeline = "DiffusionPipeline"
    if "folder" in entry:
        if (out / PIPELINE_INDEX).is_file():
            pipeline = json.loads((out / PIPELINE_INDEX).read_text()).get("_class_name", pipeline)
            lines += [f"With diffusers: `{pipeline}.from_pretrained(THIS_FOLDER)`, or the transformer alone:", ""]
        lines += [f"    {family or 'the model class'}.from_pretrained(THIS_FOLDER, subfolder='{entry['folder']}')", ""]
    else:
        base = entry["base"]
        lines += [f"With diffusers: the base pipeline {base['pretrained']} and this LoRA:", ""]
        lines += ["    pipe = DiffusionPipeline.from_pretrained(BASE)", "    pipe.load_lora_weights(THIS_FOLDER)", ""]
    if config["model"].get("joy", False):
        lines += [
            "diffusers runs the transformer without stale's joy token (one fixed token appended to the sequence, "
            "which every self-attention saw in training), so its velocity differs slightly from stale's.",
            "",
        ]
    if prior == "gaussian":
        lines += ["Prior: Gaussian, the family's own: a diffusers pipeline samples it from the right noise.", ""]
    else:
        lines += [
            f"**Prior: {prior}.** This model was trained to carry stale's {prior} prior (U[-s, s] noise, s = "
            f"{config['diffusion'].get('prior_scale') or 1.0}: config.json diffusion) to the data. A diffusers pipeline starts from Gaussian noise (randn) and would sample it from the wrong "
            "prior: its first steps see inputs the model never saw at high noise. Sample it with stale "
            "(StalePipeline or stale-sample), which reads the prior from config.json.",
            "",
        ]
    path = out / NOTES_FILE
    path.write_text("\n".join(lines))
    return path
