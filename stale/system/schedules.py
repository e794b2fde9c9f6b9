"""Learning-rate schedules as multipliers of the peak rate, stepped once per optimiser step.

`arctan` is the paper's "arctangent learning-rate schedule" (METHOD.md); cosine, warmup-stable-decay
(Hu et al. 2024, MiniCPM) and constant are the comparators. Every schedule warms up over `warmup` steps.
"""

from __future__ import annotations

import math
from functools import partial

SCHEDULES = ("arctan", "cosine", "wsd", "constant")


def arctan_lr(step: int, warmup: int, total: int, min_ratio: float = 0.1, sharpness: float = 5.0) -> float:
    """warmup: arctan(a s / W) / arctan(a); decay: r + (1 - r)(1/2 - arctan(a (2p - 1)) / (2 arctan(a))).

    Equals 1 at p = 0 and min_ratio at p = 1, falls monotonically and is point-symmetric about p = 1/2.
    Small `sharpness` is nearly linear; large is close to warmup-stable-decay.
    """
    a = sharpness
    if step < warmup:
        return math.atan(a * step / warmup) / math.atan(a)
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * (0.5 - math.atan(a * (2 * p - 1)) / (2 * math.atan(a)))


def _linear_warmup(step: int, warmup: int) -> float | None:
    return (step + 1) / warmup if step < warmup else None


def cosine_lr(step: int, warmup: int, total: int, min_ratio: float = 0.1, **_) -> float:
    w = _linear_warmup(step, warmup)
    if w is not None:
        return w
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def wsd_lr(step: int, warmup: int, total: int, min_ratio: float = 0.1, decay_fraction: float = 0.2, **_) -> float:
    w = _linear_warmup(step, warmup)
    if w is not None:
        return w
    decay_start = total - int(decay_fraction * (total - warmup))
    if step < decay_start:
        return 1.0
    p = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0 - (1.0 - min_ratio) * p


def constant_lr(step: int, warmup: int, total: int = 0, **_) -> float:
    w = _linear_warmup(step, warmup)
    return 1.0 if w is None else w


def lr_multiplier(name: str, warmup: int, total: int, **kwargs):
    """A function step -> multiplier of the peak learning rate, for torch's LambdaLR."""
    fns = {"arctan": arctan_lr, "cosine": cosine_lr, "wsd": wsd_lr, "constant": constant_lr}
    if name not in fns:
        raise ValueError(f"schedule={name!r} is not one of {SCHEDULES}")
    if warmup < 0 or total <= 0 or warmup >= total:
        raise ValueError(f"schedule needs 0 <= warmup ({warmup}) < total steps ({total})")
    return partial(fns[name], warmup=warmup, total=total, **kwargs)
