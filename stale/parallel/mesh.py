"""The ("dp", "sp") device mesh of a run: data parallelism over clips, sequence parallelism inside one clip.

`parallel.sequence=P` splits the W processes into W / P data-parallel groups of P consecutive ranks (torch's
init_device_mesh order). The P ranks of a group hold the same clips (split by the dp rank:
`distributed_sampler_kwargs`), draw the same noise and each hold 1/P of every clip's tokens inside the blocks
(stale/parallel/sequence.py); gradients need nothing new (docs/parallel.md). With P = 1 no mesh is built.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from stale.parallel.sequence import SequenceParallel


class SequenceParallelMixin:
    """For a Lightning ParallelStrategy (before it in the bases): `sequence_parallel` ranks per clip."""

    def __init__(self, *args, sequence_parallel: int = 1, **kwargs):
        if isinstance(sequence_parallel, bool) or not isinstance(sequence_parallel, int) or sequence_parallel < 1:
            raise ValueError(f"parallel.sequence={sequence_parallel!r} must be an integer >= 1")
        super().__init__(*args, **kwargs)
        self.sequence_parallel = sequence_parallel
        self.mesh: DeviceMesh | None = None  # ("dp", "sp"), built once the processes have started
        self.sequence: SequenceParallel | None = None  # this rank's sequence-parallel group, P > 1 only

    def setup_environment(self) -> None:
        super().setup_environment()
        p, world = self.sequence_parallel, self.world_size
        if world % p:
            raise ValueError(
                f"parallel.sequence={p} must divide the number of processes, {world} "
                "(trainer.devices x trainer.num_nodes)"
            )
        if p > 1 and self.mesh is None:
            self.mesh = init_device_mesh(self.root_device.type, (world // p, p), mesh_dim_names=("dp", "sp"))
            self.sequence = SequenceParallel(self.mesh.get_group("sp"))

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Data is split over the dp groups: the ranks of one sequence-parallel group read the same clips."""
        if self.mesh is None:
            return super().distributed_sampler_kwargs
        dp = self.mesh["dp"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}


def sequence_parallel_of(trainer) -> SequenceParallel | None:
    """The SequenceParallel the training step shards over, or None (P = 1 or a strategy without it)."""
    strategy = trainer.strategy
    return strategy.sequence if isinstance(strategy, SequenceParallelMixin) else None
