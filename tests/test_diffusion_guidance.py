"""Guidance, checked against the exact oracle: classifier guidance is exact for the Gaussian prior
(Tweedie) and does nothing for the uniform prior (no Tweedie identity): there it is a heuristic."""

import pytest
import torch

from stale.diffusion import flow
from stale.diffusion.guidance import cfg_combine, classifier_free, classifier_guided, input_gradient
from stale.diffusion.oracle import Oracle


def _labelled_data():
    g = torch.Generator().manual_seed(0)
    data = torch.rand(6, 3, generator=g, dtype=torch.float64) * 1.6 - 0.8
    return data, torch.tensor([0, 0, 0, 1, 1, 1])


def _guided_and_conditional(prior):
    data, labels = _labelled_data()
    full, cond = Oracle(data, prior), Oracle(data[labels == 1], prior)

    def log_p_class1(x, t):  # exact log p(y=1 | x_t) = log sum_{i in class 1} w_i
        return full.weights(x, t)[:, labels == 1].sum(1).clamp_min(1e-300).log()

    guided = classifier_guided(full, input_gradient(log_p_class1), scale=1.0)
    g = torch.Generator().manual_seed(1)
    t = torch.rand(200, generator=g, dtype=torch.float64) * 0.7 + 0.2
    x = flow.interpolate(
        flow.sample_prior((200, 3), prior, generator=g, dtype=torch.float64),
        data[3 + torch.randint(0, 3, (200,), generator=g)],
        t,
    )  # points of class 1's path
    return full(x, t), guided(x, t), cond(x, t)


def test_classifier_guidance_is_exact_for_the_gaussian_prior():
    plain, guided, conditional = _guided_and_conditional("gaussian")
    assert torch.allclose(guided, conditional, atol=1e-8)
    assert (plain - conditional).abs().max() > 0.1  # and the guidance did real work


def test_classifier_guidance_cannot_reach_the_conditional_field_with_a_uniform_prior():
    plain, guided, conditional = _guided_and_conditional("uniform")
    assert torch.equal(guided, plain)  # p(y | x_t) is piecewise constant: zero gradient
    assert (plain - conditional).abs().max() > 0.1


def test_classifier_free_combination():
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    # b + 1 (a - b) is a only up to rounding: an entry near 0 beside entries near 1 misses allclose's atol 1e-8
    assert torch.allclose(cfg_combine(a, b, 1.0), a, atol=1e-6) and torch.equal(cfg_combine(a, b, 0.0), b)
    assert torch.allclose(cfg_combine(a, b, 3.0), b + 3 * (a - b))


def test_classifier_free_guidance_is_one_batched_call():
    """DiT's forward_with_cfg: w != 0, 1 makes ONE call over [x; x] with labels [y; null], not two calls."""
    calls = []

    def field(x, t, y):  # a label-conditional field: v = x + y (labels 1, 2; null label 0)
        calls.append((x.shape[0], y.tolist()))
        return x + y.view(-1, 1).to(x)

    x, t = torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.full((2,), 0.5)
    labels, null = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    out = classifier_free(field, labels, null, 3.0)(x, t)
    assert calls == [(4, [1, 2, 0, 0])]
    assert out.tolist() == [[3.0, 4.0], [8.0, 9.0]]  # v_null + 3 (v_y - v_null) = x + 3 y
    calls.clear()
    assert torch.equal(classifier_free(field, labels, null, 1.0)(x, t), x + torch.tensor([[1.0], [2.0]]))
    assert torch.equal(classifier_free(field, labels, null, 0.0)(x, t), x)
    assert calls == [(2, [1, 2]), (2, [0, 0])]  # w = 1 and w = 0: one pass of batch B each
    v = lambda x, t: x  # noqa: E731
    assert classifier_guided(v, None, scale=0.0) is v


def test_classifier_guidance_factor_is_capped_near_t0():
    v = classifier_guided(lambda x, t: torch.zeros_like(x), lambda x, t: torch.ones_like(x), scale=1.0, t_min=0.1)
    out = v(torch.zeros(2, 1), torch.tensor([0.0, 0.5]))
    assert out.flatten().tolist() == pytest.approx([10.0, 1.0])  # (1 - 0) / 0.1 and (1 - .5) / .5
