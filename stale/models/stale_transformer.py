"""The Stale Transformer: a video diffusion transformer with alternating space-time attention.

Paper -> code: the Transformer that "alternates between its vehicular and anthropomorphic form" is a
stack of blocks that alternate spatial attention (the tokens of one frame) and temporal attention (one
spatial position across frames), as in TimeSformer (Bertasius et al. 2021, "divided space-time
attention") and Latte (Ma et al. 2024). The non-learnable crying-joy parameter 😂 is the *joy token*: a
fixed buffer appended as one extra spatial position to every frame, whose final state, averaged over
frames, feeds a hinge-loss classifier head.

Layout follows facebookresearch/DiT models.py: adaLN-Zero conditioning (every block starts as the
identity and the final layer outputs exactly zero), shape comments, one file for the whole architecture.

Token layout inside the blocks is (B, T', N, D): T' = T/pt latent frames, N = H'W' + 1 positions per
frame (the H'W' patches of the frame, then the joy token), D the width. Spatial attention runs over N
with (B T') sequences, temporal attention over T' with (B N) sequences, full attention over T' N.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from stale.models import rope as rope3d

MODES = ("spatial", "temporal", "full")
CONDS = ("label", "text")
ADALN = ("per_block", "single")
POS = ("sincos", "rope")
# Shorthands accepted for `pattern` (e.g. `model.pattern=full` on the command line).
PATTERNS = {"alternating": ("spatial", "temporal"), "full": ("full",)}


@dataclass
class StaleConfig:
    in_channels: int = 3  # RGB
    frames: int = 8  # T of the training clips; any T divisible by pt works at inference
    size: int = 16  # H = W of the training clips; any H, W divisible by (ph, pw) works at inference
    patch: tuple = (1, 4, 4)  # tubelet (pt, ph, pw): one token per pt x ph x pw pixels
    dim: int = 128  # width D (even: the sin-cos code splits it into sin/cos halves)
    depth: int = 4  # number of blocks; each block is one attention (of one mode) + one MLP
    heads: int = 4  # attention heads; dim must be divisible by heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * dim
    # Attention mode of each block, cycled over depth: ("spatial", "temporal") alternates (the default; cost
    # about linear in T, as temporal attention is quadratic only in T' over sequences of T' tokens);
    # ("full",) is joint space-time attention over all T' N tokens (the comparator; quadratic in T).
    pattern: tuple = ("spatial", "temporal")
    num_classes: int = 4  # label classes; index num_classes is the null label for classifier-free guidance
    qk_norm: bool = True  # RMS-normalise queries and keys per head: keeps attention logits bounded at scale
    grad_checkpointing: bool = False  # recompute each block in backward: activation memory for ~1/3 more compute
    # What the network's last layer predicts. "velocity": v directly. "data": the clean clip x1 (x-prediction,
    # Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"), returned as the velocity
    # v = (x1_hat - x_t) / max(1 - t, t_eps), so every sampler, loss and export still sees a velocity.
    prediction: str = "velocity"
    t_eps: float = 0.05  # floor of 1 - t in the x-prediction division: bounds v near t = 1
    joy_seed: int = 0x1F602  # the joy token is drawn once from this seed (U+1F602 is 😂): fixed, never trained
    # Spatial positions of the sin-cos code (with model.pos=rope: of the rotations): None = patch indices 0, 1, 2,
    # ... at every resolution; an int B = resolution-scaled (Open-Sora 1.2, PixArt; for RoPE position interpolation):
    # indices times B / sqrt(H'W'), so every grid spans about B positions per side whatever its size
    # (docs/buckets.md: measured better on unseen shapes; opt-in).
    pos_base: int | None = None
    # Positional code: "sincos" adds the fixed 3D sin-cos code to the tokens once at the input (DiT, Latte,
    # Open-Sora 1.2); "rope" rotates q and k inside every attention by the tokens' (t, h, w) instead (3D RoPE as in
    # Wan, HunyuanVideo, Open-Sora 2; stale/models/rope.py). sincos stays the default: docs/buckets.md has the
    # measurement (stale-bench sections=pos).
    pos: str = "sincos"
    # Text conditioning (docs/text.md). cond="text": each block cross-attends to the caption tokens, the label
    # is ignored, and the joy token's head scores whether the clip matches its caption (one binary score).
    cond: str = "label"  # label | text
    text_dim: int = 0  # width of the caption embeddings given to forward (text_encoder=hf: its hidden size)
    text_len: int = 32  # caption tokens L (text_encoder.max_length): the flop count and the learned position table
    # text_encoder=learned: > 0 puts a small text encoder over this many token ids inside the model, trained with
    # it; forward then takes token ids (B, L) instead of embeddings, and text_dim is that encoder's width
    text_vocab: int = 0
    text_layers: int = 2  # blocks of the learned text encoder
    # Block modulation: "per_block" is DiT's adaLN-Zero, one SiLU + Linear(D, 6D) per block (6D^2 parameters
    # each); "single" is PixArt-alpha's adaLN-single (as Latte): one such Linear shared by all blocks, plus a
    # learned (6D,) offset per block. Fewer parameters; its effect on quality is in BENCHMARKS.md (issue 21).
    adaln: str = "per_block"

    def __post_init__(self):
        # Hydra hands lists; the model wants tuples (hashable, printable as in the defaults).
        if isinstance(self.pattern, str):
            self.pattern = PATTERNS.get(self.pattern, (self.pattern,))
        self.patch, self.pattern = tuple(int(p) for p in self.patch), tuple(self.pattern)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"model.patch={list(self.patch)} must be three positive ints (pt, ph, pw)")
        bad = [m for m in self.pattern if m not in MODES]
        if bad or not self.pattern:
            raise ValueError(
                f"model.pattern={list(self.pattern)} must be a non-empty list of {MODES} or one of {sorted(PATTERNS)}"
            )
        if self.dim % self.heads or self.dim % 2 or self.dim < 8:
            raise ValueError(
                f"model.dim={self.dim} must be even, >= 8 (the 3D sin-cos code splits it in three) "
                f"and divisible by model.heads={self.heads}"
            )
        if not isinstance(self.grad_checkpointing, bool):
            raise ValueError(f"model.grad_checkpointing={self.grad_checkpointing!r} must be true or false")
        if self.adaln not in ADALN:
            raise ValueError(f"model.adaln={self.adaln!r} is not one of {ADALN}")
        if self.prediction not in ("velocity", "data"):
            raise ValueError(f"model.prediction={self.prediction!r} is not one of ('velocity', 'data')")
        if not 0 < self.t_eps < 1:
            raise ValueError(f"model.t_eps={self.t_eps} must be in (0, 1)")
        if self.pos_base is not None and (
            isinstance(self.pos_base, bool) or not isinstance(self.pos_base, int) or self.pos_base < 1
        ):
            raise ValueError(f"model.pos_base={self.pos_base!r} must be null or an integer >= 1 (grid positions)")
        if self.pos not in POS:
            raise ValueError(f"model.pos={self.pos!r} is not one of {POS}")
        if self.pos == "rope":
            hd = self.dim // self.heads
            if min(rope3d.rope_dims(hd)) < 2 or hd % 2:
                raise ValueError(
                    f"model.pos=rope splits the head dimension model.dim / model.heads = {self.dim} / "
                    f"{self.heads} = {hd} into even time/height/width parts {rope3d.rope_dims(hd)}: "
                    "it must be even and >= 6"
                )
        if self.cond not in CONDS:
            raise ValueError(f"model.cond={self.cond!r} is not one of {CONDS}")
        if self.cond == "text":
            if self.text_vocab > 0 and self.text_dim < 1:
                self.text_dim = self.dim  # the learned encoder's width defaults to the model's
            if self.text_dim < 1 or self.text_len < 1 or self.text_dim % self.heads:
                raise ValueError(
                    f"model.cond=text needs model.text_dim >= 1 (divisible by model.heads={self.heads}) "
                    f"and model.text_len >= 1; got text_dim={self.text_dim}, text_len={self.text_len} "
                    "(text_encoder=hf|learned fills them in)"
                )
        for name in ("in_channels", "depth", "num_classes", "frames", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")

    @property
    def head_outputs(self) -> int:
        if self.cond == "text":
            return 1  # does the clip match its caption: one binary hinge score
        return 1 if self.num_classes <= 2 else self.num_classes  # binary hinge: one score; else Crammer-Singer

    @property
    def modes(self) -> tuple:
        """The attention mode of every block, in order."""
        return tuple(self.pattern[i % len(self.pattern)] for i in range(self.depth))


# Sizes: widths, depths and heads of DiT-S/B/L/XL (Peebles & Xie 2023, Table 1); tiny is for CPUs and CI.
# Depth counts blocks, and each block attends over space or time, so DiT-S (12 blocks) becomes 6 spatial +
# 6 temporal blocks, as Latte does.
SIZES = {
    "debug": dict(dim=32, depth=2, heads=2),  # the tests' model (model=debug): ~30k parameters, a step in milliseconds
    "tiny": dict(dim=128, depth=4, heads=4),
    "s": dict(dim=384, depth=12, heads=6),
    "b": dict(dim=768, depth=12, heads=12),
    "l": dict(dim=1024, depth=24, heads=16),
    "xl": dict(dim=1152, depth=28, heads=16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


#################################################################################
#             Positional encoding: fixed 3D sin-cos (time, height, width)        #
#################################################################################
# The default (model.pos=sincos): the code is added once at the input, so every attention mode (spatial,
# temporal, full) sees the same tokens and stays a plain scaled_dot_product_attention call on q and k; it is
# a pure function of the grid size, so any (T, H, W) divisible by the patch works with no learned table to
# interpolate; and it gives the joy token a time code but no place in the frame. DiT and Latte use it too.
# model.pos=rope (stale/models/rope.py) rotates q and k by relative positions instead: measured against this
# code in docs/buckets.md section 3.1 (better on longer clips, worse on larger grids unless scaled, 6% slower).


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Fixed sin-cos code of positions `pos` (N,) -> (N, dim), dim even (DiT's get_1d_sincos_pos_embed)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim // 2))
    out = pos.float()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def pos_embed_3d(dim: int, t: int, h: int, w: int, device=None, base: int | None = None) -> torch.Tensor:
    """Positional code of the token grid, joy tokens included: (t, h*w + 1, dim).

    Channels split into a time quarter and two spatial parts. Patch (i, j) of frame k gets
    [time(k), height(i), width(j)]; the joy token of frame k gets [time(k), 0, 0]: it has its frame's time
    but no position inside the frame (an all-zero spatial code is no real position, since cos(0) = 1).
    base: resolution scaling of the spatial positions (StaleConfig.pos_base); None keeps integer indices.
    """
    dt = dim // 4 // 2 * 2  # even split points, so each part has sin and cos halves
    dh = (dim - dt) // 2 // 2 * 2  # dim >= 8 (checked in StaleConfig) keeps all three non-empty
    dw = dim - dt - dh
    et = sincos_1d(dt, torch.arange(t, device=device))  # (t, dt)
    scale = 1.0 if base is None else base / math.sqrt(h * w)
    eh = sincos_1d(dh, torch.arange(h, device=device) * scale)  # (h, dh)
    ew = sincos_1d(dw, torch.arange(w, device=device) * scale)  # (w, dw)
    grid = torch.cat(
        [
            et[:, None, None].expand(t, h, w, dt),
            eh[None, :, None].expand(t, h, w, dh),
            ew[None, None, :].expand(t, h, w, dw),
        ],
        dim=-1,
    ).reshape(t, h * w, dim)
    joy = F.pad(et, (0, dh + dw))[:, None]  # (t, 1, dim)
    return torch.cat([grid, joy], dim=1)  # (t, h*w + 1, dim)


#################################################################################
#                     Embedding layers for timesteps and labels                  #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds flow time t in [0, 1] with sinusoids and an MLP (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: (B,)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000)[:, None] * freqs[None]  # scale t to DiT's 0..1000 range of timesteps
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Label table with one extra row, the null label (index num_classes), for classifier-free guidance.

    Label dropout lives in the objective (it replaces labels by the null index), so the model is a pure
    function of its inputs; sampling passes the null index for the unconditional branch.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.null_label = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # y: (B,) long in [0, num_classes]
        return self.embedding_table(y)  # (B, D)


#################################################################################
#                                 Core blocks                                    #
#################################################################################

# CUDA's attention kernels put the sequences on a grid axis of at most 65535 blocks ("CUDA error: invalid
# argument" past it, seen on an H100 with temporal attention of 4 clips of 16 x 256 x 256): split above this.
SDPA_MAX_SEQUENCES = 32768
# Temporal attention is B (H'W' + 1) sequences of only T' tokens, a shape flash attention's backward is slow on:
# B's eager bf16 step (16 x 64 x 64, batch 4, one H100) took 0.91x the time with the memory-efficient kernel
# for temporal blocks (cuDNN 0.92x, math 0.94x; BENCHMARKS.md). Tried in this order; CPUs fall to their flash.
TEMPORAL_SDPA = [
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]


class _RMSNormBackward(torch.autograd.Function):
    """y = x_hat * w, x_hat = x / sqrt(mean(x^2) + eps), with the backward written out (Zhang & Sennrich 2019):
    dx = rstd (g w - x_hat mean(g w x_hat)), dw = sum(g x_hat). Torch has a fused RMSNorm backward on GPUs but
    not on CPUs, where autograd through its composite (pow, mean, add, rsqrt, two muls) took 2x this backward's
    time: QK-norm was ~15% of the S-width step on a 2-core CPU (BENCHMARKS.md, the Latte comparison)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)
        return x_hat * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_hat, weight, rstd = ctx.saved_tensors
        gw = g * weight
        dot = (gw * x_hat).mean(-1, keepdim=True)
        return torch.addcmul(gw, x_hat, dot, value=-1).mul_(rstd), (g * x_hat).flatten(0, -2).sum(0), None


