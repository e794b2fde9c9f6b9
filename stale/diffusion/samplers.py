"""Samplers for the flow ODE dx/dt = v(x, t), from t=0 (prior) to t=1 (data).

In the style of k-diffusion's sampling.py: small pure functions with one shared signature,

    sampler(velocity, x, ts, clamp=..., progress=...) -> x at ts[-1]

where `velocity(x, t)` takes x (B, ...) and t (B,) and returns dx/dt. With the uniform prior the exact
field is discontinuous at the faces of the box [-1, 1]^d, so steps can leave the support: clamping to
[-1, 1] after every step (`clamp=True`) makes it a discretised reflected process (METHOD.md).
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


@torch.no_grad()
def sample_euler(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, clamp: bool = True,
                 progress: bool = False) -> torch.Tensor:
    """Explicit Euler (first order): x <- x + dt v(x, t)."""
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc="euler"):
        t, dt = ts[i], ts[i + 1] - ts[i]
        x = _project(x + dt * velocity(x, t.expand(x.shape[0])), clamp)
    return x


SAMPLERS = {"euler": sample_euler}
