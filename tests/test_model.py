"""The Stale Transformer: shapes, adaLN-Zero, attention, mixing pattern, joy token, FLOPs, sizes, scale features."""

import dataclasses
import math

import pytest
import torch
from hydra.utils import instantiate
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stale.models import StaleBlock, StaleConfig, StaleTransformer, build_model
from stale.models.flops import count_parameters, forward_flops, parameter_count, training_flops_per_clip
from stale.models.stale_transformer import Attention, pos_embed_3d

SMALL = dict(dim=32, depth=2, heads=2)  # fast on a CPU; every test below holds for any width


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (the zero-initialised gates too) by noise, so blocks are no longer the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # norm gains stay near 1
            p.copy_(gain + torch.randn(p.shape, generator=g) * std)
    return model


def inputs(b=2, c=3, T=4, H=8, W=8, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(b, c, T, H, W, generator=g) * 2 - 1,
        torch.rand(b, generator=g),
        torch.randint(0, num_classes + 1, (b,), generator=g),
    )


def loss_of(v, s):
    return v.square().mean() + s.square().mean()


@pytest.mark.parametrize("pattern", ["alternating", "full"])
def test_velocity_is_exactly_zero_at_init(pattern):
    """adaLN-Zero and the zero final layer: a fresh model predicts v = 0 for any input."""
    model = build_model("tiny", **SMALL, pattern=pattern)
    x, t, y = inputs()
    v, scores = model(x * 5, t, y)
    assert torch.equal(v, torch.zeros_like(v))
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize(
    "T,H,W,patch", [(8, 16, 16, (1, 4, 4)), (4, 8, 12, (2, 4, 4)), (1, 8, 8, (1, 2, 2)), (6, 16, 8, (2, 2, 2))]
)
@pytest.mark.parametrize("num_classes,outputs", [(2, 1), (5, 5)])
def test_shapes_for_any_grid(T, H, W, patch, num_classes, outputs):
    # frames=8, size=16: the training clip size; other (T, H, W) divisible by the patch must work too
    model = randomize(build_model("tiny", **SMALL, patch=patch, num_classes=num_classes, frames=8, size=16))
    x, t, y = inputs(T=T, H=H, W=W, num_classes=num_classes)
    v, scores = model(x, t, y)
    assert v.shape == x.shape
    assert scores.shape == (2, outputs)
    assert v.abs().sum() > 0 and torch.isfinite(v).all()


def test_positional_code_depends_only_on_the_position():
    """The same (t, h, w) gets the same code in any grid, codes are distinct, and the joy token has no place."""
    small, big = pos_embed_3d(64, 2, 3, 4), pos_embed_3d(64, 5, 6, 7)  # (t, h*w+1, D)
    torch.testing.assert_close(small[:, :-1].view(2, 3, 4, 64), big[:2, :-1].view(2, 6, 7, 64)[:, :3, :4])
    torch.testing.assert_close(small[:, -1], big[:2, -1])  # joy: its frame's time code only
    flat = big.reshape(-1, 64)
    dist = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e3
    assert dist.min() > 1e-2  # every token of the grid, joy included, has its own code


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_equals_naive_softmax_reference(qk_norm):
    torch.manual_seed(0)
    attn = randomize(Attention(dim=32, heads=4, qk_norm=qk_norm), std=0.3)
    x = torch.randn(3, 7, 32)  # (S, L, D)
    q, k, v = attn.qkv(x).view(3, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)  # each (S, heads, L, d)
    if qk_norm:  # RMSNorm with a learned gain, written out
        q = q / q.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * attn.q_norm.weight
        k = k / k.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * attn.k_norm.weight
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (S, heads, L, L)
    reference = attn.proj((weights @ v).transpose(1, 2).reshape(3, 7, 32))
    torch.testing.assert_close(attn(x), reference, atol=1e-5, rtol=1e-5)


