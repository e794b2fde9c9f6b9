"""Models: plain nn.Modules, no Lightning."""

from stale.models.flops import count_parameters, training_flops_per_clip
from stale.models.stale_transformer import SIZES, StaleBlock, StaleConfig, StaleTransformer, build_model, model_config

__all__ = [
    "SIZES",
    "StaleBlock",
    "StaleConfig",
    "StaleTransformer",
    "build_model",
    "count_parameters",
    "model_config",
    "training_flops_per_clip",
]