class QKNorm(nn.RMSNorm):
    """RMSNorm of queries or keys over each head's channels, computed in the gain's dtype (float32 under
    autocast) and returned in `dtype`, the dtype attention runs in. Training on a CPU takes the written-out
    backward above; everything else (GPUs, compiled graphs, export, inference) torch's own rms_norm."""

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if x.is_cpu and torch.is_grad_enabled() and not traced:
            return _RMSNormBackward.apply(x, self.weight, self.eps).to(dtype)
        return super().forward(x).to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention softmax(Q K^T / sqrt(d)) V, with QK-norm, via scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.qk_norm = heads, qk_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = QKNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, sp=None, rope=None) -> torch.Tensor:  # x: (S, L, D): S sequences of length L
        # rope: model.pos=rope's (cos, sin) for these sequences, (L, D/heads/2) (for full attention under sequence
        # parallelism, of the whole clip's T' N tokens); one token needs none (a rotation by t = 0 is the identity)
        if x.shape[1] == 1 and sp is None and not torch.compiler.is_exporting():
            return self._single(x)
        # Split q, k, v on the channel axis before moving heads forward: the backward then stacks their gradients
        # straight into the projection's (S, L, 3, heads, D/heads) layout (splitting a "three s h l d" permute
        # instead made its backward copy the stack once more: 5% of the attention step on a CPU).
        q, k, v = (u.transpose(1, 2) for u in self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2))
        if self.qk_norm:  # (S, heads, L, D/heads)
            q, k = self.q_norm(q, v.dtype), self.k_norm(k, v.dtype)
        if sp is not None:  # sequence-parallel full attention (Ulysses): this rank's heads over the whole clip
            q, k, v = (sp.heads_to_sequence(u) for u in (q, k, v))
        if rope is not None:  # after the exchange: each rank's heads hold every token, so the table needs no offset
            q, k = rope3d.rotate(q, *rope), rope3d.rotate(k, *rope)
        # Not while exporting: a branch on the batch would guard the exported graph's dynamic batch (torch.export
        # refuses "batch <= 32768/17"); an exported graph therefore keeps one SDPA call for any batch.
        if torch.compiler.is_exporting() or q.shape[0] <= SDPA_MAX_SEQUENCES:
            out = F.scaled_dot_product_attention(q, k, v)  # (S, heads, L, D/heads), scale 1/sqrt(D/heads)
        else:  # temporal attention of large clips: B (H'W' + 1) sequences can exceed the kernels' grid
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(*qkv)
                    for qkv in zip(
                        q.split(SDPA_MAX_SEQUENCES), k.split(SDPA_MAX_SEQUENCES), v.split(SDPA_MAX_SEQUENCES)
                    )
                ]
            )
        if sp is not None:  # back to all heads of this rank's frames
            out = sp.sequence_to_heads(out)
        return self.proj(rearrange(out, "s h l d -> s l (h d)"))  # (S, L, D)

    def _single(self, x: torch.Tensor) -> torch.Tensor:
        """Sequences of one token (temporal attention of a T' = 1 batch: images): the softmax over one key is 1, so
        the output is the token's value; q, k and their norms are not computed (a third of the qkv projection and
        the whole attention kernel saved)."""
        d = x.shape[-1]
        out = self.proj(F.linear(x, self.qkv.weight[2 * d :], self.qkv.bias[2 * d :]))  # (S, 1, D)
        if self.qk_norm and torch.is_grad_enabled():  # a zero gradient: DDP wants one for every parameter on every rank
            out = out + 0.0 * (self.q_norm.weight.sum() + self.k_norm.weight.sum())
        return out


