"""The Stale objective: L = L_velocity + lambda_hinge L_hinge (+ lambda_dog L_dog, a later addition).

The hinge branch must not see the label it predicts, so it is a second, label-free forward pass on a
fraction of the batch at fresh times (x_t, t, null label). Cost: about `hinge_fraction` extra forward
and backward work per step (0.25 by default). The flow branch drops labels with `label_dropout` for
classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stale.diffusion import flow
from stale.diffusion.hinge import hinge_loss, predict


@dataclass
class StaleObjective:
    prior: str = "uniform"  # uniform (U[-1,1]^d) or gaussian (N(0, I))
    time_sampling: str = "logit_normal"  # logit_normal or uniform
    time_mean: float = 0.0  # logit-normal m
    time_std: float = 1.0  # logit-normal s
    label_dropout: float = 0.1  # p(null label) in the flow branch, for classifier-free guidance
    hinge_weight: float = 0.1  # lambda_hinge; 0 turns the head's training off
    hinge_fraction: float = 0.25  # share of the batch used by the label-free hinge branch
    dog_weight: float = 0.0  # lambda_dog (band-pass term; added by the objective issue)

    def __post_init__(self):
        if self.prior not in flow.PRIORS:
            raise ValueError(f"diffusion.prior={self.prior!r} is not one of {flow.PRIORS}")
        if self.time_sampling not in flow.TIME_SAMPLERS:
            raise ValueError(f"diffusion.time_sampling={self.time_sampling!r} is not one of {flow.TIME_SAMPLERS}")
        for name in ("label_dropout", "hinge_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"diffusion.{name}={getattr(self, name)} must be in [0, 1]")
        if self.hinge_weight < 0 or self.dog_weight < 0:
            raise ValueError("diffusion.hinge_weight and diffusion.dog_weight must be >= 0")

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, null_label: int) -> dict[str, torch.Tensor]:
        """x: float (B, C, T, H, W) in [-1, 1]; y: (B,) labels. Returns the total loss and its parts."""
        b = x.shape[0]
        z = flow.sample_prior(x.shape, self.prior, device=x.device, dtype=x.dtype)
        t = flow.sample_time(b, self.time_sampling, self.time_mean, self.time_std, device=x.device)
        x_t = flow.interpolate(z, x, t)
        drop = torch.rand(b, device=x.device) < self.label_dropout
        v, _ = model(x_t, t, torch.where(drop, torch.full_like(y, null_label), y))
        velocity = (v.float() - flow.velocity_target(z, x).float()).pow(2).mean()
        out = {"loss": velocity, "velocity": velocity.detach()}
        if self.hinge_weight > 0:
            n = max(1, round(b * self.hinge_fraction))
            xh, yh = x[:n], y[:n]
            zh = flow.sample_prior(xh.shape, self.prior, device=x.device, dtype=x.dtype)
            th = flow.sample_time(n, self.time_sampling, self.time_mean, self.time_std, device=x.device)
            _, scores = model(flow.interpolate(zh, xh, th), th, torch.full_like(yh, null_label))
            hinge = hinge_loss(scores.float(), yh)
            out["loss"] = out["loss"] + self.hinge_weight * hinge
            out["hinge"] = hinge.detach()
            out["hinge_acc"] = (predict(scores) == yh).float().mean().detach()
        return out
