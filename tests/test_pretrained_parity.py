"""Pretrained diffusers video transformers behind stale's forward (Wan, LTX-Video): with the joy token off the
adapter is the diffusers module's own forward, called as the family's pipeline calls it, bit for bit; with it on,
the joy token is an unrotated, fixed extra token whose state the hinge head reads; bad folders and classes fail
with a BackboneError that names the key. The pipelines are tiny random-init ones saved to folders and loaded the
way a user's hub id is (load_backbone)."""

import json
from fnmatch import fnmatch

import diffusers
import pytest
import torch

from helpers import tiny_pipeline
from stale.models.pretrained import BackboneError, backbone_config, load_backbone
from stale.models.stale_transformer import JoyTokenMismatchError

FAMILIES = ("wan", "ltx")
CLASSES = {"wan": "WanTransformer3DModel", "ltx": "LTXVideoTransformer3DModel"}
B, T, H, W, L = 2, 3, 4, 6, 6  # a latent clip (H != W: a swapped axis shows) and 6 caption tokens
LTX_ROPE = (8 / 25, 32, 32)  # LTXPipeline's rope_interpolation_scale: its VAE (8x time, 32x space), frame_rate=25


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, family):
    return tiny_pipeline(tmp_path_factory, family)


@pytest.fixture(scope="module")
def models(folder):
    """joy=False and joy=True adapters of one folder, and the bare diffusers module loaded on its own."""
    plain, joyful = load_backbone(str(folder), joy=False), load_backbone(str(folder), joy=True)
    bare = getattr(diffusers, plain.config.family).from_pretrained(str(folder), subfolder="transformer")
    return plain.eval(), joyful.eval(), bare.eval()


def inputs(seed: int = 0, per_frame: bool = False):
    """x_t (B, C=4, T, H, W), t (B,) or (B, T), text (B, L, 16) with arbitrary rows past each caption's length
    (as a text encoder leaves them), and the mask of 4 and 2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, T, H, W, generator=g)
    t = torch.rand((B, T) if per_frame else (B,), generator=g)
    text = torch.randn(B, L, 16, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([[4], [2]])
    return x, t, text, mask


def diffusers_prediction(family: str, bare, x, t, text, mask, rope=LTX_ROPE):
    """The bare module called the way WanPipeline / LTXPipeline (or its image-to-video path, per token) call it."""
    sigma = (1 - t) * 1000  # the families' timestep: the noise level on a 0..1000 scale
    if family == "wan":
        pt, ph, pw = bare.config.patch_size
        timestep = sigma.repeat_interleave((H // ph) * (W // pw), dim=1) if sigma.ndim == 2 else sigma
        context = text * mask[..., None]  # WanPipeline: zeros past each prompt's length, no mask
        return bare(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]
    p, pt = bare.config.patch_size, bare.config.patch_size_t
    timestep = sigma.repeat_interleave((H // p) * (W // p), dim=1) if sigma.ndim == 2 else sigma
    out = bare(
        hidden_states=diffusers.LTXPipeline._pack_latents(x, p, pt),
        encoder_hidden_states=text,
        timestep=timestep,
        encoder_attention_mask=mask,
        num_frames=T // pt,
        height=H // p,
        width=W // p,
        rope_interpolation_scale=rope,
        return_dict=False,
    )[0]
    return diffusers.LTXPipeline._unpack_latents(out, T // pt, H // p, W // p, p, pt)


# --------------------------------------------------------------------------------------------------------
# (a) joy=False: the family's own forward, bit for bit


@pytest.mark.parametrize("per_frame", [False, True], ids=["t(B)", "t(B,T')"])
def test_velocity_is_minus_the_diffusers_forward_bit_for_bit(family, models, per_frame):
    plain, _, bare = models
    x, t, text, mask = inputs(per_frame=per_frame)
    with torch.no_grad():
        v, scores = plain(x, t, torch.zeros(B, dtype=torch.long), text, mask)
        ref = diffusers_prediction(family, bare, x, t, text, mask)
    assert v.shape == x.shape and torch.equal(v, -ref)
    assert torch.equal(scores, torch.zeros(B, 1))  # no joy token, no scores


def test_ltx_rope_scale_is_the_pipelines_rope_interpolation_scale(tmp_path_factory):
    """model.rope_scale for another VAE or frame rate: LTXPipeline's rope_interpolation_scale, a tiny VAE's here."""
    folder = str(tiny_pipeline(tmp_path_factory, "ltx"))
    bare = diffusers.LTXVideoTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
    tiny_vae = (4 / 24, 4, 4)  # a VAE compressing time and space by 4, at LTXPipeline(frame_rate=24)
    plain = load_backbone(folder, joy=False, rope_scale=list(tiny_vae)).eval()
    assert plain.rope_scale_of(4, 4, frame_rate=24) == tiny_vae and plain.rope_scale_of(8, 32) == LTX_ROPE
    x, t, text, mask = inputs()
    with torch.no_grad():
        v = plain(x, t, None, text, mask)[0]
        assert torch.equal(v, -diffusers_prediction("ltx", bare, x, t, text, mask, rope=tiny_vae))
        assert not torch.allclose(v, load_backbone(folder, joy=False).eval()(x, t, None, text, mask)[0])


def test_the_caption_mask_is_honoured(family, models):
    """The rows past a caption's length do not change the velocity (Wan: zeroed; LTX: masked out of attention)."""
    plain, _, _ = models
    x, t, text, mask = inputs()
    other = torch.where(mask[..., None], text, torch.randn_like(text))
    short = mask.clone()
    short[0, 3] = False  # a caption one token shorter does change it
    with torch.no_grad():
        v = plain(x, t, None, text, mask)[0]
        assert torch.equal(v, plain(x, t, None, other, mask)[0])
        assert not torch.allclose(v, plain(x, t, None, text, short)[0])


