"""Parameters and analytic FLOPs of the Stale Transformer, for compute budgets, MFU and benchmarks.

Convention (torch.utils.flop_counter.FlopCounterMode's, Kaplan et al. 2020, PaLM's MFU): matrix products and
convolutions only, 2 FLOPs per multiply-add; training = 3 x forward (overstating FlopCounterMode by about 0.3% for
`tiny`, under 0.01% from `s` up: the backward skips the input gradient of the patch embedding and the first
time-MLP layer); gradient checkpointing's recomputation is not counted. Attention counts Q K^T and A V, 4 L^2 D per
sequence of length L; at T' = 1 temporal attention is each token's value (Attention._single) and is not counted.
On a CPU, FlopCounterMode counts the default SDPA kernel as 0: wrap the step in sdpa_kernel(SDPBackend.MATH).
The hinge branch adds about hinge_fraction x training_flops_per_clip per clip.
"""

from __future__ import annotations

from torch import nn

from stale.models.pretrained.backbone import BackboneConfig, backbone_flops
from stale.models.stale_transformer import StaleConfig

FREQ_DIM = 256  # TimestepEmbedder's sinusoid width


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as the joy token are not parameters, so they are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_count(config: StaleConfig) -> int:
    """Parameters of StaleTransformer(config), without building it (equals count_parameters of the model)."""
    d, c = config.dim, config.in_channels
    pvol = config.patch[0] * config.patch[1] * config.patch[2]
    hidden = int(d * config.mlp_ratio)
    head_dim = d // config.heads
    block = (
        3 * d * d
        + 3 * d  # qkv
        + (2 * head_dim if config.qk_norm else 0)  # RMSNorm weights of q and k
        + d * d
        + d  # attention output projection
        + d * hidden
        + hidden
        + hidden * d
        + d  # MLP
        + (d * 6 * d + 6 * d if config.adaln == "per_block" else 6 * d)  # adaLN modulation | adaLN-single offset
    )
    text = config.cond == "text"
    if text:  # cross-attention: q, kv from the caption tokens (width D after the projection), proj, q/k norms
        block += d * d + d + d * 2 * d + 2 * d + d * d + d + (2 * head_dim if config.qk_norm else 0)
    return (
        c * pvol * d
        + d  # patch embedding
        + FREQ_DIM * d
        + d
        + d * d
        + d  # timestep MLP
        + (_text_parameters(config) if text else (config.num_classes + 1) * d)  # caption layers, or label table
        + config.depth * block
        + (d * 6 * d + 6 * d if config.adaln == "single" else 0)  # adaLN-single's shared modulation
        + d * 2 * d
        + 2 * d
        + d * pvol * c
        + pvol * c  # final layer
        + 2 * d
        + d * config.head_outputs
        + config.head_outputs  # hinge head (LayerNorm, linear)
    )


def _text_parameters(config: StaleConfig) -> int:
    """The caption projection (MLP), the pooled projection and, with text_vocab > 0, the learned text encoder."""
    d, dt = config.dim, config.text_dim
    out = dt * d + d + d * d + d + d * d + d
    if config.text_vocab:
        hd = dt // config.heads
        layer = (
            2 * dt
            + dt * dt
            + dt
            + dt * 2 * dt
            + 2 * dt
            + 2 * hd
            + dt * dt
            + dt  # norm1, attention
            + 2 * dt
            + dt * 4 * dt
            + 4 * dt
            + 4 * dt * dt
            + dt
        )  # norm2, MLP
        out += config.text_vocab * dt + config.text_len * dt + config.text_layers * layer + 2 * dt
    return out


def _text_flops(config: StaleConfig, tokens: int) -> dict[str, float]:
    """Caption work per clip: the learned encoder, the projection, and every block's cross-attention."""
    d, dt, m = config.dim, config.text_dim, config.text_len
    parts = {"text_encoder": 0.0}
    if config.text_vocab:  # per layer: q, kv, proj, attention over L tokens, MLP
        parts["text_encoder"] = config.text_layers * (2 * m * dt * 4 * dt + 4 * m * m * dt + 2 * m * dt * 8 * dt)
    parts["text_projection"] = 2 * m * (dt * d + d * d) + 2 * d * d
    # queries and output projection over every video token, keys and values over the caption, Q K^T and A V
    parts["cross_attention"] = config.depth * (2 * tokens * d * 2 * d + 2 * m * d * 2 * d + 4 * tokens * m * d)
    return parts


def forward_flops(
    config: StaleConfig | BackboneConfig, frames: int | None = None, size: int | tuple[int, int] | None = None
) -> dict[str, float]:
    """Forward FLOPs per clip of T=frames and H=W=size, or (H, W)=size for non-square buckets (defaults: the
    config's clip), by part; 'total' sums them."""
    T = config.frames if frames is None else frames
    H, W = (config.size, config.size) if size is None else (size, size) if isinstance(size, int) else size
    if isinstance(config, BackboneConfig):  # a pretrained family's block stack (stale/models/pretrained)
        return backbone_flops(config, T, H, W)
    pt, ph, pw = config.patch
    if T % pt or H % ph or W % pw:
        raise ValueError(f"clip (T, H, W)=({T}, {H}, {W}) is not divisible by model.patch={list(config.patch)}")
    d, c = config.dim, config.in_channels
    pvol = pt * ph * pw
    hidden = int(d * config.mlp_ratio)
    gt, s = T // pt, (H // ph) * (W // pw)  # latent frames, patches per frame
    n = s + 1  # tokens per frame: the patches and the joy token
    tokens = gt * n
    single = gt == 1  # images: temporal attention over one token is its value (Attention._single: no q, k, kernel)
    attention_per_mode = {
        "spatial": 4 * gt * n * n * d,  # T' sequences of N tokens
        "temporal": 0 if single else 4 * n * gt * gt * d,  # N sequences of T' tokens
        "full": 4 * tokens * tokens * d,  # one sequence of T' N tokens
    }
    adaln = 2 * d * 6 * d  # per block (per_block) or once (single)

    def linear_per_block(mode: str) -> int:  # qkv (v alone for one-token sequences), out projection, MLP, adaLN
        qkv = d if single and mode == "temporal" else 3 * d
        return 2 * tokens * d * (qkv + d + 2 * hidden) + (adaln if config.adaln == "per_block" else 0)

    parts = {
        "patch_embed": 2 * gt * s * c * pvol * d,
        "conditioning": 2 * (FREQ_DIM * d + d * d) + (adaln if config.adaln == "single" else 0),
        "blocks_linear": sum(linear_per_block(m) for m in config.modes),
        "attention": sum(attention_per_mode[m] for m in config.modes),
        "final": 2 * d * 2 * d + 2 * gt * s * d * pvol * c,
        "head": 2 * d * config.head_outputs,
    }
    if config.cond == "text":
        parts.update(_text_flops(config, tokens))
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def training_flops_per_clip(
    config: StaleConfig | BackboneConfig, frames: int | None = None, size: int | tuple[int, int] | None = None
) -> float:
    """Analytic training FLOPs (forward + backward = 3 x forward) per clip of T=frames, H=W=size or (H, W)=size."""
    return 3.0 * forward_flops(config, frames, size)["total"]
