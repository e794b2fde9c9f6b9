"""Wan 2.1 / 2.2 (diffusers' WanTransformer3DModel) behind stale's forward.

WanTransformer3DModel.forward, as diffusers 0.42 writes it: 3D RoPE tables for the (T', H', W') grid, a Conv3d
patch embedding to (B, S, D) tokens, the time and caption embedder (timestep (B,), or (B, S) per token as Wan 2.2
TI2V does), the blocks (self-attention with RoPE, cross-attention to the caption, feed-forward, each modulated by
the block's scale_shift_table plus the time projection), then norm_out modulated by temb and proj_out, unpatchified.
`run` is that forward written from the same submodules in the same order, with one change when config.joy: the joy
token is appended after the patch embedding with the identity rotation (cos 1, sin 0: RoPE leaves it unrotated, so
it has no position), and its final state is taken off before norm_out. With config.joy=false it is the module's
forward, bit for bit (tests/test_pretrained_parity.py).

The caption: Wan's pipeline zeroes the caption embeddings past each prompt's length and passes no mask (its
transformer attends to the zero rows), so the mask zeroes them here the same way.

Sequence parallelism (parallel.sequence = P, stale/parallel/sequence.py): every Wan block attends over all tokens,
so the blocks run on this rank's share of the S (+ joy) tokens, with this rank's rows of the RoPE tables and of
per-token times; self-attention exchanges heads (DeepSpeed-Ulysses: q, k, v of all heads -> this rank's heads over
every token, one all-to-all each, and back), while cross-attention and the feed-forward are per token. The tokens
are gathered after the last block, so the joy token's head, norm_out and the loss run as on one process. The group
reaches each block's attention through its RoPE tables (stale/models/pretrained/ulysses.py), so a block
recomputed in backward (model.grad_checkpointing) exchanges heads again.
"""

from __future__ import annotations

import torch

from stale.models.pretrained.backbone import NUM_TRAIN_TIMESTEPS, PretrainedBackbone, family


@family("WanTransformer3DModel")
class WanBackbone(PretrainedBackbone):
    block_path = "transformer.blocks"
    pipeline_class = "WanPipeline"
    sequence_parallel_ready = True  # Ulysses through its self-attention (ulysses.py)
    lora_targets = (
        "transformer.blocks.*.attn1.to_q",
        "transformer.blocks.*.attn1.to_k",
        "transformer.blocks.*.attn1.to_v",
        "transformer.blocks.*.attn1.to_out.0",
        "transformer.blocks.*.attn2.to_q",
        "transformer.blocks.*.attn2.to_k",
        "transformer.blocks.*.attn2.to_v",
        "transformer.blocks.*.attn2.to_out.0",
        "transformer.blocks.*.ffn.net.0.proj",
        "transformer.blocks.*.ffn.net.2",
    )

    @staticmethod
    def widths(c: dict) -> dict:
        if c.get("image_dim") is not None or c.get("added_kv_proj_dim") is not None:
            from stale.models.pretrained.backbone import BackboneError

            raise BackboneError(
                "WanTransformer3DModel with an image encoder (Wan 2.1 I2V: image_dim / added_kv_proj_dim) is not "
                "supported; use a text-to-video checkpoint (T2V or TI2V) and stale's frame conditioning"
            )
        return dict(
            in_channels=int(c.get("in_channels", 16)),
            patch=tuple(c.get("patch_size", (1, 2, 2))),
            dim=int(c.get("num_attention_heads", 40)) * int(c.get("attention_head_dim", 128)),
            heads=int(c.get("num_attention_heads", 40)),
            depth=int(c.get("num_layers", 40)),
            ffn_dim=int(c.get("ffn_dim", 13824)),
            text_dim=int(c.get("text_dim", 4096)),
        )

    @staticmethod
    def rotate(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Wan's RoPE on (B, S, D) projections: per head, each (even, odd) channel pair turned by its angle (cos,
        sin (1, S, 1, head_dim), repeated per pair), as WanAttnProcessor turns them."""
        u = u.unflatten(2, (-1, cos.shape[-1]))  # (B, S, heads, d)
        even, odd = u[..., 0::2], u[..., 1::2]
        c, s = cos[..., 0::2], sin[..., 1::2]
        return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(u).flatten(2, 3)

    def run(self, x, sigma, text, text_mask):
        wan = self.transformer
        b, _, T, H, W = x.shape
        pt, ph, pw = self.config.patch
        gt, gh, gw = T // pt, H // ph, W // pw
        joy = self.config.joy
        rope_cos, rope_sin = wan.rope(x)  # (1, S, 1, head_dim) each
        tokens = wan.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, S, D), S = T'H'W'
        timestep = sigma * NUM_TRAIN_TIMESTEPS  # (B,) or (B, T')
        if timestep.ndim == 2:  # one time per latent frame -> one per token (Wan 2.2 TI2V's per-token path)
            timestep = timestep.repeat_interleave(gh * gw, dim=1)  # (B, S)
        if joy:
            tokens = self.append_joy(tokens)  # (B, S + 1, D)
            one, zero = rope_cos.new_ones(1, 1, 1, rope_cos.shape[-1]), rope_sin.new_zeros(1, 1, 1, rope_sin.shape[-1])
            rope_cos, rope_sin = torch.cat([rope_cos, one], 1), torch.cat([rope_sin, zero], 1)  # joy: unrotated
            if timestep.ndim == 2:  # the joy token reads the clip at its noisiest frame's time
                timestep = torch.cat([timestep, timestep.amax(1, keepdim=True)], 1)  # (B, S + 1)
        ts_len = timestep.shape[1] if timestep.ndim == 2 else None
        context = text * text_mask[..., None].to(text.dtype)  # Wan's pipeline: zeros past each prompt's length
        temb, proj, context, _ = wan.condition_embedder(
            timestep.flatten() if ts_len else timestep, context, None, timestep_seq_len=ts_len
        )
        proj = proj.unflatten(2, (6, -1)) if ts_len else proj.unflatten(1, (6, -1))  # (B, [S,] 6, D)
        rope = (rope_cos, rope_sin)
        sp = self.sequence_parallel
        if sp is not None:  # this rank's tokens (B, S_r, D), with their RoPE rows and per-token times
            tokens, rope = self.scatter_tokens(tokens, rope)
            proj = sp.slice_tokens(proj) if ts_len else proj
        for blk in wan.blocks:
            tokens = self.block(blk, tokens, context, proj, rope)
        if sp is not None:
            tokens = sp.gather_tokens(tokens)  # (B, S (+ 1), D) on every rank
        state = None
        if joy:
            tokens, state = tokens[:, :-1], tokens[:, -1:]  # (B, S, D), (B, 1, D)
            temb = temb[:, :-1] if ts_len else temb
        if temb.ndim == 3:  # per token
            shift, scale = (wan.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (wan.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (wan.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        out = wan.proj_out(tokens)  # (B, S, pt ph pw C)
        out = out.reshape(b, gt, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3), state  # (B, C, T, H, W), (B, 1, D)
