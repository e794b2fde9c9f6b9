"""Rotary positions (model.pos=rope): 3D axial rotary embeddings inside attention (stale/models/rope.py).

The relative property, the joy token's rotation, every shape and T = 1, gradient checkpointing, the
validation of the head split, and the bench section that measures rope against sin-cos (docs/buckets.md).
Sequence parallelism, torch.compile, FLOPs and ONNX are in tests/test_sequence_parallel.py,
tests/test_diffusion_objective.py, tests/test_model.py and tests/test_adaln.py (one export for both features).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from stale.models import build_model
from stale.models.rope import rope_dims, rotate, tables


def randomize(model, std=0.05):
    """adaLN-Zero starts every block as the identity: give the weights values, so attention matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_head_split_is_wans():
    # Wan 2.1: d - 4 (d // 6) channels for time, 2 (d // 6) for height and for width; 128 -> 44, 42, 42
    assert rope_dims(128) == (44, 42, 42) and rope_dims(32) == (12, 10, 10) and rope_dims(6) == (2, 2, 2)


def test_scores_depend_only_on_the_offset_per_axis():
    """One query vector and one key vector placed at every token of a 3 x 4 x 5 grid: with the full table, the
    score of (query at i, key at j) is the same for every pair with the same (dt, dh, dw), and differs across offsets."""
    t, h, w, d = 3, 4, 5, 16
    cos, sin = tables(d, t, h, w)["full"]
    g = torch.Generator().manual_seed(0)
    q0, k0 = torch.randn(d, generator=g), torch.randn(d, generator=g)
    n = h * w + 1
    q = rotate(q0.expand(t * n, d), cos, sin)
    k = rotate(k0.expand(t * n, d), cos, sin)
    scores = q @ k.T  # (t N, t N)
    patches = [(a, b, c) for a in range(t) for b in range(h) for c in range(w)]
    index = {p: p[0] * n + p[1] * w + p[2] for p in patches}
    by_offset: dict = {}
    for i, j in itertools.product(patches, patches):
        off = tuple(x - y for x, y in zip(i, j))
        by_offset.setdefault(off, []).append(scores[index[i], index[j]].item())
    spread = max(max(v) - min(v) for v in by_offset.values())
    assert spread < 1e-5, spread
    means = torch.tensor([sum(v) / len(v) for v in by_offset.values()])
    assert means.max() - means.min() > 0.1  # positions do matter
    # each axis on its own matters: offsets along t, h and w alone each change the score
    base = by_offset[(0, 0, 0)][0]
    assert all(abs(by_offset[o][0] - base) > 1e-3 for o in ((1, 0, 0), (0, 1, 0), (0, 0, 1)))


def test_pos_base_scales_rope_positions_to_the_frame():
    """model.pos_base with rope: a 4 x 4 grid at base 4 keeps integer positions; an 8 x 8 grid's patch 2 k sits
    where the 4 x 4 grid's patch k does (position interpolation); time is not scaled."""
    d = 16
    small, big = tables(d, 2, 4, 4, base=4)["full"], tables(d, 2, 8, 8, base=4)["full"]
    plain = tables(d, 2, 4, 4)["full"]
    assert all(torch.allclose(a, b) for a, b in zip(small, plain))
    ns, nb = 4 * 4 + 1, 8 * 8 + 1
    for frame in (0, 1):
        for i, j in ((1, 1), (2, 3), (3, 0)):
            assert torch.allclose(small[1][frame * ns + i * 4 + j], big[1][frame * nb + 2 * i * 8 + 2 * j], atol=1e-6)


