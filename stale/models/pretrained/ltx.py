"""LTX-Video (diffusers' LTXVideoTransformer3DModel) behind stale's forward.

LTXVideoTransformer3DModel.forward, as diffusers 0.42 writes it, takes *packed* latents (B, S, C pt p p) in
(T', H', W') token order with the grid's num_frames / height / width, and: RoPE tables (cos, sin) (B, S, D) over the
full hidden width from the grid's coordinates times rope_interpolation_scale, the caption mask as an additive bias
(1 - mask) * -10000, proj_in (a Linear patch embedding), the time embedding (AdaLayerNormSingle: timestep (B,) or one
per token (B, S), as LTX's image-to-video and conditioning pipelines pass it), the caption projection, the blocks
(self-attention with RoPE, cross-attention to the caption under the mask, feed-forward, modulated by each block's
scale_shift_table plus temb), then norm_out modulated by the embedded timestep and proj_out. `run` packs stale's
(B, C, T, H, W) latents exactly as LTXPipeline._pack_latents does, runs that forward written from the same
submodules in the same order, and unpacks as LTXPipeline._unpack_latents does, with one change when config.joy: the
joy token is appended after proj_in with the identity rotation (cos 1, sin 0: LTX applies RoPE to q and k over the
whole hidden width, so that entry leaves the token unrotated: it has no position), and its final state is taken off
before norm_out. With config.joy=false it is the module's forward, bit for bit (tests/test_pretrained_parity.py).

RoPE's coordinate scale: LTXPipeline passes rope_interpolation_scale = (vae temporal compression / frame_rate,
vae spatial compression, vae spatial compression), (8 / 25, 32, 32) for LTX-Video's own VAE at its default
frame_rate=25: ROPE_SCALE, the adapter's default_rope_scale when model.rope_scale is null. A user with another VAE (another compression), or who
samples at another frame rate (LTXPipeline(frame_rate=...)), sets model.rope_scale=[TEMPORAL/FPS,SPATIAL,SPATIAL] to
what that pipeline call would pass (rope_scale_of(temporal, spatial, frame_rate) computes it), so that training and
sampling see the same positions.
"""

from __future__ import annotations

import torch

from stale.models.pretrained.backbone import NUM_TRAIN_TIMESTEPS, BackboneError, PretrainedBackbone, family

# LTXPipeline's rope_interpolation_scale for LTX-Video's VAE (8x temporal, 32x spatial) at frame_rate=25
ROPE_SCALE = (8 / 25, 32, 32)
MASK_BIAS = -10000.0  # LTX's forward: a masked caption token gets this attention bias


