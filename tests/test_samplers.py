"""Samplers: one signature, their orders of accuracy, clamping, no t=1 evaluation, progress, determinism."""

import inspect
import math

import pytest
import torch

from stale.diffusion.objective import StaleObjective
from stale.diffusion.samplers import EVALS_PER_STEP, SAMPLERS, get_sampler, time_grid
from stale.models.stale_transformer import build_model
from stale.system.stale_system import StaleSystem

ORDERS = {"euler": 1, "heun": 2, "rk4": 4}


def test_samplers_share_one_signature():
    sigs = {name: list(inspect.signature(fn).parameters) for name, fn in SAMPLERS.items()}
    assert set(sigs) == set(ORDERS) == set(EVALS_PER_STEP)
    for params in sigs.values():
        assert params == ["velocity", "x", "ts", "clamp", "progress"]
    with pytest.raises(ValueError, match="sample.sampler"):
        get_sampler("ddim")
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_order_of_accuracy_on_a_smooth_ode(name):
    """dx/dt = x cos(t) has x(1) = x0 exp(sin 1); halving h divides the error by about 2^order, the last
    step's lower-order rule included."""

    def velocity(x, t):
        return x * torch.cos(t).view(-1, 1)

    x0 = torch.tensor([[0.5], [-0.3]], dtype=torch.float64)
    exact = x0 * math.exp(math.sin(1.0))
    errs = [
        (SAMPLERS[name](velocity, x0, time_grid(n).double(), clamp=False) - exact).abs().max().item()
        for n in (32, 64, 128)
    ]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - ORDERS[name]) < 0.15 for r in rates), (name, errs, rates)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_never_evaluates_t_equal_1_and_counts_evaluations(name):
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.ones_like(x)

    out = SAMPLERS[name](velocity, torch.zeros(3, 2), time_grid(5), clamp=False)
    assert torch.allclose(out, torch.ones(3, 2))  # a constant field is integrated exactly
    ts = torch.cat(seen)
    assert ts.max() < 1 and ts.min() == 0 and all(s.shape == (3,) for s in seen)
    # the last step stops short of t = 1 with one evaluation fewer (Heun: Euler; RK4: Ralston's 3 stages)
    assert len(seen) == EVALS_PER_STEP[name] * 5 - (0 if name == "euler" else 1)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_clamp_keeps_every_step_and_stage_in_the_box(name):
    stages = []

    def outward(x, t):
        stages.append(x.clone())
        return 3 * torch.sign(x)

    x = torch.tensor([[0.9, -0.2, 0.0]])
    out = SAMPLERS[name](outward, x, time_grid(4), clamp=True)
    assert out.abs().max() <= 1 and torch.cat(stages).abs().max() <= 1
    assert SAMPLERS[name](outward, x, time_grid(4), clamp=False).abs().max() > 1


def test_progress_bar_is_shown_only_when_asked(capsys):
    SAMPLERS["heun"](lambda x, t: x, torch.zeros(1, 1), time_grid(3), progress=True)
    assert "heun" in capsys.readouterr().err
    SAMPLERS["heun"](lambda x, t: x, torch.zeros(1, 1), time_grid(3), progress=False)
    assert capsys.readouterr().err == ""


def _system(prior="uniform"):
    torch.manual_seed(0)
    model = build_model("tiny", frames=2, size=8, num_classes=3, dim=32, depth=2, heads=2)
    with torch.no_grad():  # leave adaLN-Zero's identity start: give the velocity and the head real signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return StaleSystem(model, StaleObjective(prior=prior))


@pytest.mark.parametrize("prior", ["uniform", "gaussian"])
def test_system_sampling_is_deterministic_per_seed(prior):
    system = _system(prior)
    labels = torch.tensor([0, 1, 2])
    a = system.sample(labels, steps=3, sampler="heun", seed=7)
    b = system.sample(labels, steps=3, sampler="heun", seed=7)
    c = system.sample(labels, steps=3, sampler="heun", seed=8)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 2, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert system.model.training  # restored after sampling


def test_system_guidance_options_change_the_samples():
    system = _system()
    labels = torch.tensor([0, 1, 2, 0])
    base = system.sample(labels, steps=3, sampler="euler", seed=0)
    cfg = system.sample(labels, steps=3, sampler="euler", seed=0, guidance=3.0)
    clf = system.sample(labels, steps=3, sampler="euler", seed=0, classifier_guidance=5.0)
    rk4 = system.sample(labels, steps=3, sampler="rk4", seed=0)
    for other in (cfg, clf, rk4):
        assert not torch.equal(base, other)
    with pytest.raises(ValueError, match="sample.sampler"):
        system.sample(labels, steps=3, sampler="ddim")


def test_uint8_conversion_round_trips_and_leaves_its_input_alone():
    from stale.diffusion.flow import to_uint8, to_unit_range

    levels = torch.arange(256, dtype=torch.uint8)
    x = to_unit_range(levels)
    assert x[0] == -1 and x[-1] == 1 and x[128].item() == pytest.approx(1 / 255, abs=1e-6)  # 128 / 127.5 - 1 in float32
    assert torch.equal(to_uint8(x), levels)
    video = torch.tensor([0.0, 127.5, 255.0])  # a float batch: .float() returns it, so in-place ops would write it
    assert to_unit_range(video).tolist() == [-1.0, 0.0, 1.0]
    assert video.tolist() == [0.0, 127.5, 255.0]
    assert to_uint8(torch.tensor([-3.0, 0.0, 3.0])).tolist() == [0, 128, 255]  # clamped, rounded half to even