class CrossAttention(nn.Module):
    """Multi-head attention of tokens x (queries) to caption tokens (keys, values), padding masked out.

    PixArt-alpha and Open-Sora's STDiT3 do the same: each block reads the caption through its own cross-attention
    (not joint attention over video and text as in SD3/HunyuanVideo: that would put the caption into every
    spatial and temporal sequence and change the cost of every mode; cross-attention leaves self-attention as it
    was). Also the self-attention of the learned text encoder (context = x).
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool, context_dim: int | None = None):
        super().__init__()
        self.heads, self.qk_norm = heads, qk_norm
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.q_norm = QKNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, S, D), context: (B, L, Dc), mask: (B, L) bool, True on real tokens
        q = rearrange(self.q(x), "b s (h d) -> b h s d", h=self.heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        if self.qk_norm:
            q, k = self.q_norm(q, v.dtype), self.k_norm(k, v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, heads, S, D/heads)
        return self.proj(rearrange(out, "b h s d -> b s (h d)"))  # (B, S, D)


def visible(mask: torch.Tensor) -> torch.Tensor:
    """A caption mask with at least one visible token per row (an all-masked row would make softmax NaN)."""
    mask = mask.bool()
    return torch.cat([mask[:, :1] | ~mask.any(dim=1, keepdim=True), mask[:, 1:]], dim=1)  # (B, L)


class LearnedTextEncoder(nn.Module):
    """text_encoder=learned: token ids -> caption embeddings, a few pre-norm Transformer layers trained with the
    model from scratch (the ids come from a word-level tokenizer built on the dataset's captions)."""

    def __init__(self, vocab: int, dim: int, length: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(length, dim))
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim, eps=1e-6),
                    "attn": CrossAttention(dim, heads, qk_norm=True),
                    "norm2": nn.LayerNorm(dim, eps=1e-6),
                    "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # ids, mask: (B, L)
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, Dt)
        for layer in self.layers:
            n = layer["norm1"](h)
            h = h + layer["attn"](n, n, mask)  # self-attention over the caption, padding masked out
            h = h + layer["mlp"](layer["norm2"](h))
        return self.norm(h)  # (B, L, Dt)