def test_qk_norm_backward_on_cpu_matches_finite_differences():
    """QKNorm trains on CPUs through a written-out backward: gradcheck holds it against finite differences (for
    the input and the gain, on a strided (S, heads, L, d) view as Attention passes it), and its forward equals
    torch's rms_norm, which inference and export use."""
    from stale.models.stale_transformer import QKNorm

    torch.manual_seed(0)
    norm = QKNorm(8, eps=1e-6).double()
    weight = (1.0 + 0.3 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    qkv = torch.randn(2, 5, 3, 3, 8, dtype=torch.float64)  # (S, L, 3, heads, d), as the qkv projection's output
    q = qkv[:, :, 0].transpose(1, 2).requires_grad_()  # (S, heads, L, d), strided as Attention passes it

    def qk_norm(x, w):
        return torch.func.functional_call(norm, {"weight": w}, (x, torch.float64))

    assert torch.autograd.gradcheck(qk_norm, (q, weight))
    assert qk_norm(q, weight).grad_fn.name() == "_RMSNormBackwardBackward"  # the written-out backward was checked
    with torch.no_grad():
        torch.testing.assert_close(qk_norm(q, weight), torch.nn.functional.rms_norm(q, (8,), weight, 1e-6))


@pytest.mark.parametrize("mode", ["spatial", "temporal", "full"])
def test_block_mixes_only_along_its_axis(mode):
    """Perturb one token of one clip: spatial blocks change only its frame, temporal only its position's
    sequence over time, full everything of that clip; the other clip in the batch never changes."""
    block = randomize(StaleBlock(dim=32, heads=2, mlp_ratio=2.0, mode=mode, qk_norm=True), std=0.2)
    torch.manual_seed(0)
    x, c = torch.randn(2, 4, 5, 32), torch.randn(2, 32)  # (B, T', N, D): 4 frames, 4 patches + joy
    x2 = x.clone()
    t0, n0 = 1, 2
    x2[0, t0, n0] += torch.randn(32)  # not a constant shift, which LayerNorm would erase
    changed = (block(x2, c) - block(x, c)).abs().amax(-1) > 1e-4  # (B, T', N)
    expected = torch.zeros(2, 4, 5, dtype=torch.bool)
    if mode == "spatial":
        expected[0, t0, :] = True
    elif mode == "temporal":
        expected[0, :, n0] = True
    else:
        expected[0] = True
    assert torch.equal(changed, expected), f"{mode}: changed tokens\n{changed[0].int()}"


def test_alternating_model_joy_token_reads_the_whole_clip():
    """Spatial then temporal: the joy token of any frame hears every patch of every frame."""
    model = randomize(build_model("tiny", **SMALL, pattern="alternating"), std=0.1)
    x, t, y = inputs(T=4, H=8, W=8)
    x2 = x.clone()
    x2[0, :, 0, :4, :4] = torch.rand(3, 4, 4)  # one patch of the first frame of clip 0
    _, s1 = model(x, t, y)
    _, s2 = model(x2, t, y)
    assert (s2[0] - s1[0]).abs().max() > 1e-5
    torch.testing.assert_close(s2[1], s1[1], atol=0, rtol=0)


def test_joy_token_is_a_fixed_buffer_unchanged_by_training():
    model = randomize(build_model("tiny", **SMALL, num_classes=3), std=0.05)
    joy0 = model.joy_token.clone()
    assert "joy_token" in dict(model.named_buffers()) and "joy_token" in model.state_dict()
    assert all(p is not model.joy_token for p in model.parameters())
    assert not model.joy_token.requires_grad
    torch.testing.assert_close(joy0.pow(2).mean(), torch.tensor(1.0))  # unit RMS, deterministic from the seed
    assert torch.equal(joy0, build_model("tiny", **SMALL).joy_token)
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, t, y = inputs(num_classes=3)
    for _ in range(2):
        v, scores = model(x, t, y)
        loss_of(v, scores).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.joy_token, joy0)
    assert not torch.equal(params0["head.linear.weight"], model.head.linear.weight)  # training did happen
    assert not torch.equal(params0["blocks.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)


def test_null_label_is_an_extra_row():
    model = randomize(build_model("tiny", **SMALL, num_classes=4))
    assert model.y_embed.embedding_table.num_embeddings == 5
    x, t, _ = inputs(b=1)
    v_null, _ = model(x, t, torch.tensor([4]))  # the null label
    v_cond, _ = model(x, t, torch.tensor([1]))
    assert (v_null - v_cond).abs().max() > 1e-6


@pytest.mark.parametrize(
    "pattern,patch,T,H,pos",
    [
        ("alternating", (1, 4, 4), 8, 16, "sincos"),
        ("full", (1, 4, 4), 8, 16, "sincos"),
        ("alternating", (2, 2, 2), 4, 8, "sincos"),
        (("spatial", "spatial", "temporal"), (1, 2, 2), 3, 8, "sincos"),
        (("spatial", "temporal", "full"), (1, 4, 4), 4, 16, "rope"),
    ],
)
def test_analytic_flops_match_flop_counter(pattern, patch, T, H, pos):
    """3 x forward analytic FLOPs per clip vs FlopCounterMode on a real forward + backward (math SDPA, which
    the counter sees; the CPU flash kernel has no FLOP formula). RoPE's rotations are elementwise: no product."""
    model = randomize(
        build_model(
            "tiny", dim=64, depth=3, heads=4, pattern=pattern, patch=patch, frames=T, size=H, num_classes=3, pos=pos
        )
    )
    x, t, y = inputs(b=2, T=T, H=H, W=H, num_classes=3)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss_of(*model(x, t, y)).backward()
    measured = counter.get_total_flops() / 2  # per clip
    analytic = training_flops_per_clip(model.config)
    assert abs(analytic / measured - 1) < 0.05, (analytic, measured)
    assert training_flops_per_clip(model.config, frames=2 * T, size=2 * H) > 4 * analytic  # scales with the clip
    assert count_parameters(model) == parameter_count(model.config)


def test_full_attention_flops_grow_quadratically_alternating_linearly():
    """From 8 to 64 frames (8x) at size S, 16x16 clips: alternating costs 8x, full attention 64x."""
    alt = StaleConfig(**DIT["s"], patch=(1, 2, 2), pattern="alternating")
    full = dataclasses.replace(alt, pattern="full")
    a8, a64 = (forward_flops(alt, frames=T) for T in (8, 64))
    f8, f64 = (forward_flops(full, frames=T) for T in (8, 64))
    assert a64["total"] / a8["total"] < 8 * 1.1  # linear: temporal attention is quadratic but over T' alone
    assert f64["attention"] / f8["attention"] == pytest.approx(64)
    assert f64["total"] / f8["total"] > 2 * a64["total"] / a8["total"]


# DiT-S/B/L/XL (Peebles & Xie 2023, Table 1) and the CPU size, typed here rather than read from SIZES
DIT = {
    "tiny": dict(dim=128, depth=4, heads=4),
    "s": dict(dim=384, depth=12, heads=6),
    "b": dict(dim=768, depth=12, heads=12),
    "l": dict(dim=1024, depth=24, heads=16),
    "xl": dict(dim=1152, depth=28, heads=16),
}


@pytest.mark.parametrize("name", list(DIT))
def test_every_size_builds_from_hydra_config(name, compose_train):
    """model=tiny|s|b|l|xl compose and instantiate; on the meta device, so XL costs no memory."""
    cfg = compose_train(f"model={name}")
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, StaleTransformer)
    assert {k: getattr(model.config, k) for k in ("dim", "depth", "heads")} == DIT[name]
    assert model.config.frames == cfg.data.frames and model.config.num_classes == cfg.data.num_classes
    assert count_parameters(model) == parameter_count(model.config)
    assert model.joy_token.device.type == "cpu" and torch.isfinite(model.joy_token).all()  # real even on meta
    assert [b.mode for b in model.blocks][:2] == ["spatial", "temporal"]


def test_dit_sizes_have_dit_parameter_counts():
    """Within 3% of DiT's published counts (DiT has no joy head, label table of 1001 rows, 2D patches)."""
    dit = {"s": 33e6, "b": 130e6, "l": 458e6, "xl": 675e6}
    for name, n in dit.items():
        assert abs(parameter_count(StaleConfig(**DIT[name], patch=(1, 2, 2))) / n - 1) < 0.03


def test_pattern_from_config(compose_train):
    cfg = compose_train("model=tiny", "model.pattern=full")
    model = instantiate(cfg.model, _convert_="all")
    assert [b.mode for b in model.blocks] == ["full"] * model.config.depth


def test_bad_inputs_name_the_value():
    model = build_model("tiny", **SMALL, patch=(2, 4, 4))
    x, t, y = inputs(T=3)
    with pytest.raises(ValueError, match=r"\(T, H, W\)=\(3, 8, 8\).*model.patch"):
        model(x, t, y)
    with pytest.raises(ValueError, match="C=3"):
        model(x[:, :2], t, y)
    with pytest.raises(ValueError, match="model.pattern"):
        build_model("tiny", pattern=["spatial", "sideways"])
    with pytest.raises(ValueError, match="model.heads"):
        build_model("tiny", dim=30, heads=4)
    with pytest.raises(ValueError, match="widht"):
        build_model("tiny", widht=3)
    with pytest.raises(ValueError, match="model.name"):
        build_model("xxl")


def _forward_backward(model, x, t, y):
    model.zero_grad(set_to_none=True)
    v, s = model(x, t, y)
    loss_of(v, s).backward()
    module = getattr(model, "_orig_mod", model)  # the compiled wrapper prefixes names with _orig_mod
    return v.detach(), s.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def _assert_same(a, b, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=1e-5)
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], atol=atol, rtol=1e-4, msg=lambda m: f"grad of {n}: {m}")


