"""The Stale Transformer: a video diffusion transformer with alternating space-time attention.

Paper -> code: the Transformer that "alternates between its vehicular and anthropomorphic form" is a
stack of blocks that alternate spatial attention (the tokens of one frame) and temporal attention (one
spatial position across frames), as in TimeSformer and Latte. The non-learnable crying-joy parameter 😂
is the *joy token*: a fixed buffer appended as one extra spatial position to every frame, whose final
state feeds a hinge-loss classifier head.

Layout follows facebookresearch/DiT: adaLN-Zero conditioning (every block starts as the identity and the
final layer outputs exactly zero), shape comments, one file for the whole architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class StaleConfig:
    in_channels: int = 3  # RGB
    frames: int = 8  # T of the training clips (the positional encoding works for any T divisible by pt)
    size: int = 16  # H = W of the training clips
    patch: tuple = (1, 4, 4)  # tubelet (pt, ph, pw)
    dim: int = 128  # width D
    depth: int = 4  # number of blocks (each block is one attention + one MLP)
    heads: int = 4
    mlp_ratio: float = 4.0
    pattern: tuple = ("spatial", "temporal")  # repeated over depth; ("full",) is joint space-time attention
    num_classes: int = 4  # label classes; index num_classes is the null label for classifier-free guidance
    qk_norm: bool = True  # RMS-normalise queries and keys: keeps attention logits bounded at scale
    grad_checkpointing: bool = False  # recompute each block in backward: memory for compute
    joy_seed: int = 0x1F602  # the joy token is drawn once from this seed: fixed, deterministic, never trained

    @property
    def head_outputs(self) -> int:
        return 1 if self.num_classes <= 2 else self.num_classes  # binary hinge: one score; else Crammer-Singer


# Sizes: widths and depths follow DiT (S/B/L/XL); tiny is for CPUs and CI.
SIZES = {
    "tiny": dict(dim=128, depth=4, heads=4),
    "s": dict(dim=384, depth=12, heads=6),
    "b": dict(dim=768, depth=12, heads=12),
    "l": dict(dim=1024, depth=24, heads=16),
    "xl": dict(dim=1152, depth=28, heads=16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Fixed sin-cos encoding of positions `pos` (N,) -> (N, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_3d(dim: int, t: int, h: int, w: int) -> torch.Tensor:
    """3D sin-cos positional encoding (t, h, w, dim): channels split into time, height and width parts.

    Fixed rather than learned so that any (T, H, W) divisible by the patch works at inference, with no
    interpolation of a learned table.
    """
    dt = dim // 4 // 2 * 2  # a quarter of the channels for time
    dh = (dim - dt) // 2 // 2 * 2
    dw = dim - dt - dh
    et = sincos_1d(dt, torch.arange(t))[:, None, None].expand(t, h, w, dt)
    eh = sincos_1d(dh, torch.arange(h))[None, :, None].expand(t, h, w, dh)
    ew = sincos_1d(dw, torch.arange(w))[None, None, :].expand(t, h, w, dw)
    return torch.cat([et, eh, ew], dim=-1)


class TimestepEmbedder(nn.Module):
    """Embeds flow time t in [0, 1] with sinusoids and an MLP (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000)[:, None] * freqs[None]  # scale t to DiT's 0..1000 range of timesteps
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm, through scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, D) for any batch of sequences N
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, D/heads)
        return self.proj(rearrange(out, "n h l d -> n l (h d)"))


class StaleBlock(nn.Module):
    """One transformer block attending over space, time or both, with adaLN-Zero conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, mode: str, qk_norm: bool):
        super().__init__()
        if mode not in ("spatial", "temporal", "full"):
            raise ValueError(f"attention mode {mode!r} is not one of spatial, temporal, full")
        self.mode = mode
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, N, D), N = H*W + 1 (joy)
        b, t, n, _ = x.shape
        if self.mode == "spatial":  # the tokens of one frame see each other
            return self.attn(rearrange(x, "b t n d -> (b t) n d")).view(b, t, n, -1)
        if self.mode == "temporal":  # one position sees itself across frames
            return rearrange(self.attn(rearrange(x, "b t n d -> (b n) t d")), "(b n) t d -> b t n d", b=b)
        return self.attn(rearrange(x, "b t n d -> b (t n) d")).view(b, t, n, -1)  # full space-time

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x: (B, T, N, D), c: (B, D)
        mods = self.adaLN_modulation(c)[:, None, None]  # (B, 1, 1, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.chunk(6, dim=-1)
        x = x + gate_a * self._attend(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """adaLN then a linear map from each token to its tubelet of pixels (zero-initialised)."""

    def __init__(self, dim: int, patch_volume: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_volume * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class HingeHead(nn.Module):
    """Reads the joy token's final state (averaged over frames) and scores the classes."""

    def __init__(self, dim: int, outputs: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, outputs)

    def forward(self, joy: torch.Tensor) -> torch.Tensor:  # joy: (B, T, D)
        return self.linear(self.norm(joy.mean(dim=1)))  # (B, outputs)