class TextConditioner(nn.Module):
    """Caption embeddings (or, with a learned encoder, token ids) -> the tokens every block cross-attends to,
    (B, L, D) (PixArt's caption projection, an MLP), and a pooled vector (B, D) added to the time embedding
    (the masked mean, as SD3 and HunyuanVideo add a pooled text vector to adaLN's input)."""

    def __init__(self, cfg: "StaleConfig"):
        super().__init__()
        self.encoder = (
            LearnedTextEncoder(cfg.text_vocab, cfg.text_dim, cfg.text_len, cfg.text_layers, cfg.heads)
            if cfg.text_vocab > 0
            else None
        )
        self.proj = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.pool = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, text: torch.Tensor, mask: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = visible(mask)  # (B, L)
        if self.encoder is not None:
            text = self.encoder(text.long(), mask)  # (B, L, Dt)
        tokens = self.proj(text.to(dtype))  # (B, L, D)
        w = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
        pooled = self.pool((tokens * w).sum(1) / w.sum(1))  # (B, D)
        return tokens, mask, pooled


class BlockOffset(nn.Module):
    """adaLN-single's per-block part (PixArt-alpha's scale_shift_table): the shared modulation plus a learned offset."""

    def __init__(self, width: int):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(width))  # zero: with the shared Linear zeroed, every gate starts at 0

    def forward(self, m: torch.Tensor) -> torch.Tensor:  # m: (B, 1 or T', 6D)
        return m + self.offset


