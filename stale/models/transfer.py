"""Loading weights into a model that may differ from the one that made them (init_from).

Every tensor of the source whose name and shape match loads; the rest are reported by name:
  new       in the model, not in the source (e.g. blocks beyond the source's depth): keep their fresh init
  dropped   in the source, not in the model (e.g. the source's extra blocks)
  reshaped  in both, shapes differ (e.g. the label table when num_classes changes): keep the fresh init
A change is *expected* when the two model configs explain it (expected_changes): another num_classes changes the
label table and the head, another in_channels or patch the patch embedding and the output layer, another depth
adds or drops whole blocks. Anything else (say another width, which reshapes everything) is unexpected, and
init_from stops on it unless init_from_strict=false.

The joy token is never loaded: it is a fixed function of (dim, joy_seed) that the model already holds.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

NEVER_LOADED = ("joy_token",)


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)  # "name (source shape -> model shape)" in lines()
    shapes: dict = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)  # names among new/dropped/reshaped the configs do not explain

    @property
    def untrained(self) -> list[str]:
        """Model tensors left at their fresh init."""
        return self.new + self.reshaped

    def lines(self) -> list[str]:
        out = [f"loaded {len(self.loaded)} tensors"]
        for kind in ("new", "dropped", "reshaped"):
            names = getattr(self, kind)
            if names:
                shown = [f"{n} {self.shapes[n]}" if kind == "reshaped" else n for n in names]
                out.append(f"{kind} ({len(names)}): " + ", ".join(shown))
        if self.unexpected:
            out.append(f"not explained by the config change ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        return out


def expected_changes(source: dict, target: dict) -> list[str]:
    """fnmatch patterns of the tensors a change between two model configs (StaleConfig fields) may affect."""
    patterns = []
    if source.get("num_classes") != target.get("num_classes"):
        patterns += ["y_embed.embedding_table.weight", "head.linear.*"]
    if source.get("in_channels") != target.get("in_channels") or list(source.get("patch") or []) != list(
        target.get("patch") or []
    ):
        patterns += ["patch_embed.*", "final.linear.*"]
    depth_s, depth_t = source.get("depth"), target.get("depth")
    if depth_s is not None and depth_t is not None and depth_s != depth_t:
        patterns += [f"blocks.{i}.*" for i in range(min(depth_s, depth_t), max(depth_s, depth_t))]
    return patterns


def load_matching(model: nn.Module, source: dict[str, torch.Tensor], expected: list[str] = ()) -> TransferReport:
    """Copy every source tensor whose name and shape match into `model` (in place) and report the rest."""
    own = model.state_dict()
    report = TransferReport()
    take = {}
    for name, value in own.items():
        if name in NEVER_LOADED:
            continue
        if name not in source:
            report.new.append(name)
        elif tuple(source[name].shape) != tuple(value.shape):
            report.reshaped.append(name)
            report.shapes[name] = f"({list(source[name].shape)} -> {list(value.shape)})"
        else:
            take[name] = source[name]
            report.loaded.append(name)
    report.dropped = [n for n in source if n not in own and n not in NEVER_LOADED]
    report.unexpected = [
        n for n in report.new + report.dropped + report.reshaped if not any(fnmatch.fnmatchcase(n, p) for p in expected)
    ]
    model.load_state_dict(take, strict=False)
    return report