def pack(x: torch.Tensor, pt: int, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T'H'W', C pt p p): LTXPipeline._pack_latents (tokens in (T', H', W') order)."""
    b, c, T, H, W = x.shape
    x = x.reshape(b, c, T // pt, pt, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens: torch.Tensor, grid: tuple, pt: int, p: int) -> torch.Tensor:
    """(B, T'H'W', C pt p p) -> (B, C, T, H, W): LTXPipeline._unpack_latents."""
    gt, gh, gw = grid
    x = tokens.reshape(tokens.shape[0], gt, gh, gw, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


@family("LTXVideoTransformer3DModel")
class LTXBackbone(PretrainedBackbone):
    block_path = "transformer.transformer_blocks"
    pipeline_class = "LTXPipeline"
    sequence_parallel_ready = True  # Ulysses through its self-attention (ulysses.py)
    default_rope_scale = ROPE_SCALE
    lora_targets = (
        "transformer.transformer_blocks.*.attn1.to_q",
        "transformer.transformer_blocks.*.attn1.to_k",
        "transformer.transformer_blocks.*.attn1.to_v",
        "transformer.transformer_blocks.*.attn1.to_out.0",
        "transformer.transformer_blocks.*.attn2.to_q",
        "transformer.transformer_blocks.*.attn2.to_k",
        "transformer.transformer_blocks.*.attn2.to_v",
        "transformer.transformer_blocks.*.attn2.to_out.0",
        "transformer.transformer_blocks.*.ff.net.0.proj",
        "transformer.transformer_blocks.*.ff.net.2",
    )

    @staticmethod
    def rope_scale_of(temporal: int, spatial: int, frame_rate: float = 25.0) -> tuple:
        """LTXPipeline's rope_interpolation_scale for a VAE compressing time by `temporal` and space by `spatial`."""
        return (temporal / frame_rate, spatial, spatial)

    @staticmethod
    def widths(c: dict) -> dict:
        in_channels = int(c.get("in_channels", 128))
        if (c.get("out_channels") or in_channels) != in_channels:
            raise BackboneError(
                f"LTXVideoTransformer3DModel with in_channels={in_channels} and out_channels={c['out_channels']}: "
                "stale's velocity has the latent's channels, so both must be equal"
            )
        heads, head_dim = int(c.get("num_attention_heads", 32)), int(c.get("attention_head_dim", 64))
        p = int(c.get("patch_size", 1))
        return dict(
            in_channels=in_channels,
            patch=(int(c.get("patch_size_t", 1)), p, p),
            dim=heads * head_dim,
            heads=heads,
            depth=int(c.get("num_layers", 28)),
            ffn_dim=4 * heads * head_dim,  # each block's FeedForward(dim) keeps diffusers' default mult=4
            text_dim=int(c.get("caption_channels", 4096)),
        )

    @staticmethod
    def rotate(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """LTX-Video's RoPE on (B, S, D) projections, over all heads at once: each (even, odd) channel pair turned
        by its angle (cos, sin (B, S, D), repeated per pair), in float32 as LTXVideoAttnProcessor turns them."""
        even, odd = u.unflatten(2, (-1, 2)).unbind(-1)  # (B, S, D / 2) each
        turned = torch.stack([-odd, even], dim=-1).flatten(2)  # (B, S, D)
        return (u.float() * cos + turned.float() * sin).to(u.dtype)

    def run(self, x, sigma, text, text_mask):
        ltx = self.transformer
        b, _, T, H, W = x.shape
        pt, p, _ = self.config.patch
        grid = gt, gh, gw = T // pt, H // p, W // p
        joy = self.config.joy
        packed = pack(x, pt, p)  # (B, S, C pt p p), S = T'H'W'
        rope_scale = self.config.rope_scale or self.default_rope_scale  # LTXPipeline: rope_interpolation_scale
        rope_cos, rope_sin = ltx.rope(packed, gt, gh, gw, rope_scale, None)  # (B, S, D) each, fp32
        bias = ((1 - text_mask.to(packed.dtype)) * MASK_BIAS).unsqueeze(1)  # (B, 1, L): LTX's mask as a bias
        tokens = ltx.proj_in(packed)  # (B, S, D)
        timestep = sigma * NUM_TRAIN_TIMESTEPS  # (B,) or (B, T')
        if timestep.ndim == 2:  # one time per latent frame -> one per token (LTX's image-to-video path)
            timestep = timestep.repeat_interleave(gh * gw, dim=1)  # (B, S)
        if joy:
            tokens = self.append_joy(tokens)  # (B, S + 1, D)
            one, zero = rope_cos.new_ones(b, 1, rope_cos.shape[-1]), rope_sin.new_zeros(b, 1, rope_sin.shape[-1])
            rope_cos, rope_sin = torch.cat([rope_cos, one], 1), torch.cat([rope_sin, zero], 1)  # joy: unrotated
            if timestep.ndim == 2:  # the joy token reads the clip at its noisiest frame's time
                timestep = torch.cat([timestep, timestep.amax(1, keepdim=True)], 1)  # (B, S + 1)
        temb, embedded = ltx.time_embed(timestep.flatten(), batch_size=b, hidden_dtype=tokens.dtype)
        temb = temb.view(b, -1, temb.size(-1))  # (B, 1 or S [+ 1], 6 D)
        embedded = embedded.view(b, -1, embedded.size(-1))  # (B, 1 or S [+ 1], D)
        context = ltx.caption_projection(text).view(b, -1, tokens.size(-1))  # (B, L, D)
        rope = (rope_cos, rope_sin)
        sp = self.sequence_parallel
        if sp is not None:  # this rank's tokens (B, S_r, D), with their RoPE rows and per-token times
            tokens, rope = self.scatter_tokens(tokens, rope)
            temb = sp.slice_tokens(temb) if temb.shape[1] > 1 else temb
        for blk in ltx.transformer_blocks:
            tokens = self.block(blk, tokens, context, temb, rope, bias)
        if sp is not None:
            tokens = sp.gather_tokens(tokens)  # (B, S (+ 1), D) on every rank
        state = None
        if joy:
            tokens, state = tokens[:, :-1], tokens[:, -1:]  # (B, S, D), (B, 1, D)
            embedded = embedded[:, :-1] if embedded.shape[1] > 1 else embedded
        shift_scale = ltx.scale_shift_table[None, None] + embedded[:, :, None]  # (B, 1 or S, 2, D)
        shift, scale = shift_scale[:, :, 0], shift_scale[:, :, 1]
        tokens = ltx.norm_out(tokens) * (1 + scale) + shift
        out = ltx.proj_out(tokens)  # (B, S, C pt p p)
        return unpack(out, grid, pt, p), state  # (B, C, T, H, W), (B, 1, D)