class StaleBlock(nn.Module):
    """One transformer block attending over space, time or both, with adaLN-Zero conditioning.

    The unit of gradient checkpointing and of FSDP2 sharding (stale/parallel/fsdp.py).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        mode: str,
        qk_norm: bool,
        text: bool = False,
        adaln: str = "per_block",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"attention mode {mode!r} is not one of {MODES}")
        self.mode = mode
        # model.cond=text: every token reads the caption after the self-attention (PixArt, STDiT3). Its output
        # projection starts at zero (initialize_weights), so the block still starts as the identity.
        self.cross_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if text else None
        self.cross_attn = CrossAttention(dim, heads, qk_norm) if text else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # per_block: c -> this block's 6 modulations; single: c is already the shared 6D modulation, offset per block
        self.adaLN_modulation = (
            nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if adaln == "per_block" else BlockOffset(6 * dim)
        )

    def attend(self, x: torch.Tensor, sp=None, rope=None) -> torch.Tensor:  # x: (B, T', N, D), N = H'W' + 1 (joy last)
        b, t, n, _ = x.shape
        rope = None if rope is None else rope[self.mode]  # model.pos=rope: this mode's (cos, sin) (models/rope.py)
        if self.mode == "spatial":  # the N tokens of one frame see each other: B T' sequences of length N
            return self.attn(rearrange(x, "b t n d -> (b t) n d"), rope=rope).view(b, t, n, -1)
        if self.mode == "temporal":  # one position sees itself across frames: B N sequences of length T'
            with sdpa_kernel(TEMPORAL_SDPA, set_priority=True):
                out = self.attn(rearrange(x, "b t n d -> (b n) t d"), rope=rope)
            return rearrange(out, "(b n) t d -> b t n d", b=b)
        # full: B sequences of T' N (under sequence parallelism this rank's T'_r N, the heads exchanged inside)
        return self.attn(rearrange(x, "b t n d -> b (t n) d"), sp, rope).view(b, t, n, -1)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        sp=None,
        rope=None,
    ) -> torch.Tensor:  # x: (B, T', N, D), c: (B, [1 or T',] D)
        mods = self.adaLN_modulation(c.view(c.shape[0], -1, c.shape[-1]))[
            :, :, None
        ]  # (B, 1 or T', 1, 6D): one modulation per clip or per frame
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.chunk(6, dim=-1)
        x = x + gate_a * self.attend(modulate(self.norm1(x), shift_a, scale_a), sp, rope)
        # every token (of this rank's share) attends to the whole caption: (B, T' N, D) queries
        if self.cross_attn is not None:
            b, t, n, d = x.shape
            x = x + self.cross_attn(self.cross_norm(x).reshape(b, t * n, d), text, text_mask).view(b, t, n, d)
        x = x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x  # (B, T', N, D)


class FinalLayer(nn.Module):
    """adaLN then a linear map from each token to its tubelet of pixels (zero-initialised)."""

    def __init__(self, dim: int, patch_volume: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_volume * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x: (B, T', H'W', D), c: (B, 1 or T', D)
        shift, scale = self.adaLN_modulation(c.view(c.shape[0], -1, c.shape[-1]))[:, :, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T', H'W', pt*ph*pw*C)


class HingeHead(nn.Module):
    """Reads the joy token's final state, averaged over frames, and scores the classes."""

    def __init__(self, dim: int, outputs: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, outputs)

    def forward(self, joy: torch.Tensor) -> torch.Tensor:  # joy: (B, T', D)
        return self.linear(self.norm(joy.mean(dim=1)))  # (B, outputs)