class StaleTransformer(nn.Module):
    """Video velocity model v(x_t, t, label) with a joy-token hinge head.

    forward(x (B, C, T, H, W), t (B,), y (B,) long) -> (velocity (B, C, T, H, W), scores (B, outputs)).
    Use y = num_classes (the null label) for the unconditional branch of classifier-free guidance.
    """

    def __init__(self, config: StaleConfig | None = None, **overrides):
        super().__init__()
        cfg = config or StaleConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"StaleConfig has no field {k!r}")
            setattr(cfg, k, tuple(v) if k in ("patch", "pattern") else v)
        cfg.patch, cfg.pattern = tuple(cfg.patch), tuple(cfg.pattern)
        if cfg.dim % cfg.heads:
            raise ValueError(f"model.dim={cfg.dim} must be divisible by model.heads={cfg.heads}")
        self.config = cfg
        pt, ph, pw = cfg.patch
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.t_embed = TimestepEmbedder(cfg.dim)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: the null label
        g = torch.Generator().manual_seed(cfg.joy_seed)
        # 😂: a fixed, deterministic vector of unit RMS. A buffer, so no optimizer ever sees it.
        self.register_buffer("joy_token", torch.randn(cfg.dim, generator=g), persistent=True)
        modes = [cfg.pattern[i % len(cfg.pattern)] for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(StaleBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, m, cfg.qk_norm) for m in modes)
        self.final = FinalLayer(cfg.dim, pt * ph * pw, cfg.in_channels)
        self.head = HingeHead(cfg.dim, cfg.head_outputs)
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
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: gates start at 0, so each block is the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)  # the velocity is exactly zero at initialisation
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        b, c, T, H, W = x.shape
        pt, ph, pw = cfg.patch
        if T % pt or H % ph or W % pw:
            raise ValueError(f"clip (T, H, W)=({T}, {H}, {W}) is not divisible by the patch {cfg.patch}")
        gt, gh, gw = T // pt, H // ph, W // pw
        tokens = rearrange(self.patch_embed(x), "b d t h w -> b t (h w) d")  # (B, T', H'W', D)
        pos = sincos_3d(cfg.dim, gt, gh, gw).to(tokens)  # (T', H', W', D)
        tokens = tokens + rearrange(pos, "t h w d -> t (h w) d")
        joy = self.joy_token.to(tokens.dtype) + sincos_1d(cfg.dim, torch.arange(gt)).to(tokens)  # (T', D)
        tokens = torch.cat([tokens, joy[None, :, None].expand(b, gt, 1, cfg.dim)], dim=2)  # (B, T', H'W'+1, D)
        c_emb = self.t_embed(t) + self.y_embed(y)  # (B, D)
        for block in self.blocks:
            if cfg.grad_checkpointing and self.training:
                tokens = checkpoint(block, tokens, c_emb, use_reentrant=False)
            else:
                tokens = block(tokens, c_emb)
        scores = self.head(tokens[:, :, -1])  # (B, outputs) from the joy token
        out = self.final(tokens[:, :, :-1], c_emb)  # (B, T', H'W', pt*ph*pw*C)
        v = rearrange(out, "b t (h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                      h=gh, w=gw, pt=pt, ph=ph, pw=pw, c=c)  # (B, C, T, H, W)
        return v, scores


def build_model(name: str = "tiny", **overrides) -> StaleTransformer:
    """Build a model of a named size (tiny, s, b, l, xl) with StaleConfig field overrides."""
    if name not in SIZES:
        raise ValueError(f"model.name={name!r} is not one of {sorted(SIZES)}")
    unknown = set(overrides) - set(StaleConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model keys {sorted(unknown)}; known: {sorted(StaleConfig.__dataclass_fields__)}")
    return StaleTransformer(StaleConfig(**{**SIZES[name], **overrides}))
