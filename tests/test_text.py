"""Text conditioning (docs/text.md): cross-attention, sizes and FLOPs, text encoders, captions, prompts."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stale.models import build_model
from stale.models.flops import count_parameters, parameter_count, training_flops_per_clip

SMALL = dict(dim=32, depth=2, heads=2, frames=4, size=8)


def randomize(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=g) * std)
    return model


def text_inputs(model, b=2, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, cfg.frames, cfg.size, cfg.size, generator=g) * 2 - 1
    t = torch.rand(b, generator=g)
    y = torch.zeros(b, dtype=torch.long)
    if cfg.text_vocab:
        text = torch.randint(0, cfg.text_vocab, (b, cfg.text_len), generator=g)
    else:
        text = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None] < torch.tensor([3, cfg.text_len])[:b, None]  # one padded caption
    return x, t, y, text, mask


@pytest.mark.parametrize("learned", [False, True])
def test_text_model_sizes_flops_and_checkpointing(learned):
    extra = dict(text_vocab=11, text_len=6, text_layers=2) if learned else dict(text_dim=24, text_len=5)
    model = randomize(build_model("tiny", **SMALL, cond="text", **extra))
    assert count_parameters(model) == parameter_count(model.config)
    x, t, y, text, mask = text_inputs(model)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        v, s = model(x, t, y, text, mask)
        (v.pow(2).mean() + s.sum()).backward()
    measured = counter.get_total_flops() / 2
    analytic = training_flops_per_clip(model.config)
    assert abs(analytic / measured - 1) < 0.05, (analytic, measured)
    assert s.shape == (2, 1)  # the match score
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config.grad_checkpointing = True
    model.train()
    v2, s2 = model(x, t, y, text, mask)
    (v2.pow(2).mean() + s2.sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_text_blocks_start_as_identity_and_padding_is_ignored():
    model = build_model("tiny", **SMALL, cond="text", text_dim=24, text_len=5)
    x, t, y, text, mask = text_inputs(model)
    tokens = torch.randn(2, 4, 5, 32)
    c = torch.randn(2, 1, 32)
    ctx = torch.randn(2, 5, 32)
    for block in model.blocks:
        torch.testing.assert_close(block(tokens, c, ctx, mask), tokens)
    randomize(model)
    v, _ = model(x, t, y, text, mask)
    junk = text.clone()
    junk[0, 3:] = 100.0  # only the padding of caption 0 changes
    v2, _ = model(x, t, y, junk, mask)
    torch.testing.assert_close(v, v2)
    other = text.clone()
    other[0, 0] += 1.0  # a real token changes the velocity
    assert not torch.allclose(model(x, t, y, other, mask)[0][0], v[0])


def test_text_model_refuses_missing_caption():
    model = build_model("tiny", **SMALL, cond="text", text_dim=24, text_len=5)
    x, t, y, _, _ = text_inputs(model)
    with pytest.raises(ValueError, match="cond=text needs text"):
        model(x, t, y)
    with pytest.raises(ValueError, match="model.cond"):
        build_model("tiny", **SMALL, cond="caption")
