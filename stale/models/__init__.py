"""Models: plain nn.Modules, no Lightning."""

from stale.models.stale_transformer import SIZES, StaleConfig, StaleTransformer, build_model

__all__ = ["SIZES", "StaleConfig", "StaleTransformer", "build_model"]
