"""A backbone's LoRA adapter in diffusers' own format, so that `pipe.load_lora_weights(folder)` loads what stale trained.

    pytorch_lora_weights.safetensors   keys `transformer.blocks.0.attn1.to_q.lora_A.weight`, `...lora_B.weight` (the
                                       diffusers module's own names, peft's adapter name left out); its safetensors
                                       metadata `lora_adapter_metadata` holds the LoraConfig under `transformer.*`
                                       keys, so rank and alpha (the update's scale alpha / rank) survive the trip

It is written by the family pipeline's own writer (WanPipeline.save_lora_weights, from the adapter's
`pipeline_class`) and read back here with peft into the backbone, as stale.models.finetune injects it for training:
the same layers, the same names, the same forward.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from stale.models.finetune import adapted_modules, base_name, require_peft
from stale.utils.hashing import weights_sha256

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: load_lora_weights' first guess
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."  # the backbone's diffusers module, and the pipeline component the LoRA belongs to


def base_sha256(model: nn.Module) -> str:
    """The hash of the backbone's transformer without its adapters, under its own names: what pretrained_base()
    records before injection, so an adapter is only ever loaded onto the base it was trained on."""
    state = {base_name(k): v for k, v in model.transformer.state_dict().items() if ".lora_" not in k}
    return weights_sha256(state)


def save_diffusers_lora(model: nn.Module, out: str | Path) -> Path:
    """Write the backbone's LoRA adapter as out/pytorch_lora_weights.safetensors with the family pipeline's writer."""
    require_peft()
    import diffusers
    from peft import get_peft_model_state_dict

    cls = type(model).pipeline_class
    if not cls:
        raise ValueError(f"{type(model).__name__} names no diffusers pipeline_class: its LoRA cannot be exported")
    configs = getattr(model, "peft_config", {})
    if list(configs) != ["default"]:
        raise ValueError(f"expected one LoRA adapter named 'default' on the backbone, found {sorted(configs)}")
    state = get_peft_model_state_dict(model)  # transformer.blocks.0.attn1.to_q.lora_A.weight, ...
    outside = [k for k in state if not k.startswith(PREFIX)]
    if outside:
        raise ValueError(f"LoRA layers outside the diffusers module ({outside[:3]}) have no place in diffusers' format")
    layers = {k.removeprefix(PREFIX): v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = configs["default"].to_dict()
    # peft shortens the target list to suffixes once injected ("to_q", "2"); the full names load anywhere
    metadata["target_modules"] = sorted(n.removeprefix(PREFIX) for n in adapted_modules(model))
    out = Path(out)
    getattr(diffusers, cls).save_lora_weights(
        str(out), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    return out / LORA_WEIGHTS


def load_diffusers_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter of a pytorch_lora_weights.safetensors that save_diffusers_lora wrote into the backbone, in
    place (peft, adapter name 'default'), for inference. Its keys must fill every adapter layer exactly."""
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no '{METADATA_KEY}' (the LoraConfig: rank, alpha, target modules)")
    kwargs = {k.removeprefix(PREFIX): v for k, v in json.loads(raw).items() if k.startswith(PREFIX)}
    kwargs["target_modules"] = [PREFIX + n for n in kwargs.get("target_modules") or []]
    try:
        inject_adapter_in_model(LoraConfig(**kwargs), model)
    except (TypeError, ValueError) as err:  # a module the backbone does not have, a config from another peft
        raise ValueError(f"{path}: the adapter does not fit this backbone: {err}") from None
    state = load_file(str(path))
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: adapter weights do not fit the backbone (missing {missing[:4]}, unexpected "
            f"{list(result.unexpected_keys)[:4]})"
        )
    return model
