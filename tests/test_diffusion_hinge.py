"""cr-hinge: binary and Crammer-Singer, against hand values and sklearn.metrics.hinge_loss; mixup's loss."""

import numpy as np
import pytest
import torch
from sklearn.metrics import hinge_loss as sk_hinge

from stale.diffusion.hinge import binary_hinge, crammer_singer_hinge, hinge_loss, margin, predict
from stale.diffusion.mixup import mixup, mixup_hinge


def test_binary_hinge_hand_values():
    scores = torch.tensor([2.0, 0.5, -1.0, 0.3])
    # y=+1: max(0, 1-2)=0, 1-0.5=0.5, 1+1=2; y=-1: 1+0.3=1.3 -> mean 0.95
    for labels in (torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 1, -1])):
        assert binary_hinge(scores, labels).item() == pytest.approx(0.95)
        assert binary_hinge(scores, labels, reduction="none").tolist() == pytest.approx([0.0, 0.5, 2.0, 1.3])
    assert hinge_loss(scores[:, None], torch.tensor([1, 1, 1, 0])).item() == pytest.approx(0.95)


def test_crammer_singer_hand_values():
    scores = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 1.5], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    # margins 3-1=2 -> 0; 2-1.5=0.5 -> 0.5; 0-0=0 -> 1 -> mean 0.5
    assert margin(scores, labels).tolist() == pytest.approx([2.0, 0.5, 0.0])
    assert crammer_singer_hinge(scores, labels).item() == pytest.approx(0.5)
    assert hinge_loss(scores, labels).item() == pytest.approx(0.5)


def test_binary_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 2, (200,), generator=g)
    ref = sk_hinge(labels.numpy(), scores.numpy())
    assert binary_hinge(scores, labels).item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("k", [3, 5])
def test_crammer_singer_matches_sklearn(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(300, k, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (300,), generator=g)
    ref = sk_hinge(labels.numpy(), scores.numpy(), labels=np.arange(k))
    assert crammer_singer_hinge(scores, labels).item() == pytest.approx(ref, rel=1e-12)


def test_margin_sign_agrees_with_prediction():
    g = torch.Generator().manual_seed(3)
    scores, labels = torch.randn(100, 4, generator=g), torch.randint(0, 4, (100,), generator=g)
    assert torch.equal(margin(scores, labels) > 0, predict(scores) == labels)
    s1, l1 = torch.randn(100, 1, generator=g), torch.randint(0, 2, (100,), generator=g)
    assert torch.equal(margin(s1, l1) > 0, predict(s1) == l1)


def test_hinge_rejects_bad_labels():
    with pytest.raises(ValueError, match="binary hinge labels"):
        binary_hinge(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="mix 0 and -1"):
        binary_hinge(torch.zeros(3), torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="out of range"):
        hinge_loss(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_mixup_blends_inputs_and_losses():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 2, 4, 4)
    y = torch.randint(0, 3, (16,))
    xm, ya, yb, lam = mixup(x, y, alpha=0.2)
    assert ((lam >= 0) & (lam <= 1)).all() and torch.equal(ya, y)
    # every mixed clip is lam x_a + (1 - lam) x_b for the partner whose label is yb
    partner = (xm - lam.view(-1, 1, 1, 1, 1) * x) / (1 - lam.view(-1, 1, 1, 1, 1)).clamp_min(1e-6)
    for i in range(16):
        if lam[i] < 0.999:
            j = int(((x - partner[i]).flatten(1).abs().amax(1)).argmin())
            assert torch.allclose(partner[i], x[j], atol=1e-3) and yb[i] == y[j]
    scores = torch.randn(16, 3)
    expect = (lam * hinge_loss(scores, ya, "none") + (1 - lam) * hinge_loss(scores, yb, "none")).mean()
    assert mixup_hinge(scores, ya, yb, lam).item() == pytest.approx(expect.item())
    with pytest.raises(ValueError, match="mixup_alpha"):
        mixup(x, y, alpha=0.0)
