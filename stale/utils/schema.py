"""The key schema of stale's configs: which keys each node accepts, and errors that list them.

Hydra's struct mode refuses a typo on the command line (`optim.lrr=0.1`) but names only the key, then suggests
`+optim.lrr=0.1`, which it accepts silently; so is a typo inside a YAML file, and a misspelt key that trains with
the default is the worst kind of error in a sweep. check_train_keys() refuses every key its node's schema lacks,
naming the nodes' keys and the nearest one. The schema comes from the code, so it cannot drift from it: a
`_target_` node accepts its target's parameters (following `**kwargs` up stale's class hierarchy, and into
FORWARDS for third-party classes; docs/training.md), the model node the keys its caller passes, plain nodes the
dataclasses below; `logger` and `callbacks` are dicts of target nodes, `paths` and `hydra` are free.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any, Callable

from omegaconf import DictConfig

PRIVATE = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}  # Hydra's instantiate keywords
MOVED_KEYS = {"data.caption_dropout": "diffusion.caption_dropout"}  # a key that moved -> where it lives now


@dataclasses.dataclass
class SampleSchema:
    num_videos: int
    steps: int
    sampler: str
    guidance: float
    classifier_guidance: float
    progress: bool
    seed: int
    prompts: Any  # model.cond=text
    scheduler: Any  # null | a diffusers flow scheduler's config (stale.diffusion.samplers.read_scheduler checks it)


@dataclasses.dataclass
class ParallelSchema:
    """The parallel node of conf/train.yaml (docs/parallel.md)."""

    sequence: int  # ranks that split each clip's tokens (sequence parallelism)


@dataclasses.dataclass
class TrainSchema:
    """The root of conf/train.yaml: every top-level key stale-train reads."""

    task_name: str
    seed: int
    ckpt_path: Any
    init_from: Any
    init_from_strict: bool
    compile: Any
    threads: Any
    optim: dict  # a target node (_partial_: the system passes the parameters)
    nan_guard: dict  # a target node
    budget: dict  # a target node
    deadline: dict  # a target node (used when trainer.max_steps is null)
    sample_every_n_steps: int
    sample: SampleSchema
    parallel: ParallelSchema
    model: dict  # target nodes, checked by their constructors' signatures
    data: dict
    vae: dict  # a target node (vae=diffusers) or empty (vae=none)
    text_encoder: dict  # a target node (hf, learned) or empty (none)
    diffusion: dict
    schedule: dict  # a target node
    logger: dict  # {name: target node}
    trainer: dict
    callbacks: dict  # {name: target node}
    finetune: dict  # a target node
    paths: dict  # free: interpolation values
    hydra: dict  # Hydra's own node (present with return_hydra_config)
    pipeline: Any = None  # backbone=wan|ltx: the pipeline repository its model, vae and text encoder come from


# the root's nodes built by instantiate, checked against their _target_'s signature
TARGET_NODES = "model data diffusion optim schedule vae text_encoder trainer nan_guard budget deadline finetune".split()
OPEN = None  # "any key": a node whose keys this schema does not constrain


class UnknownKeyError(ValueError):
    """A config key that no constructor or schema accepts."""


# Third-party classes whose **kwargs all go to one callable (read in their sources, the versions pinned in
# pyproject.toml): their keys are that callable's too, less the arguments the class passes itself.
FORWARDS = {
    "lightning.pytorch.loggers.wandb.WandbLogger": ("wandb.init", set()),  # self._wandb_init.update(**kwargs)
    "lightning.pytorch.strategies.ddp.DDPStrategy":  # DistributedDataParallel(module=, device_ids=, **kwargs)
    ("torch.nn.parallel.DistributedDataParallel", {"module", "device_ids"}),
    "lightning.pytorch.callbacks.throughput_monitor.ThroughputMonitor":  # Throughput(available_flops=, world_size=, **)
    ("lightning.fabric.utilities.throughput.Throughput", {"available_flops", "world_size"}),
}


def _signature_keys(fn: Callable) -> set[str] | None:
    """Parameter names a callable accepts; None = anything (it takes **kwargs we cannot follow).

    A stale class that takes **kwargs passes them to its base class (SyntheticDataModule -> VideoDataModule),
    so for stale's own classes the walk goes on up the hierarchy; a third-party **kwargs is followed where
    FORWARDS knows where it goes (DDPStrategy to DistributedDataParallel, WandbLogger to wandb.init), and
    otherwise leaves the node open.
    """
    if inspect.isclass(fn):
        keys: set[str] = set()
        for klass in fn.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return keys
            if not klass.__module__.startswith("stale."):
                forward = FORWARDS.get(f"{klass.__module__}.{klass.__qualname__}")
                if forward is None:
                    return None
                inner = target_keys(forward[0])
                return None if inner is None else keys | (inner - forward[1])
        return None
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def target_keys(target: str) -> set[str] | None:
    from hydra.utils import get_object

    try:
        fn = get_object(target)
    except Exception as e:  # an unimportable target is its own clear error at instantiate time
        raise UnknownKeyError(f"_target_={target!r} cannot be imported: {e}") from None
    return _signature_keys(fn)


def unknown_key_message(path: str, key: str, allowed: set[str]) -> str:
    """`unknown config key optim.lrr: optim accepts betas, lr, weight_decay; did you mean optim.lr?`"""
    where = path or "the root"
    full = f"{path}.{key}" if path else key
    if full in MOVED_KEYS:
        return f"config key {full} is now {MOVED_KEYS[full]}: set {MOVED_KEYS[full]} instead"
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    hint = f"; did you mean {(path + '.') if path else ''}{close[0]}?" if close else ""
    return f"unknown config key {full}: {where} accepts {', '.join(sorted(allowed))}{hint}"


def _check_node(node: DictConfig, path: str, allowed: set[str] | None) -> None:
    if allowed is OPEN:
        return
    for key in node.keys():
        if key not in allowed and key not in PRIVATE:
            raise UnknownKeyError(unknown_key_message(path, str(key), allowed))


def _check_target_node(node: Any, path: str, keys: dict[str, set[str]]) -> None:
    """A node built by instantiate: its keys are its target's parameters (or keys[path]); nested ones likewise."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    _check_node(node, path, keys[path] if path in keys else target_keys(str(node._target_)))
    for key in node.keys():
        _check_target_node(node._get_node(key), f"{path}.{key}", keys)


def _check_dataclass(node: DictConfig, path: str, schema: type) -> None:
    fields = typing.get_type_hints(schema)  # the annotations are strings (from __future__ import annotations)
    _check_node(node, path, set(fields))
    for key in node.keys():
        sub = fields.get(str(key))
        child = node._get_node(key)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub) and isinstance(child, DictConfig):
            _check_dataclass(child, f"{path}.{key}" if path else str(key), sub)


def check_train_keys(cfg: DictConfig, keys: dict[str, set[str]]) -> None:
    """Raise UnknownKeyError for the first key of a stale-train config that nothing accepts. `keys` gives the
    keys of nodes whose target's signature does not list them (the model's **overrides)."""
    _check_dataclass(cfg, "", TrainSchema)
    for name in TARGET_NODES:
        _check_target_node(cfg.get(name), name, keys)
    for group in ("logger", "callbacks"):
        for name, node in (cfg.get(group) or {}).items():
            _check_target_node(node, f"{group}.{name}", keys)


def check_flat_keys(cfg: DictConfig, reference: DictConfig, path: str = "") -> None:
    """The flat apps (stale-sample, stale-eval, ...): every key must be one of the packaged config's keys."""
    _check_node(cfg, path, {str(k) for k in reference.keys()} - {"defaults"} | {"hydra"})