def joy_vector(dim: int, seed: int) -> torch.Tensor:
    """😂: a fixed vector of exactly unit RMS drawn from `seed`, on the CPU, so it is the same everywhere."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(dim, generator=g, device="cpu")
    return v / v.pow(2).mean().sqrt()


class JoyTokenMismatchError(RuntimeError):
    """Weights whose joy token is not joy_vector(dim, joy_seed): trained with another token, or averaged."""


def _check_joy_token(module: "StaleTransformer", state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the stored token must equal the model's own, bit for bit."""
    stored = state_dict.get(prefix + "joy_token")
    if stored is None:  # strict loading reports the missing key itself
        return
    cfg = module.config
    own = joy_vector(cfg.dim, cfg.joy_seed)
    if stored.shape != own.shape or not torch.equal(stored.detach().cpu(), own.to(stored.dtype)):
        diff = (stored.detach().cpu().float() - own).abs().max().item() if stored.shape == own.shape else "n/a"
        raise JoyTokenMismatchError(
            f"{prefix}joy_token in the loaded weights is not joy_vector(dim={cfg.dim}, joy_seed={cfg.joy_seed}) "
            f"(shape {tuple(stored.shape)}, max abs difference {diff}): the weights were trained with another "
            "model.joy_seed, or the token was averaged (the EMA callback needs use_buffers=false)"
        )


#################################################################################
#                               The Stale Transformer                            #
#################################################################################