# --------------------------------------------------------------------------------------------------------
# (b) joy=True: one fixed, unrotated extra token read by the hinge head


def first_block_rope(model, x, t, text, mask):
    """The RoPE (cos, sin) the first transformer block receives (Wan (1, S, 1, d), LTX (B, S, D))."""
    seen = {}
    block = model.blocks[0]
    handle = block.register_forward_pre_hook(lambda module, args: seen.update(rope=args[3]))  # returns None
    try:
        with torch.no_grad():
            model(x, t, None, text, mask)
    finally:
        handle.remove()
    return seen["rope"]


def test_the_joy_token_changes_the_output_and_has_no_position(family, models):
    plain, joyful, _ = models
    x, t, text, mask = inputs()
    with torch.no_grad():
        v0, v1 = plain(x, t, None, text, mask)[0], joyful(x, t, None, text, mask)[0]
    assert v1.shape == x.shape and not torch.allclose(v0, v1)
    (cos0, sin0), (cos1, sin1) = first_block_rope(plain, x, t, text, mask), first_block_rope(joyful, x, t, text, mask)
    assert cos1.shape[1] == cos0.shape[1] + 1  # one more token than the clip's
    assert torch.equal(cos1[:, :-1], cos0) and torch.equal(sin1[:, :-1], sin0)  # the clip's positions unchanged
    assert torch.all(cos1[:, -1] == 1) and torch.all(sin1[:, -1] == 0)  # the joy token: the identity rotation
    assert not torch.all(cos0 == 1)  # (the clip's tokens are rotated: the test above can tell)


@pytest.mark.parametrize("per_frame", [False, True], ids=["t(B)", "t(B,T')"])
def test_the_scores_read_the_caption(family, models, per_frame):
    _, joyful, _ = models
    x, t, text, mask = inputs(per_frame=per_frame)
    with torch.no_grad():
        s = joyful(x, t, None, text, mask)[1]
        other = joyful(x, t, None, torch.randn_like(text), mask)[1]
    assert s.shape == (B, 1) and torch.isfinite(s).all() and not torch.allclose(s, other)


def test_gradients_reach_the_hinge_head_and_the_transformer(family, folder):
    model = load_backbone(str(folder)).train()
    x, t, text, mask = inputs(per_frame=True)
    _, scores = model(x, t, None, text, mask)
    scores.sum().backward()  # the scores alone: the joy token's state comes through every block
    assert model.head.linear.weight.grad.abs().sum() > 0
    blocks = model.blocks
    assert blocks[0].attn1.to_q.weight.grad.abs().sum() > 0 and blocks[-1].attn2.to_v.weight.grad.abs().sum() > 0
    assert model.joy_token.grad is None and not model.joy_token.requires_grad


