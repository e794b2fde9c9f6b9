"""FSDP2 (`trainer=fsdp`, `trainer=fsdp_cpu`): per-block `fully_shard`, the EMA as shards, whole copies for sampling.

`shard_model` applies torch's `fully_shard` to every block (`model.blocks`) and then to the whole model, over a 1-D
mesh of all W processes (with `parallel.sequence=P` the P ranks of a clip shard too, so the reduce-scatter takes
the same mean as DDP's all-reduce; docs/parallel.md). Activation checkpointing is the model's own.

`ShardedEMA` is the EMA for such a model (Lightning's WeightAveraging deep-copies the module, which FSDP2 refuses):
each rank averages the shards it holds with stale.system.ema's foreach lerp; the whole average exists only when
gathered, for a checkpoint (saved exactly like a DDP run's EMA) and for sampling (`gathered_copy`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from stale.models import blank_model

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0 only, in CPU memory


def shard_model(model: nn.Module, device_type: str, world_size: int, precision: str) -> None:
    """fully_shard each block, then the root (which takes the remaining parameters). Idempotent.

    precision bf16-mixed: blocks compute with bf16 copies of the parameters (half the all-gather) and gradients
    are reduced in fp32; the sharded parameters, the optimiser and the EMA stay fp32. Otherwise plain fp32."""
    if isinstance(model, FSDPModule):
        return
    mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    bf16 = str(precision).startswith("bf16")
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for block in model.blocks:  # the Stale Transformer's StaleBlocks, or a pretrained family's blocks
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def sharded_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters as shards. FSDP2 leaves the root's parameters gathered after a forward without
    backward (validation, sampling): reshard first, so that parameters() yields the sharded DTensors."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return list(module.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of a DTensor (same storage), else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def gathered_copy(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded) copy of a sharded model with its whole weights, on rank 0; None elsewhere.

    Collective: every rank must call it. Built from model.config like every other reader of stale weights."""
    state = get_model_state_dict(model, options=FULL)
    if dist.get_rank() != 0:
        return None
    shard = _local(next(model.parameters()))
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation leaves training's RNG alone
        plain = blank_model(model.config)  # not type(model): fully_shard made that an FSDP subclass
    plain.to(device=shard.device, dtype=shard.dtype).load_state_dict(state, strict=True)
    return plain


class ShardedEMA:
    """The moving average of a sharded module's parameters, as shards with the parameters' placements.

    Follows torch's AveragedModel(use_buffers=False) step for step: the first update copies the parameters, the
    later ones apply `avg_fn` (the callback's multi-tensor EMA) to the local shards."""

    def __init__(self, avg_fn: Callable):
        self.avg_fn = avg_fn
        self.average: list[torch.Tensor] = []
        self.n_averaged = 0

    def track(self, module: nn.Module) -> None:
        """Start from a copy of the module's (sharded) parameters; n_averaged = 0 as in AveragedModel."""
        self.average = [p.detach().clone() for p in sharded_parameters(module)]
        self.n_averaged = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        average = [_local(a) for a in self.average]
        current = [_local(p.detach()) for p in sharded_parameters(module)]
        if self.n_averaged == 0:
            torch._foreach_copy_(average, current)
        else:
            self.avg_fn(average, current, self.n_averaged)
        self.n_averaged += 1

    @torch.no_grad()
    def swap(self, module: nn.Module) -> None:
        """Exchange the module's parameters and the average, shard by shard (no communication)."""
        for a, p in zip(self.average, sharded_parameters(module), strict=True):
            tmp = _local(a).clone()
            _local(a).copy_(_local(p))
            _local(p).copy_(tmp)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        torch._foreach_copy_([_local(p) for p in sharded_parameters(module)], [_local(a) for a in self.average])

    @contextmanager
    def swapped(self, module: nn.Module):
        """The module holds the average inside the block, its own weights again after."""
        self.swap(module)
        try:
            yield
        finally:
            self.swap(module)

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The average as the module's full state dict (buffers included), on rank 0; {} elsewhere. Collective."""
        with self.swapped(module):
            return get_model_state_dict(module, options=FULL)

    def load_full_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor], n_averaged: int) -> None:
        """Set the average from a full state dict (every rank holds it, e.g. read from a checkpoint file)."""
        with self.swapped(module):
            # a copy: torch's set_model_state_dict replaces the dict's tensors by shards in place
            set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True))
        self.n_averaged = int(n_averaged)
