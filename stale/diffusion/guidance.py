"""Guidance: classifier-free guidance on labels, and classifier guidance from the hinge head's margin.

Both wrap a velocity field and return one with the samplers' signature v(x (B, ...), t (B,)).

Classifier-free guidance (Ho & Salimans 2022): train with the label dropped (p = 0.1), then
    v = v_null + w (v_label - v_null);  w = 1 is the plain conditional model, w = 0 the unconditional one.

Classifier guidance (Dhariwal & Nichol 2021), for flow matching: with a Gaussian prior Tweedie's identity
v = (x + (1 - t) grad log p_t(x)) / t turns a classifier's gradient into

    v_y(x, t) = v(x, t) + (1 - t) / t * grad_x log p(y | x_t)

(tests/test_diffusion_guidance.py checks it against the exact oracle). The model's version is a heuristic: the
head's margin s_y - max_{j != y} s_j is no calibrated log-probability, and with the uniform prior there is no
Tweedie identity at all (the exact p(y | x_t) is piecewise constant; docs/convergence.md), so there the margin
gradient is only a push towards clips the head scores as y. The factor (1 - t) / t is capped at t_min, since a
learned margin has no reason to vanish at t = 0.
"""

from __future__ import annotations

from typing import Callable

import torch

from stale.diffusion.flow import expand_t

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Conditional = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # v(x (B, ...), t (B,), y (B,))


def cfg_combine(v_cond: torch.Tensor, v_null: torch.Tensor, weight: float) -> torch.Tensor:
    """v_null + w (v_cond - v_null)."""
    return v_null + weight * (v_cond - v_null)


def classifier_free(velocity: Conditional, labels: torch.Tensor, null: torch.Tensor, weight: float) -> Velocity:
    """Classifier-free guided field of a label-conditional field `velocity(x, t, y)`.

    w = 1 is the conditional field and w = 0 the unconditional one: one pass each. Otherwise the conditional
    and the null-label passes run as ONE forward over the doubled batch [x; x] with labels [y; null], split in
    halves afterwards (DiT's forward_with_cfg, Peebles & Xie 2023): one model call per step instead of two,
    which fills the device better and halves the per-call overhead.
    """
    if weight == 1.0:
        return lambda x, t: velocity(x, t, labels)
    if weight == 0.0:
        return lambda x, t: velocity(x, t, null)
    both = torch.cat([labels, null])  # (2B,)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_null = velocity(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)  # (2B, ...) -> 2 x (B, ...)
        return cfg_combine(v_cond, v_null, weight)

    return guided


def classifier_guided(
    velocity: Velocity,
    grad_log_p: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: float,
    t_min: float = 0.05,
) -> Velocity:
    """v + scale (1 - t) / max(t, t_min) grad_log_p(x, t); scale = 0 returns `velocity` itself."""
    if scale == 0:
        return velocity

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        factor = (1 - t) / t.clamp_min(t_min)
        return velocity(x, t) + scale * expand_t(factor, x) * grad_log_p(x, t)

    return guided


def input_gradient(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """grad_x sum(fn(x, t)) as a function (x, t) -> (B, ...); works inside torch.no_grad samplers.
    A function that does not depend on x differentiably (piecewise constant) has gradient 0."""

    def grad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = fn(xg, t).sum()
            g = torch.autograd.grad(out, xg, allow_unused=True)[0] if out.requires_grad else None
        return torch.zeros_like(x) if g is None else g

    return grad