class StaleTransformer(nn.Module):
    """Video velocity model v(x_t, t, label) (or v(x_t, t, caption) with cond=text) with a joy-token hinge head.

    forward(x (B, C, T, H, W), t (B,) or (B, T'), y (B,) long) -> (velocity (B, C, T, H, W), scores (B, outputs)).
    Use y = num_classes (the null label) for the unconditional branch of classifier-free guidance.
    cond=text: forward(x, t, y, text, text_mask) with text (B, L, text_dim) embeddings, or token ids (B, L) when the
    model holds a learned text encoder, and text_mask (B, L) bool; y is ignored, the empty caption is the
    unconditional branch, and scores (B, 1) say whether the clip matches the caption.
    A per-latent-frame time t (B, T') is frame conditioning as in LTX-Video: frames given as clean context sit
    at t = 1 while the others are noisy. adaLN-Zero then modulates each frame (its patches and its joy token)
    with its own time; with t (B,) every frame shares one modulation, exactly as in DiT.
    """

    def __init__(self, config: StaleConfig | None = None, **overrides):
        super().__init__()
        unknown = set(overrides) - {f.name for f in dataclasses.fields(StaleConfig)}
        if unknown:
            raise TypeError(f"StaleConfig has no field(s) {sorted(unknown)}")
        cfg = dataclasses.replace(config or StaleConfig(), **overrides)  # a copy: the caller's config is untouched
        self.config = cfg
        pt, ph, pw = cfg.patch
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.t_embed = TimestepEmbedder(cfg.dim)
        # cond=label: a label table; cond=text: the caption's projection and pooled vector (no label table)
        self.y_embed = LabelEmbedder(cfg.num_classes, cfg.dim) if cfg.cond == "label" else None
        self.text = TextConditioner(cfg) if cfg.cond == "text" else None
        # A buffer, not a Parameter: no optimizer sees it, so training never changes it. Persistent, so
        # checkpoints and exports carry it, and a state dict with a different joy token fails to load
        # (_check_joy_token): whatever path loads weights into the model, directly or as a submodule.
        self.register_buffer("joy_token", joy_vector(cfg.dim, cfg.joy_seed), persistent=True)  # (D,)
        self.register_load_state_dict_pre_hook(_check_joy_token)
        self.blocks = nn.ModuleList(
            StaleBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, m, cfg.qk_norm, cfg.cond == "text", cfg.adaln)
            for m in cfg.modes
        )
        # adaLN-single: the one modulation network all blocks share (model.adaln=single); none for per_block
        self.adaLN_single = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim)) if cfg.adaln == "single" else None
        self.final = FinalLayer(cfg.dim, pt * ph * pw, cfg.in_channels)
        self.head = HingeHead(cfg.dim, cfg.head_outputs)
        # a stale.parallel.sequence.SequenceParallel inside its `sharded` block (training steps), else None
        self.sequence_parallel = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        w = self.patch_embed.weight.data  # like nn.Linear over the flattened tubelet
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.embedding_table.weight, std=0.02)
        if self.text is not None and self.text.encoder is not None:
            nn.init.normal_(self.text.encoder.embed.weight, std=0.02)
            nn.init.normal_(self.text.encoder.pos, std=0.02)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.adaLN_modulation[-1] for b in self.blocks if self.config.adaln == "per_block"] + (
            [self.adaLN_single[-1]] if self.adaLN_single is not None else []
        ):
            nn.init.zeros_(lin.weight)  # adaLN-Zero: gates start at 0, so each block is the identity
            nn.init.zeros_(lin.bias)
        for block in self.blocks:
            if block.cross_attn is not None:  # the caption's contribution starts at exactly zero
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)  # the velocity is exactly zero at initialisation
        nn.init.zeros_(self.final.linear.bias)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, text=None, text_mask=None) -> None:
        cfg = self.config
        if cfg.cond == "text":
            want = (x.shape[0], cfg.text_len) if cfg.text_vocab else (x.shape[0], cfg.text_len, cfg.text_dim)
            if (
                text is None
                or text_mask is None
                or tuple(text.shape) != want
                or tuple(text_mask.shape) != (x.shape[0], cfg.text_len)
            ):
                raise ValueError(
                    f"model.cond=text needs text {want} ({'token ids' if cfg.text_vocab else 'embeddings'}) "
                    f"and text_mask ({x.shape[0]}, {cfg.text_len}); got "
                    f"{None if text is None else tuple(text.shape)} and "
                    f"{None if text_mask is None else tuple(text_mask.shape)}"
                )
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, C={cfg.in_channels}, T, H, W); got shape {tuple(x.shape)}")
        _, _, T, H, W = x.shape
        if T % cfg.patch[0] or H % cfg.patch[1] or W % cfg.patch[2]:
            raise ValueError(f"clip (T, H, W)=({T}, {H}, {W}) is not divisible by model.patch={list(cfg.patch)}")
        if t.shape not in ((x.shape[0],), (x.shape[0], T // cfg.patch[0])) or y.shape != (x.shape[0],):
            raise ValueError(
                f"t must be (B,)=({x.shape[0]},) or per latent frame (B, T')=({x.shape[0]}, "
                f"{T // cfg.patch[0]}) and y (B,); got t {tuple(t.shape)}, y {tuple(y.shape)}"
            )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        self._check_inputs(x, t, y, text, text_mask)
        b, c, T, H, W = x.shape
        pt, ph, pw = cfg.patch
        gt, gh, gw = T // pt, H // ph, W // pw
        # The residual stream keeps the parameters' dtype: float32 under bf16 autocast (only the matmuls run
        # in bf16), bf16 when the weights themselves are bf16 (e.g. FSDP mixed precision).
        dtype = self.patch_embed.weight.dtype
        patches = rearrange(self.patch_embed(x.to(dtype)), "b d t h w -> b t (h w) d").to(dtype)  # (B, T', H'W', D)
        joy = self.joy_token.to(dtype)[None, None, None].expand(b, gt, 1, cfg.dim)  # (B, T', 1, D)
        tokens = torch.cat([patches, joy], dim=2)  # (B, T', N, D), N = H'W' + 1
        rope = None
        if cfg.pos == "rope":  # rotations inside attention, one set of tables for all blocks (stale/models/rope.py)
            rope = rope3d.tables(cfg.dim // cfg.heads, gt, gh, gw, device=x.device, base=cfg.pos_base)
        else:
            tokens = tokens + pos_embed_3d(cfg.dim, gt, gh, gw, device=x.device, base=cfg.pos_base).to(dtype)
        ctx, ctx_mask = None, None
        if self.text is not None:  # the caption replaces the label: its tokens for cross-attention, pooled into c
            ctx, ctx_mask, cond = self.text(text, text_mask, dtype)  # (B, L, D), (B, L), (B, D)
        else:
            cond = self.y_embed(y)  # (B, D)
        if t.ndim == 1:  # one time per clip
            c_emb = (self.t_embed(t) + cond)[:, None]  # (B, 1, D)
        else:  # one time per latent frame
            c_emb = self.t_embed(t.reshape(-1)).view(b, gt, -1) + cond[:, None]  # (B, T', D)
        c_blocks = c_emb if self.adaLN_single is None else self.adaLN_single(c_emb)  # (B, 1 or T', D or 6D)
        sp = self.sequence_parallel  # sequence parallelism: the blocks see this rank's share of the tokens
        if sp is not None:
            tokens = sp.scatter(tokens, c_blocks)  # (B, T'_r, N, D): this rank's frames
        for block in self.blocks:
            c_block = c_blocks
            if sp is not None:  # whole frames for spatial and full blocks, whole positions for temporal ones
                tokens, c_block = sp.layout(tokens, block.mode), sp.condition(block.mode)
            if cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c_block, ctx, ctx_mask, sp, rope, use_reentrant=False)
            else:
                tokens = block(tokens, c_block, ctx, ctx_mask, sp, rope)
        if sp is not None:
            tokens = sp.gather(tokens)  # (B, T', N, D) on every rank: head, final layer and loss as without it
        scores = self.head(tokens[:, :, -1])  # (B, outputs), from the joy token of every frame
        out = self.final(tokens[:, :, :-1], c_emb)  # (B, T', H'W', pt*ph*pw*C)
        v = rearrange(
            out, "b t (h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", h=gh, w=gw, pt=pt, ph=ph, pw=pw, c=c
        )  # (B, C, T, H, W)
        if cfg.prediction == "data":  # v is x1_hat here: turn it into the velocity that lands on it
            tt = t.to(v.dtype).view(b, 1, -1, 1, 1)  # (B, 1, 1 or T', 1, 1)
            one_minus_t = (1 - tt.repeat_interleave(pt, dim=2) if t.ndim == 2 else 1 - tt).clamp(min=cfg.t_eps)
            v = (v - x.to(v.dtype)) / one_minus_t
        return v, scores


def model_config(name: str = "tiny", **overrides) -> StaleConfig:
    """The StaleConfig of a named size (a row of SIZES) with field overrides; dim, depth or heads given as None keep
    the size's value (the model configs list them as null, so `model.depth=6` needs no `+`)."""
    if name not in SIZES:
        raise ValueError(f"model.name={name!r} is not one of {sorted(SIZES)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(StaleConfig)}
    if unknown:
        raise ValueError(
            f"unknown model keys {sorted(unknown)}; known: {sorted(f.name for f in dataclasses.fields(StaleConfig))}"
        )
    size = {k: v if overrides.get(k) is None else overrides[k] for k, v in SIZES[name].items()}
    return StaleConfig(**{**overrides, **size})


def build_model(name: str = "tiny", **overrides) -> StaleTransformer:
    """Build a model of a named size with StaleConfig field overrides (model_config)."""
    return StaleTransformer(model_config(name, **overrides))
