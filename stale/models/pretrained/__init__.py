"""Pretrained diffusers video transformers as backbones (docs/pretrained.md): the seam and one adapter per family."""

from stale.models.pretrained import ltx, wan  # noqa: F401  (each registers its family)
from stale.models.pretrained.backbone import (
    FAMILIES,
    BackboneConfig,
    BackboneError,
    PretrainedBackbone,
    backbone_config,
    load_backbone,
)

__all__ = ["FAMILIES", "BackboneConfig", "BackboneError", "PretrainedBackbone", "backbone_config", "load_backbone"]
