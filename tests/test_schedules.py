"""Learning-rate schedules: endpoints, monotone decay, arctan exactly as METHOD.md and point-symmetric."""

import math

import pytest
import torch

from stale.system.schedules import SCHEDULES, arctan_lr, lr_multiplier

W, S, R = 10, 110, 0.1  # warmup, total, min_ratio: p = (s - 10) / 100 is exact at every step


@pytest.mark.parametrize("name", SCHEDULES)
def test_endpoints_and_monotone_decay(name):
    f = lr_multiplier(name, W, S, **({} if name == "constant" else {"min_ratio": R}))
    lrs = [f(s) for s in range(S + 1)]
    assert lrs[W] == pytest.approx(1.0)  # the peak when warmup ends
    assert lrs[S] == pytest.approx(1.0 if name == "constant" else R)  # the floor at the last step
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in lrs)
    warm = lrs[:W]
    assert all(a < b for a, b in zip(warm, warm[1:])) and warm[-1] <= lrs[W], "warmup must rise"
    decay = lrs[W:]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:])), "decay must not rise"
    if name != "constant":
        assert decay[1] < decay[0] or name == "wsd" and decay[-2] > decay[-1]  # it really decays
    assert f(S + 50) == pytest.approx(lrs[S])  # past the end it stays at the floor


def test_arctan_matches_method_formula():
    a, lo = 5.0, 0.1
    f = lr_multiplier("arctan", W, S, min_ratio=lo, sharpness=a)
    for s in (0, 3, 9):  # warmup: arctan(a (s + 1) / W) / arctan(a)
        assert f(s) == pytest.approx(math.atan(a * (s + 1) / W) / math.atan(a), abs=1e-15)
    for s in (10, 37, 60, 99, 110):
        p = (s - W) / (S - W)
        expected = lo + (1 - lo) * (0.5 - math.atan(a * (2 * p - 1)) / (2 * math.atan(a)))
        assert f(s) == pytest.approx(expected, abs=1e-15)
    assert f(60) == pytest.approx((1 + lo) / 2)  # the midpoint


@pytest.mark.parametrize("a", [0.1, 1.0, 5.0, 50.0])
def test_arctan_point_symmetric_about_half(a):
    # lr(p) + lr(1 - p) = lr_max + lr_min for every p
    for k in range(0, 101):
        s1, s2 = W + k, W + (100 - k)
        assert arctan_lr(s1, W, S, R, a) + arctan_lr(s2, W, S, R, a) == pytest.approx(1 + R, abs=1e-12)


def test_arctan_sharpness_interpolates_linear_and_wsd():
    at = lambda s, a: arctan_lr(s, W, S, R, a)  # noqa: E731
    linear = lambda s: 1 - (1 - R) * (s - W) / (S - W)  # noqa: E731
    assert max(abs(at(s, 0.01) - linear(s)) for s in range(W, S + 1)) < 1e-3  # small a: nearly linear
    assert at(W + 20, 100.0) > 0.99 and at(S - 20, 100.0) < R + 0.01  # large a: flat, then a short drop


@pytest.mark.parametrize("name", SCHEDULES)
def test_step_zero_trains(name):
    # optimiser step 0 must move the weights: lr(0) > 0 for every schedule (arctan(0) = 0 gave lr = 0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(name, W, S))
    assert opt.param_groups[0]["lr"] > 0.05  # arctan: atan(0.5) / atan(5) = 0.34; linear: 1 / W = 0.1
    p.grad = torch.ones(1)
    opt.step()
    sched.step()
    assert p.item() < 0


def test_lambdalr_steps_per_optimiser_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier("cosine", 2, 6, min_ratio=0.5))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1.0) and seen[1] == pytest.approx(2.0)  # linear warmup (s + 1) / W
    assert seen[5] == pytest.approx(2.0 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))


@pytest.mark.parametrize(
    "args, match",
    [
        (("sawtooth", 0, 10), "schedule.name='sawtooth'"),
        (("arctan", 10, 10), "schedule.warmup=10"),
        (("arctan", -1, 10), "schedule.warmup=-1"),
        (("cosine", 0, 10, {"sharpness": 2.0}), "schedule.sharpness is not a parameter of the cosine"),
        (("arctan", 0, 10, {"sharpness": 0.0}), r"schedule.sharpness=0.0 must be in \(0"),
        (("wsd", 0, 10, {"min_ratio": 1.5}), r"schedule.min_ratio=1.5 must be in \[0"),
    ],
)
def test_bad_schedule_names_the_key(args, match):
    kwargs = args[3] if len(args) > 3 else {}
    with pytest.raises(ValueError, match=match):
        lr_multiplier(*args[:3], **kwargs)