def test_a_bf16_base_trains_in_the_callers_dtype(family, folder):
    """dtype=bfloat16 (a frozen bf16 base for LoRA): the module's own dtype, though Wan keeps some parts in float32;
    the velocity in the caller's dtype and the scores from the float32 hinge head."""
    model = load_backbone(str(folder), dtype="bfloat16").train()
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    x, t, text, mask = inputs(per_frame=True)
    v, scores = model(x, t, None, text, mask)
    assert v.dtype == scores.dtype == torch.float32 and torch.isfinite(v).all() and torch.isfinite(scores).all()
    (v.square().mean() + scores.sum()).backward()
    assert model.head.linear.weight.grad.abs().sum() > 0


def test_the_joy_token_is_a_fixed_buffer_checked_on_load(models):
    _, joyful, _ = models
    assert "joy_token" in dict(joyful.named_buffers()) and "joy_token" not in dict(joyful.named_parameters())
    state = joyful.state_dict()
    assert state["joy_token"].shape == (joyful.config.dim,)
    joyful.load_state_dict(state)  # its own token loads
    state["joy_token"] = state["joy_token"].roll(1)
    with pytest.raises(JoyTokenMismatchError, match="joy_token"):
        joyful.load_state_dict(state)


def test_widths_and_lora_targets_come_from_the_module(family, models):
    plain, _, _ = models
    c = plain.config
    assert c.family == CLASSES[family] and c.in_channels == 4 and c.text_dim == 16 and c.depth == 2 and c.heads == 2
    first = plain.blocks[0]
    ffn_in = next(m for n, m in first.named_modules() if n.endswith("net.0.proj"))  # the feed-forward's first linear
    assert c.dim == first.attn1.to_q.in_features and c.ffn_dim == ffn_in.out_features
    names = [n for n, _ in plain.named_modules()]
    for pattern in plain.lora_targets:  # every default target names one linear in each block
        hits = [n for n in names if fnmatch(n, pattern)]
        assert len(hits) == c.depth and all(isinstance(plain.get_submodule(n), torch.nn.Linear) for n in hits)


# --------------------------------------------------------------------------------------------------------
# (c) what cannot be loaded says why


def write_config(folder, class_name: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return folder


def test_an_unknown_class_is_refused_with_the_supported_ones(tmp_path):
    where = write_config(tmp_path / "flux", "FluxTransformer2DModel")
    with pytest.raises(BackboneError, match=r"model\.pretrained=.*_class_name='FluxTransformer2DModel'") as err:
        load_backbone(str(where), subfolder=None)
    assert "LTXVideoTransformer3DModel" in str(err.value) and "WanTransformer3DModel" in str(err.value)


def test_cogvideox_and_hunyuan_are_refused_as_not_adapted_yet(tmp_path):
    cog = tmp_path / "cog" / "transformer"
    diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).save_pretrained(str(cog))  # fmt: skip
    hunyuan = write_config(tmp_path / "hunyuan" / "transformer", "HunyuanVideoTransformer3DModel")
    for where, name in (
        (cog.parent, "CogVideoXTransformer3DModel"),
        (hunyuan.parent, "HunyuanVideoTransformer3DModel"),
    ):
        with pytest.raises(BackboneError, match=f"_class_name='{name}'.*not adapted yet") as err:
            load_backbone(str(where))
        assert "supported: ['LTXVideoTransformer3DModel', 'WanTransformer3DModel']" in str(err.value)


def test_a_missing_folder_or_subfolder_names_the_key(tmp_path, tmp_path_factory):
    with pytest.raises(BackboneError, match=r"model\.pretrained=.*nowhere: no such folder"):
        load_backbone(str(tmp_path / "nowhere"))
    with pytest.raises(BackboneError, match=r"model\.pretrained is not set"):
        load_backbone(None)
    folder = tiny_pipeline(tmp_path_factory, "ltx")
    with pytest.raises(BackboneError, match=r"model\.subfolder=None: .*config\.json does not exist"):
        load_backbone(str(folder), subfolder=None)  # a pipeline folder is not a transformer folder
    with pytest.raises(BackboneError, match=r"model\.in_channels=8 \(from the vae\) .* which has in_channels=4"):
        backbone_config(str(folder), in_channels=8)
    with pytest.raises(BackboneError, match=r"model\.rope_scale=.*WanTransformer3DModel's RoPE takes no scale"):
        backbone_config(str(tiny_pipeline(tmp_path_factory, "wan")), rope_scale=[1, 1, 1])
