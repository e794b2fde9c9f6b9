"""Learning-rate schedules as multipliers of the peak rate, stepped once per optimiser step.

`arctan` is the paper's "arctangent learning-rate schedule" (METHOD.md); cosine, warmup-stable-decay
(Hu et al. 2024, MiniCPM) and constant are the comparators. Every schedule warms up over `warmup` steps,
then decays from 1 (lr = optim.lr) at step `warmup` to `min_ratio` (lr = min_ratio * optim.lr) at step
`total`. Each is a pure function step -> multiplier. A config node (conf/schedule/*.yaml) names one of the classes
below by `_target_`; its constructor checks the parameters once and calling it gives the multiplier at a step of
a run of `total` steps (StaleSystem binds `total` for torch's LambdaLR).
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Callable

SCHEDULES = ("arctan", "cosine", "wsd", "constant")


def _progress(step: int, start: int, total: int) -> float:
    """p in [0, 1]: how far `step` is from `start` (p = 0) to `total` (p = 1); clamped past the end."""
    return min(1.0, max(0.0, (step - start) / max(1, total - start)))


def _linear_warmup(step: int, warmup: int) -> float | None:
    # (s + 1) / W: the first step already trains, and step W - 1 reaches the peak
    return (step + 1) / warmup if step < warmup else None


def arctan_lr(step: int, warmup: int, total: int, min_ratio: float = 0.1, sharpness: float = 5.0) -> float:
    """METHOD.md, with r = lr_min / lr_max and a = sharpness:

        warmup (s < W):  arctan(a (s + 1) / W) / arctan(a)
        decay:           p = (s - W) / (S - W)
                         r + (1 - r) (1/2 - arctan(a (2p - 1)) / (2 arctan(a)))

    Equals 1 at p = 0 and r at p = 1, falls monotonically and is point-symmetric about p = 1/2.
    Small `sharpness` is nearly linear; large is close to warmup-stable-decay. The warmup counts s + 1, as
    the linear warmups do: arctan(0) = 0 would make optimiser step 0 a step with lr = 0.
    """
    a = sharpness
    if step < warmup:
        return math.atan(a * (step + 1) / warmup) / math.atan(a)
    p = _progress(step, warmup, total)
    return min_ratio + (1 - min_ratio) * (0.5 - math.atan(a * (2 * p - 1)) / (2 * math.atan(a)))


def cosine_lr(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup, then half a cosine from 1 to min_ratio (Loshchilov & Hutter 2017)."""
    w = _linear_warmup(step, warmup)
    if w is not None:
        return w
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * _progress(step, warmup, total)))


def wsd_lr(step: int, warmup: int, total: int, min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay: linear warmup, flat at 1, then linear to min_ratio over the last
    `decay_fraction` of the post-warmup steps."""
    w = _linear_warmup(step, warmup)
    if w is not None:
        return w
    decay_start = total - round(decay_fraction * (total - warmup))
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - min_ratio) * _progress(step, decay_start, total)


def constant_lr(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then flat at 1."""
    w = _linear_warmup(step, warmup)
    return 1.0 if w is None else w


SCHEDULE_FNS: dict[str, Callable[..., float]] = {
    "arctan": arctan_lr,
    "cosine": cosine_lr,
    "wsd": wsd_lr,
    "constant": constant_lr,
}

# (low, high, low inclusive, high inclusive) for every schedule parameter
_RANGES = {
    "min_ratio": (0.0, 1.0, True, True),
    "sharpness": (0.0, math.inf, False, False),
    "decay_fraction": (0.0, 1.0, False, True),
}


def schedule_params(name: str) -> dict[str, float]:
    """The tunable parameters of schedule `name` with their defaults."""
    sig = inspect.signature(SCHEDULE_FNS[name])
    return {k: p.default for k, p in sig.parameters.items() if k not in ("step", "warmup", "total")}


class LRSchedule:
    """A schedule node: one of SCHEDULE_FNS with its warmup and parameters, range-checked here (ValueError naming
    schedule.<key>); schedule(step, total) is the multiplier of optim.lr."""

    name: str = ""

    def __init__(self, warmup: int = 100, **params):
        known = schedule_params(self.name)
        for key, value in params.items():
            if key not in known:
                raise ValueError(
                    f"schedule.{key} is not a parameter of the {self.name} schedule (it has: {sorted(known)})"
                )
            lo, hi, lo_in, hi_in = _RANGES[key]
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and ((value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi))
            )
            if not ok:
                interval = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
                raise ValueError(f"schedule.{key}={value!r} must be in {interval}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"schedule.warmup={warmup!r} must be an integer >= 0")
        self.warmup, self.params = warmup, params

    def check_total(self, total: int) -> None:
        if total <= 0 or self.warmup >= total:
            raise ValueError(
                f"schedule.warmup={self.warmup} must be smaller than the number of training steps ({total})"
            )

    def __call__(self, step: int, total: int) -> float:
        return SCHEDULE_FNS[self.name](step, self.warmup, total, **self.params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(warmup={self.warmup}, {self.params})"


class Arctan(LRSchedule):
    """The paper's arctangent schedule (arctan_lr)."""

    name = "arctan"

    def __init__(self, warmup: int = 100, min_ratio: float = 0.1, sharpness: float = 5.0):
        super().__init__(warmup, min_ratio=min_ratio, sharpness=sharpness)


class Cosine(LRSchedule):
    """Linear warmup, then half a cosine (cosine_lr)."""

    name = "cosine"

    def __init__(self, warmup: int = 100, min_ratio: float = 0.1):
        super().__init__(warmup, min_ratio=min_ratio)


class WSD(LRSchedule):
    """Warmup-stable-decay (wsd_lr)."""

    name = "wsd"

    def __init__(self, warmup: int = 100, min_ratio: float = 0.1, decay_fraction: float = 0.2):
        super().__init__(warmup, min_ratio=min_ratio, decay_fraction=decay_fraction)


class Constant(LRSchedule):
    """Linear warmup, then flat (constant_lr)."""

    name = "constant"

    def __init__(self, warmup: int = 100):
        super().__init__(warmup)


SCHEDULE_CLASSES: dict[str, type[LRSchedule]] = {"arctan": Arctan, "cosine": Cosine, "wsd": WSD, "constant": Constant}


def lr_multiplier(name: str, warmup: int, total: int, **params) -> Callable[[int], float]:
    """A function step -> multiplier of the peak learning rate, for torch's LambdaLR: schedule `name` built and
    checked by its class (an unknown schedule, an unknown or out-of-range parameter, or a warmup that does not fit
    into the run raise ValueError naming the schedule.<key>)."""
    if name not in SCHEDULE_CLASSES:
        raise ValueError(f"schedule.name={name!r} is not one of {SCHEDULES}")
    unknown = sorted(set(params) - set(schedule_params(name)))
    if unknown:
        raise ValueError(
            f"schedule.{unknown[0]} is not a parameter of the {name} schedule (it has: {sorted(schedule_params(name))})"
        )
    schedule = SCHEDULE_CLASSES[name](warmup, **params)
    schedule.check_total(total)
    return partial(schedule, total=total)
