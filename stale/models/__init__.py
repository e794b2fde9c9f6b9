"""Models: plain nn.Modules, no Lightning."""

import dataclasses

from stale.models.flops import count_parameters, training_flops_per_clip
from stale.models.pretrained import BackboneConfig, backbone_config, load_backbone
from stale.models.pretrained.backbone import blank_backbone
from stale.models.stale_transformer import SIZES, StaleBlock, StaleConfig, StaleTransformer, build_model, model_config

# The model nodes a config may name (conf/model/*.yaml `_target_`): each builds a model, and its config function
# returns that model's config without building it (the checks before training read it), from the node's keys.
MODEL_NODES = {
    "stale.models.build_model": (model_config, {"name"} | {f.name for f in dataclasses.fields(StaleConfig)}),
    "stale.models.load_backbone": (backbone_config, {f.name for f in dataclasses.fields(BackboneConfig)}),
}


def config_of(node: dict):
    """The StaleConfig or BackboneConfig a model node (its `_target_` and keys) builds, without building the model."""
    target = node.get("_target_", "stale.models.build_model")
    if target not in MODEL_NODES:
        raise ValueError(f"model._target_={target!r} is not one of {sorted(MODEL_NODES)}")
    return MODEL_NODES[target][0](**{k: v for k, v in node.items() if k != "_target_"})


def blank_model(config):
    """A model of `config` (a StaleConfig or BackboneConfig) with fresh weights, to load a whole state dict into."""
    return blank_backbone(config) if isinstance(config, BackboneConfig) else StaleTransformer(config)


__all__ = [
    "MODEL_NODES",
    "SIZES",
    "BackboneConfig",
    "StaleBlock",
    "StaleConfig",
    "StaleTransformer",
    "backbone_config",
    "blank_model",
    "build_model",
    "config_of",
    "count_parameters",
    "load_backbone",
    "model_config",
    "training_flops_per_clip",
]
