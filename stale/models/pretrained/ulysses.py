"""Sequence parallelism through a family's self-attention (DeepSpeed-Ulysses), for stale.parallel.sequence.

A family's blocks attend over all tokens of the clip, so under parallel.sequence = P the blocks run on this rank's
share of the tokens (PretrainedBackbone.scatter_tokens) and each self-attention exchanges heads: q, k, v of all
heads for this rank's tokens become this rank's heads for every token (one all-to-all each), attend, and come
back. Cross-attention (to the caption) and the feed-forward are per token and need nothing. The group travels with
the RoPE tables (ShardedRope) through the block's own call, so a block recomputed in backward
(model.grad_checkpointing) exchanges heads again; without one the module's own processor runs, so validation,
sampling and export are untouched. `sp` is stale.parallel.sequence.SequenceParallel (duck-typed: models import
nothing of parallel).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


class ShardedRope(tuple):
    """A family's RoPE tables (cos, sin) for this rank's tokens, carrying the sequence-parallel group `sp` to the
    attention processor (the family's own processor unpacks it as the plain pair)."""

    sp = None


class UlyssesSelfAttention:
    """A family's self-attention processor on this rank's tokens (B, S_r, D), heads exchanged around the attention.

    `rotate(u, cos, sin)` is the family's RoPE on (B, S_r, D) projections. The projections, QK norms (RMSNorm over
    all heads, per token) and output projection are the module's own, so LoRA adapters on them train as usual."""

    def __init__(self, inner, rotate: Callable):
        self.inner, self.rotate = inner, rotate

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        sp = getattr(rotary_emb, "sp", None)
        if sp is None or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)
        q = self.rotate(attn.norm_q(attn.to_q(hidden_states)), *rotary_emb)  # (B, S_r, D)
        k = self.rotate(attn.norm_k(attn.to_k(hidden_states)), *rotary_emb)
        v = attn.to_v(hidden_states)
        q, k, v = (sp.heads_to_tokens(u.unflatten(2, (attn.heads, -1))).transpose(1, 2) for u in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # (B, heads_r, S, d)
        out = sp.tokens_to_heads(out.transpose(1, 2)).flatten(2, 3).type_as(q)  # (B, S_r, D)
        return attn.to_out[1](attn.to_out[0](out))


def install(attentions, rotate: Callable) -> None:
    """Each self-attention module of `attentions` takes UlyssesSelfAttention over its own processor (once)."""
    for attn in attentions:
        if not isinstance(attn.processor, UlyssesSelfAttention):
            attn.set_processor(UlyssesSelfAttention(attn.processor, rotate))


def scatter(sp, tokens: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, ShardedRope]:
    """This rank's tokens (B, S_r, D) and RoPE rows, the rope carrying the group."""
    tokens = sp.scatter_tokens(tokens)
    sharded = ShardedRope(sp.slice_tokens(r) for r in rope)
    sharded.sp = sp
    return tokens, sharded
