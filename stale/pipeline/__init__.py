"""Inference: StalePipeline (an export or a checkpoint -> videos) and sample_to_dir, the library function behind
stale-sample."""

from stale.pipeline.stale_pipeline import StalePipeline

__all__ = ["StalePipeline"]
