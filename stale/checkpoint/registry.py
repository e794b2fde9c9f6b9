"""The allow-list: the only constructors an export's config.json (or a checkpoint's run_config) may name.

config.json uses Hydra's `_target_` convention (one node, one constructor), but it is data from a file
someone sent you, so it is never handed to `hydra.utils.instantiate` (which imports whatever the string
names). A node is built only if its `_target_` is a key of ALLOWED_TARGETS, and nothing is imported.
"""

from __future__ import annotations

from typing import Any, Callable

from stale.diffusion.objective import StaleObjective
from stale.models import build_model, load_backbone

# Spelled as in conf/model/*.yaml and conf/diffusion/*.yaml. Extend here when stale gains a model or objective.
ALLOWED_TARGETS: dict[str, Callable[..., Any]] = {
    "stale.models.build_model": build_model,
    "stale.models.load_backbone": load_backbone,
    "stale.diffusion.objective.StaleObjective": StaleObjective,
}


class DisallowedTargetError(ValueError):
    """A config names a constructor outside ALLOWED_TARGETS."""


def check_targets(node: Any, where: str) -> None:
    """Refuse any `_target_` anywhere in a JSON-like tree that is not allow-listed, before building anything."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and target not in ALLOWED_TARGETS:
            raise DisallowedTargetError(
                f"{where}: _target_={target!r} is not an allowed stale class; allowed: {sorted(ALLOWED_TARGETS)}. "
                "Exports may only name these, and nothing else is imported or called."
            )
        for key, value in node.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{where}[{i}]")


def build(node: dict, where: str) -> Any:
    """Call the allow-listed constructor named by node["_target_"] with the node's other keys (plain values)."""
    if not isinstance(node, dict) or "_target_" not in node:
        raise DisallowedTargetError(f"{where}: expected a mapping with a _target_ key, got {node!r}")
    check_targets(node, where)
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    for key, value in kwargs.items():  # no recursive building: arguments are plain JSON values
        if isinstance(value, dict):
            raise DisallowedTargetError(f"{where}.{key}: nested mappings are not accepted as constructor arguments")
    try:
        return ALLOWED_TARGETS[node["_target_"]](**kwargs)
    except TypeError as err:  # an unknown keyword, e.g. an export from a newer stale
        raise ValueError(f"{where}: cannot build {node['_target_']}: {err}") from None