def test_gradient_checkpointing_matches_eager():
    model = randomize(build_model("tiny", **SMALL))
    x, t, y = inputs()
    eager = _forward_backward(model, x, t, y)
    model.config.grad_checkpointing = True
    _assert_same(_forward_backward(model, x, t, y), eager)


def test_compile_with_checkpointing_matches_eager():
    """torch.compile captures the whole model (fullgraph: no graph breaks) with checkpointed blocks.
    aot_eager exercises Dynamo and AOTAutograd in seconds; Inductor codegen is the slow test below."""
    model = randomize(build_model("tiny", **SMALL, grad_checkpointing=True))
    x, t, y = inputs()
    eager = _forward_backward(model, x, t, y)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _assert_same(_forward_backward(compiled, x, t, y), eager)


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    model = randomize(build_model("tiny", dim=32, depth=2, heads=2, grad_checkpointing=True))
    x, t, y = inputs()
    eager = _forward_backward(model, x, t, y)
    torch._dynamo.reset()
    _assert_same(_forward_backward(torch.compile(model), x, t, y), eager, atol=1e-5)


def test_bf16_autocast_on_cpu_with_checkpointing():
    model = randomize(build_model("tiny", **SMALL, grad_checkpointing=True))
    x, t, y = inputs()
    v32, s32, _ = _forward_backward(model, x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, s = model(x, t, y)
        loss_of(v, s).backward()
    assert v.dtype == torch.bfloat16  # matmuls ran in bf16 ...
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    rel = (v.float() - v32).norm() / v32.norm()
    assert rel < 0.05, rel  # ... and the float32 residual stream keeps the result close


def test_x_prediction_returns_the_velocity_that_lands_on_its_clean_estimate():
    """model.prediction=data: the zero-initialised last layer predicts x1_hat = 0, so v = (0 - x_t) / (1 - t),
    with 1 - t floored at t_eps; training, sampling and export see a velocity either way."""
    model = build_model("tiny", prediction="data", t_eps=0.05)
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    v, _ = model(x, torch.tensor([0.3, 0.99]), torch.tensor([0, 1]))
    torch.testing.assert_close(v[0], -x[0] / 0.7)
    torch.testing.assert_close(v[1], -x[1] / 0.05)  # 1 - 0.99 = 0.01 is floored at t_eps
    with pytest.raises(ValueError, match="model.prediction"):
        build_model("tiny", prediction="noise")
