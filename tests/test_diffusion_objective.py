"""Priors, paths and the Stale objective: one code path for every prior and weight."""

import pytest
import torch
from hydra.utils import instantiate

from stale.diffusion import flow
from stale.diffusion.objective import StaleObjective
from stale.models.stale_transformer import build_model


def test_priors_have_the_documented_laws():
    g = torch.Generator().manual_seed(0)
    u = flow.sample_prior((200_000,), "uniform", generator=g)
    assert u.min() >= -1 and u.max() <= 1
    assert u.mean().abs() < 0.01 and u.var().item() == pytest.approx(1 / 3, rel=0.02)
    n = flow.sample_prior((200_000,), "gaussian", generator=g)
    assert n.mean().abs() < 0.01 and n.var().item() == pytest.approx(1.0, rel=0.02)
    with pytest.raises(ValueError, match="diffusion.prior"):
        flow.sample_prior((2,), "laplace")


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_time(100_000, "logit_normal", mean=1.0, std=0.5, generator=g)
    assert ((t > 0) & (t < 1)).all()
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    assert torch.logit(t).std().item() == pytest.approx(0.5, rel=0.02)
    tu = flow.sample_time(100_000, "uniform", generator=g)
    assert tu.mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="diffusion.time_sampling"):
        flow.sample_time(3, "beta")


def test_path_target_and_clean_estimate():
    g = torch.Generator().manual_seed(1)
    x, z = torch.rand(4, 3, 2, 4, 4, generator=g) * 2 - 1, torch.randn(4, 3, 2, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = flow.interpolate(z, x, t)
    assert torch.allclose(xt[0], z[0]) and torch.allclose(xt[3], x[3])
    u = flow.velocity_target(z, x)
    assert torch.allclose(flow.clean_estimate(xt, u, t), x, atol=1e-6)  # the true velocity lands on x


def _zero_model(x_t, t, y):
    """A velocity model that predicts 0 and scores 0: L_velocity is then E||x - z||^2 exactly."""
    return torch.zeros_like(x_t), torch.zeros(x_t.shape[0], 3)


@pytest.mark.parametrize("prior, second_moment", [("uniform", 1 / 3), ("gaussian", 1.0)])
def test_losses_have_their_expected_values(prior, second_moment):
    """x = 0, v = 0: L_velocity = E z^2; L_dog = E(1-t)^2 E z^2 = 1/3 E z^2 (t uniform, per-band norm.)."""
    torch.manual_seed(0)
    obj = StaleObjective(prior=prior, time_sampling="uniform", dog_weight=0.5, hinge_weight=0.0, label_dropout=0.0)
    x = torch.zeros(512, 1, 2, 16, 16)
    out = obj(_zero_model, x, torch.zeros(512, dtype=torch.long), 3)
    assert out["velocity"].item() == pytest.approx(second_moment, rel=0.02)
    assert out["dog"].item() == pytest.approx(second_moment / 3, rel=0.08)
    assert out["loss"].item() == pytest.approx(out["velocity"].item() + 0.5 * out["dog"].item(), rel=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("diffusion.prior=gaussian", "diffusion.dog_weight=0.1"),
        (
            "diffusion.mixup=true",
            "diffusion.dog_temporal=true",
            "diffusion.dog_weight=1",
            "diffusion.time_sampling=uniform",
        ),
    ],
)
def test_configs_train_through_the_same_objective(overrides, compose_train):
    cfg = compose_train(*overrides)
    obj = instantiate(cfg.diffusion)
    assert isinstance(obj, StaleObjective) and obj.dog_bands == (0.6, 1.0, 2.0, 4.0)
    torch.manual_seed(0)
    model = build_model("tiny", frames=2, size=8, num_classes=4, dim=32, depth=2, heads=2)
    x, y = torch.rand(8, 3, 2, 8, 8) * 2 - 1, torch.randint(0, 4, (8,))
    out = obj(model, x, y, null_label=4)
    expected = {"loss", "velocity", "hinge", "hinge_acc"} | ({"dog"} if obj.dog_weight > 0 else set())
    assert set(out) == expected
    assert out["loss"].requires_grad and all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.joy_token.grad is None  # the joy token is a buffer: never trained


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"prior": "laplace"}, "diffusion.prior"),
        ({"time_sampling": "beta"}, "diffusion.time_sampling"),
        ({"dog_weight": -1.0}, "diffusion.dog_weight"),
        ({"label_dropout": 1.5}, "diffusion.label_dropout"),
        ({"mixup": True, "mixup_alpha": 0.0}, "diffusion.mixup_alpha"),
        ({"dog_bands": [0.0]}, "diffusion.dog_bands"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        StaleObjective(**kwargs)


def test_mixup_touches_the_hinge_branch_only():
    """With the uniform prior, x_t - t x lies in (1 - t)[-1, 1]^d exactly when x_t was built from the clean
    clip x. Clips are constants of alternating sign, so a blended clip breaks that bound."""
    calls = []

    def recording_model(x_t, t, y):
        calls.append((x_t.clone(), t.clone(), y.clone()))
        return torch.zeros_like(x_t), torch.zeros(x_t.shape[0], 3)

    torch.manual_seed(0)
    b = 64
    x = (torch.arange(b) % 2 * 1.8 - 0.9).view(b, 1, 1, 1, 1).expand(b, 1, 2, 4, 4).contiguous()
    y = torch.arange(b) % 3
    obj = StaleObjective(label_dropout=0.0, hinge_fraction=1.0, mixup=True, mixup_alpha=1.0)
    obj(recording_model, x, y, null_label=3)
    (x_flow, t_flow, y_flow), (x_hinge, t_hinge, y_hinge) = calls

    def excess(x_t, t):  # how far x_t - t x leaves the box (1 - t)[-1, 1]^d, per clip
        tt = t.view(-1, 1, 1, 1, 1)
        return ((x_t - tt * x).abs() - (1 - tt)).flatten(1).amax(1)

    assert torch.equal(y_flow, y) and (y_hinge == 3).all()  # the hinge branch is label-free
    assert (excess(x_flow, t_flow) <= 1e-5).all()  # the flow branch saw the clean clips
    assert (excess(x_hinge, t_hinge) > 0.05).sum() >= 5  # the hinge branch saw blends


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dog_weight": 0.1, "dog_temporal": True, "mixup": True},
        {"context_frames": 1, "context_prob": 0.5, "prior": "gaussian"},
        {"model": {"pos": "rope", "pattern": ["spatial", "temporal", "full"]}},
    ],
)
def test_objective_traces_as_one_graph(options):
    """Every setting of the objective is one Dynamo graph with the model inside (no graph break): the compiled
    training step uses fullgraph=True. Value checks (labels in range) stay eager-only; the DoG gains are constants.
    "model" entries are model overrides (model.pos=rope: its tables are built inside the graph)."""
    torch._dynamo.reset()
    options = dict(options)
    model = build_model("tiny", frames=4, size=16, num_classes=4, **options.pop("model", {}))
    objective = StaleObjective(**options)
    x, y = torch.rand(4, 3, 4, 16, 16) * 2 - 1, torch.randint(0, 4, (4,))
    explained = torch._dynamo.explain(lambda x, y: objective(model, x, y, 4))(x, y)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1
