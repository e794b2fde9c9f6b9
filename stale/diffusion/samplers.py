"""Samplers for the flow ODE dx/dt = v(x, t), from t=0 (prior) to t=1 (data).

In the style of k-diffusion's sampling.py: small pure functions with one shared signature,

    sampler(velocity, x, ts, clamp=True, progress=False) -> x at ts[-1]

where `velocity(x, t)` takes x (B, ...) and t (B,) and returns dx/dt, and `ts` is an increasing time grid
(`time_grid(steps)`). They are deterministic: the same x and ts give the same result.

Two rules shared by every sampler:
- Clamping. With the uniform prior the exact field is discontinuous at the faces of the box [-1, 1]^d,
  so steps can leave the support: `clamp=True` projects every step *and every stage* back onto [-1, 1]
  (a discretised reflected process, METHOD.md). Use clamp=False for the Gaussian prior.
- No evaluation at t = 1. The exact field v*(x, t) = (E[x1 | x_t] - x) / (1 - t) is 0/0 there, and
  models rarely see t near 1 in training. A last step that ends at t = 1 therefore uses a method whose
  stages stop short of it (Heun: Euler, as k-diffusion's sample_heun does at sigma = 0; RK4: Ralston's
  third-order method). Each of those is one step of one order less, which keeps the global order.
  An Euler step to t = 1 lands exactly on the clean estimate x1_hat = x + (1 - t) v.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, device=None) -> torch.Tensor:
    """steps + 1 evenly spaced times from 0 to 1."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def _project(x: torch.Tensor, clamp: bool) -> torch.Tensor:
    return x.clamp(-1.0, 1.0) if clamp else x


def _steps(ts: torch.Tensor, progress: bool, desc: str):
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
    # the bar stays on screen when done: its final count shows the sampler finished
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc=desc):
        yield ts[i], ts[i + 1] - ts[i], bool(ts[i + 1] >= 1)


def _v(velocity: Velocity, x: torch.Tensor, t) -> torch.Tensor:
    return velocity(x, torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0]))


@torch.no_grad()
def sample_euler(
    velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, clamp: bool = True, progress: bool = False
) -> torch.Tensor:
    """Explicit Euler, first order: x <- x + h v(x, t). One velocity evaluation per step."""
    for t, h, _ in _steps(ts, progress, "euler"):
        x = _project(x + h * _v(velocity, x, t), clamp)
    return x


@torch.no_grad()
def sample_heun(
    velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, clamp: bool = True, progress: bool = False
) -> torch.Tensor:
    """Heun's method (explicit trapezoid), second order; two evaluations per step (Karras et al. 2022,
    Alg. 1). The last step to t = 1 is an Euler step, so the singular endpoint is never evaluated."""
    for t, h, last in _steps(ts, progress, "heun"):
        d = _v(velocity, x, t)
        x_euler = _project(x + h * d, clamp)
        if last:
            x = x_euler
            continue
        d2 = _v(velocity, x_euler, t + h)
        x = _project(x + h * (d + d2) / 2, clamp)
    return x


@torch.no_grad()
def sample_rk4(
    velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, clamp: bool = True, progress: bool = False
) -> torch.Tensor:
    """Classical Runge-Kutta, fourth order; four evaluations per step. The last step to t = 1 uses
    Ralston's third-order method (stages at t, t + h/2, t + 3h/4; Ralston 1962), which never evaluates t=1."""
    for t, h, last in _steps(ts, progress, "rk4"):
        k1 = _v(velocity, x, t)
        k2 = _v(velocity, _project(x + h / 2 * k1, clamp), t + h / 2)
        if last:
            k3 = _v(velocity, _project(x + 3 * h / 4 * k2, clamp), t + 3 * h / 4)
            x = _project(x + h * (2 * k1 + 3 * k2 + 4 * k3) / 9, clamp)
            continue
        k3 = _v(velocity, _project(x + h / 2 * k2, clamp), t + h / 2)
        k4 = _v(velocity, _project(x + h * k3, clamp), t + h)
        x = _project(x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6, clamp)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "rk4": sample_rk4}
EVALS_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}  # velocity evaluations per step (cost)


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sample.sampler={name!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
