"""Which share of the data this process reads: its data-parallel rank and size (a leaf: no stale imports)."""

from __future__ import annotations


def data_parallel_rank_world(trainer) -> tuple[int, int]:
    """(dp rank, dp size) of a trainer: (global rank, world size) unless sequence parallelism groups ranks."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)  # ParallelStrategy's public property
    if kwargs is None:  # one device
        return int(trainer.global_rank), int(trainer.world_size)
    return int(kwargs["rank"]), int(kwargs["num_replicas"])
