"""The exact oracle v*: its weights, the empty-active-set fallback, and the "infinite time" claim in small."""

import math

import pytest
import torch

from stale.diffusion import flow
from stale.diffusion.oracle import Oracle, monte_carlo_loss
from stale.diffusion.samplers import SAMPLERS, time_grid

PRIORS = ["uniform", "gaussian"]


def _data(n=5, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64) * 1.6 - 0.8


def test_weights_at_t0_and_for_a_single_point():
    data = _data()
    x = flow.sample_prior((7, 2), "uniform", generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t0 = torch.zeros(7, dtype=torch.float64)
    for prior in PRIORS:  # at t = 0 every point is equally likely: v* = mean(y) - x
        o = Oracle(data, prior)
        assert torch.allclose(o.weights(x, t0), torch.full((7, 5), 0.2, dtype=torch.float64))
        assert torch.allclose(o(x, t0), data.mean(0) - x)
        one = Oracle(data[:1], prior)  # one point: the straight line to it, at any t
        t = torch.linspace(0, 0.9, 7, dtype=torch.float64)
        assert torch.allclose(one(x, t), (data[0] - x) / (1 - t[:, None]))
    with pytest.raises(ValueError, match="t = 1"):
        Oracle(data, "gaussian")(x, torch.ones(7, dtype=torch.float64))


def test_uniform_weights_follow_the_active_set():
    data = torch.tensor([[0.0, 0.0], [0.8, 0.0], [-0.8, 0.6]], dtype=torch.float64)
    o = Oracle(data, "uniform")
    t = torch.tensor([0.5], dtype=torch.float64)  # boxes: centre t y_i, half-width 0.5
    x = torch.tensor([[0.3, 0.1]], dtype=torch.float64)  # inside boxes 0 ([0,0]) and 1 ([0.4, 0])
    assert o.weights(x, t).tolist() == [[0.5, 0.5, 0.0]]
    assert torch.allclose(o(x, t), ((data[0] + data[1]) / 2 - x) / 0.5)


def test_empty_active_set_falls_back_to_the_nearest_box():
    data = torch.tensor([[0.0, 0.0], [0.8, 0.0], [-0.8, 0.6]], dtype=torch.float64)
    o = Oracle(data, "uniform")
    t = torch.tensor([0.9], dtype=torch.float64)  # half-width 0.1: boxes around (0,0), (.72,0), (-.72,.54)
    x = torch.tensor([[0.5, 0.05]], dtype=torch.float64)  # L-inf distances 0.5, 0.22, 1.22: no box holds x
    assert o.weights(x, t).tolist() == [[0.0, 1.0, 0.0]]
    assert torch.allclose(o(x, t), (data[1] - x) / 0.1)


@pytest.mark.parametrize("prior", PRIORS)
def test_oracle_samples_land_on_data_points_with_mass_1_over_n(prior):
    data, m = _data(), 3000
    z = flow.sample_prior((m, 2), prior, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = SAMPLERS["heun"](Oracle(data, prior), z, time_grid(64).double(), clamp=prior == "uniform")
    idx, dist = Oracle(data, prior).assign(x)
    assert dist.max() < 1e-6  # on the data points, not between them
    mass = torch.bincount(idx, minlength=5).double() / m
    sd = math.sqrt(0.2 * 0.8 / m)
    assert (mass - 0.2).abs().max() < 4 * sd, mass.tolist()  # each point gets 1/N up to sampling noise


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_error_falls_as_steps_grow(prior, sampler):
    """Against a 512-step solution from the same prior draws (no sampling noise): 4 > 16 > 64 steps,
    and the nearest-point distance and the mass error fall too."""
    data, m = _data(), 1500
    o = Oracle(data, prior)
    z = flow.sample_prior((m, 2), prior, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    clamp = prior == "uniform"

    def run(n):
        return SAMPLERS[sampler](o, z, time_grid(n).double(), clamp=clamp)

    ref = run(512)
    runs = {n: run(n) for n in (4, 16, 64)}
    err = [(runs[n] - ref).norm(dim=1).mean().item() for n in (4, 16, 64)]
    assert err[0] > err[1] > err[2], err
    near = [o.assign(runs[n])[1].mean().item() for n in (4, 16, 64)]
    assert near[0] > 10 * max(near[2], 1e-12), near
    tv = [0.5 * (torch.bincount(o.assign(runs[n])[0], minlength=5) / m - 0.2).abs().sum().item() for n in (4, 64)]
    assert tv[0] > 2 * tv[1], tv


@pytest.mark.parametrize("prior", PRIORS)
def test_monte_carlo_loss_is_lowest_at_the_oracle(prior):
    data = _data(n=6, d=3, seed=4)
    o = Oracle(data, prior)
    losses = {
        c: monte_carlo_loss(lambda x, t, c=c: c * o(x, t), data, prior, n=20_000, seed=5).item()
        for c in (0.95, 1.0, 1.05)
    }
    assert losses[1.0] < losses[1.05] and losses[1.0] < losses[0.95], losses
    other = Oracle(data, "gaussian" if prior == "uniform" else "uniform")  # the other prior's v*: not optimal
    assert monte_carlo_loss(other, data, prior, n=20_000, seed=5).item() > losses[1.0]