def test_spatial_and_temporal_tables_rotate_only_their_axes():
    t, h, w, d = 3, 2, 2, 16
    dt, dh, dw = rope_dims(d)
    tab = tables(d, t, h, w)
    cos_s, sin_s = tab["spatial"]  # (N, d/2): no time angle
    assert cos_s.shape == (h * w + 1, d // 2) and torch.all(sin_s[:, : dt // 2] == 0)
    cos_t, sin_t = tab["temporal"]  # (t, d/2): no place angle
    assert cos_t.shape == (t, d // 2) and torch.all(sin_t[:, dt // 2 :] == 0) and sin_t[1:, : dt // 2].abs().sum() > 0
    full = tab["full"][1].view(t, h * w + 1, d // 2)
    assert torch.allclose(full[..., : dt // 2], sin_t[:, None, : dt // 2].expand(t, h * w + 1, dt // 2))


def test_joy_token_is_identity_in_space_and_turns_with_its_frame_in_time():
    t, h, w, d = 3, 2, 3, 16
    dt = rope_dims(d)[0]
    tab = tables(d, t, h, w)
    q = torch.randn(h * w + 1, d)
    assert torch.equal(rotate(q, *tab["spatial"])[-1], q[-1])  # spatial attention: the joy token is not rotated
    assert not torch.allclose(rotate(q, *tab["spatial"])[-2], q[-2])  # the last patch is
    cos, sin = (a.view(t, h * w + 1, d // 2) for a in tab["full"])
    joy_cos, joy_sin = cos[:, -1], sin[:, -1]  # (t, d/2)
    assert torch.all(joy_cos[:, dt // 2 :] == 1) and torch.all(joy_sin[:, dt // 2 :] == 0)  # no place
    assert torch.allclose(joy_sin[:, : dt // 2], tab["temporal"][1][:, : dt // 2])  # its frame's time


@pytest.mark.parametrize("pattern", ["alternating", "full"])
def test_rope_model_runs_at_any_shape(pattern):
    model = randomize(build_model("tiny", dim=32, heads=4, depth=2, pattern=pattern, frames=4, size=16, pos="rope"))
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 16, 16), (4, 8, 24), (3, 20, 12)):  # T = 1 (images: Attention._single), other aspects
        x = torch.randn(2, 3, *shape, generator=g)
        v, s = model(x, torch.rand(2, generator=g), torch.tensor([0, 1]))
        assert v.shape == x.shape and torch.isfinite(v).all() and torch.isfinite(s).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, y = torch.randn(2, 3, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    grads = []
    for ckpt in (False, True):
        model = randomize(
            build_model(
                "tiny",
                dim=32,
                heads=4,
                depth=3,
                pattern=["spatial", "temporal", "full"],
                frames=4,
                size=8,
                pos="rope",
                grad_checkpointing=ckpt,
            )
        ).train()
        v, s = model(x, t, y)
        (v.square().mean() + s.sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(dim=32, heads=8),
            r"model.pos=rope splits the head dimension model.dim / model.heads = 32 / 8 = 4 into "
            r"even time/height/width parts \(4, 0, 0\)",
        ),
        (dict(dim=56, heads=8), r"= 56 / 8 = 7 into even time/height/width parts \(3, 2, 2\)"),
    ],
)
def test_bad_rope_configs_name_the_keys(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model("tiny", pos="rope", **overrides)
    with pytest.raises(ValueError, match=r"model.pos='alibi' is not one of \('sincos', 'rope'\)"):
        build_model("tiny", pos="alibi")


def test_hydra_config_takes_model_pos(tmp_path, compose_train):
    from hydra.utils import instantiate

    cfg = compose_train("model.pos=rope")
    assert instantiate(cfg.model, _convert_="all").config.pos == "rope"


def test_pos_bench_section_runs():
    from stale.bench import SECTIONS, parse_sections
    from stale.bench.pos import run

    assert parse_sections("pos") == ["pos"] and SECTIONS["pos"] == "stale.bench.pos"
    out = run(
        steps=3,
        seeds=1,
        eval_clips=1,
        dim=32,
        depth=2,
        evals={"trained 4x16x16": [4, 16, 16], "unseen 4x24x24": [4, 24, 24]},
    )
    rows = {r["variant"]: r for r in out["rows"]}
    assert list(rows) == ["sincos", "sincos_scaled", "rope", "rope_scaled"]
    assert rows["sincos"]["steps_per_s_vs_sincos"] == 1.0 and rows["rope"]["steps_per_s_vs_sincos"] > 0
    assert all(0 < r["unseen 4x24x24"] < 10 for r in rows.values())
    assert out["summary"]["best_unseen"] in rows and len(out["per_seed"]) == 4
