"""The exact optimal velocity for a finite data set: the oracle the samplers are measured against (METHOD.md).

For data {y_i} (mass 1/N each) and prior p0, v*(x, t) = sum_i w_i (y_i - x) / (1 - t) with
w_i proportional to p0((x - t y_i) / (1 - t)): a softmax for the Gaussian prior; for the uniform prior the indicator
of ||x - t y_i||_inf <= 1 - t (point i is *active*). A discretised path can leave every box; the oracle then falls
back to the nearest box in L-inf distance (ties share the weight). Computes in the data's dtype (use float64 for
convergence studies).
"""

from __future__ import annotations

import torch

from stale.diffusion import flow


class Oracle:
    """v*(x, t) for data (N, ...) under `prior`. Call as a sampler's velocity: oracle(x (B, ...), t (B,))."""

    def __init__(self, data: torch.Tensor, prior: str = "uniform", chunk: int = 1 << 24):
        if prior not in flow.PRIORS:
            raise ValueError(f"prior={prior!r} is not one of {flow.PRIORS}")
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"oracle data must be (N, ...) with N >= 1, got shape {tuple(data.shape)}")
        if prior == "uniform" and data.abs().max() > 1:
            raise ValueError("with the uniform prior the data must lie in [-1, 1]")
        self.data, self.prior, self.chunk = data, prior, chunk
        self.y = data.reshape(data.shape[0], -1)  # (N, d)

    def weights(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """w_i (B, N), rows summing to 1. Differentiable in x for the Gaussian prior (piecewise constant
        for the uniform prior: its gradient is 0 almost everywhere)."""
        xf, t = x.reshape(x.shape[0], -1), torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if (t >= 1).any() or (t < 0).any():
            raise ValueError("the oracle is defined for t in [0, 1): v* is singular at t = 1")
        rows = max(1, self.chunk // self.y.numel())  # samples per chunk: bounds the (b, N, d) temporaries
        out = []
        for s in range(0, xf.shape[0], rows):
            xs, ts = xf[s : s + rows], t[s : s + rows, None]  # (b, d), (b, 1)
            diff = xs[:, None, :] - ts[:, :, None] * self.y[None]  # (b, N, d): x - t y_i
            if self.prior == "gaussian":
                out.append(torch.softmax(-diff.pow(2).sum(-1) / (2 * (1 - ts) ** 2), dim=1))  # (b, N)
                continue
            dist = diff.abs().amax(-1)  # (b, N): ||x - t y_i||_inf
            tol = 64 * torch.finfo(x.dtype).eps
            active = dist <= (1 - ts) * (1 + tol)
            nearest = dist <= dist.amin(1, keepdim=True) * (1 + tol)  # the fallback on an empty active set
            use = torch.where(active.any(1, keepdim=True), active, nearest).to(x.dtype)
            out.append(use / use.sum(1, keepdim=True))
        return torch.cat(out)

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x1 | x_t = x] = sum_i w_i y_i, shaped like x."""
        return (self.weights(x, t) @ self.y).view_as(x)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return (self.denoise(x, t) - x) / (1 - flow.expand_t(t, x))

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest data point (B,) and the L2 distance to it (B,) for samples x (B, ...)."""
        d = torch.cdist(x.reshape(x.shape[0], -1).to(self.y.dtype), self.y)  # (B, N)
        dist, idx = d.min(dim=1)
        return idx, dist


def monte_carlo_loss(
    velocity, data: torch.Tensor, prior: str, n: int, seed: int = 0, time_sampling: str = "uniform"
) -> torch.Tensor:
    """E ||v(x_t, t) - (x - z)||^2 (summed over dimensions) over x ~ data, z ~ p0, t, from n draws.

    A fixed seed gives common random numbers, so two velocity fields are compared on the same draws.
    t is kept below 1 - 1e-3, where v* is finite.
    """
    g = torch.Generator().manual_seed(seed)
    x = data[torch.randint(0, data.shape[0], (n,), generator=g)]
    z = flow.sample_prior(x.shape, prior, generator=g, dtype=data.dtype)
    t = flow.sample_time(n, time_sampling, generator=g).to(data.dtype).clamp(max=1 - 1e-3)
    err = velocity(flow.interpolate(z, x, t), t) - flow.velocity_target(z, x)
    return err.reshape(n, -1).pow(2).sum(1).mean()
