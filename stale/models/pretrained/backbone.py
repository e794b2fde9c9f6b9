"""A pretrained diffusers video transformer as a stale backbone: the seam every family adapter fills.

    model = load_backbone("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")     # or a local pipeline / transformer folder
    v, scores = model(x_t, t, y, text, text_mask)                  # exactly the Stale Transformer's call

The rest of stale (objective, samplers, guidance, EMA, budget, checkpoints, export) sees one thing: a module whose
forward takes stale's (x_t (B, C, T, H, W), t (B,) or (B, T'), y (B,), text (B, L, D_text), text_mask (B, L)) and
returns (velocity, scores), and whose `config` says cond, patch, the clip and the text widths. A family adapter
(wan.py, ltx.py) is one subclass that maps that call onto its diffusers module, written from the module's own
submodules so that stale's one addition fits in:

- Time: stale's t runs from the prior (t = 0) to the data (t = 1); the diffusers families take the noise level
  sigma = 1 - t, as a timestep sigma * 1000 (FlowMatchEulerDiscreteScheduler's num_train_timesteps).
- Velocity: the families predict noise - data (d x / d sigma); stale's velocity is data - noise (d x / d t), so
  v = -prediction. The Euler steps then coincide: x + (t' - t) v = x + (sigma' - sigma) prediction.
- The joy token (METHOD.md): one fixed, non-learnable vector appended to the family's token sequence after its
  patch embedding, read by the hinge head after the last block and removed before the output projection
  (`config.joy=false` leaves the family's forward exactly as diffusers runs it: the parity tests).

A family registers itself with @family("DiffusersClassName"); load_backbone picks the class from the folder's
config.json `_class_name`, so `model.pretrained` is all a user gives.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stale.models.pretrained import ulysses
from stale.models.stale_transformer import HingeHead, _check_joy_token, joy_vector
from stale.utils.hashing import weights_sha256

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NUM_TRAIN_TIMESTEPS = 1000  # the families' timestep scale: timestep = sigma * 1000
FAMILIES: dict[str, type["PretrainedBackbone"]] = {}  # diffusers `_class_name` -> its adapter
# diffusers video transformers stale knows of but does not adapt yet: a clear refusal instead of a wrong model
NOT_YET = ("CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel", "MochiTransformer3DModel")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class BackboneError(ValueError):
    """A pretrained backbone that cannot be loaded or used as configured; the message names the key and the value."""


@dataclass
class BackboneConfig:
    """The seam's config, as StaleConfig is the Stale Transformer's: what the objective, samplers, checks, budget and
    export read (cond, patch, in_channels, frames, size, text widths, num_classes). The widths come from the
    transformer's own config.json; the clip and the text length come from the run (resolve fills them)."""

    pretrained: str  # hub id or folder: a pipeline repository (subfolder=transformer) or a transformer folder
    subfolder: str | None = "transformer"  # null: `pretrained` is the transformer folder itself
    revision: str | None = None  # a hub revision (branch, tag or commit)
    family: str = ""  # the diffusers class (config.json `_class_name`), filled by backbone_config
    in_channels: int = 0  # latent channels the transformer takes (its config.json)
    patch: tuple = (1, 2, 2)  # (pt, ph, pw) in latent voxels (its config.json)
    dim: int = 0  # its hidden width: the joy token's and the hinge head's
    heads: int = 0  # its attention heads (sequence parallelism splits them)
    depth: int = 0  # its transformer blocks
    ffn_dim: int = 0  # its feed-forward width (the FLOP count)
    text_dim: int = 0  # the caption embeddings' width its caption projection takes
    text_len: int = 512  # caption tokens L (text_encoder.max_length fills it)
    frames: int = 8  # T of the latent training clips (resolve fills it from the vae and data)
    size: int = 16  # H = W of the latent training clips
    # RoPE's (time, height, width) coordinate scale, where the family's RoPE takes one (LTX: LTXPipeline's
    # rope_interpolation_scale, vae temporal compression / frame rate and vae spatial compression twice); null: the
    # adapter's default_rope_scale (LTX: (8/25, 32, 32), its own VAE at 25 fps); Wan's RoPE takes none (null only)
    rope_scale: tuple | None = None
    joy: bool = True  # append the fixed joy token (false: the family's own forward, bit for bit)
    joy_seed: int = 0x1F602  # the joy token is drawn once from this seed, as in the Stale Transformer
    grad_checkpointing: bool = False  # recompute each transformer block in backward
    dtype: str = "float32"  # the weights' dtype as loaded: bfloat16 = a bf16 frozen base (LoRA)
    cond: str = "text"  # the families are text-to-video models
    num_classes: int = 1  # no label table: y is ignored, the empty caption is the unconditional branch
    text_vocab: int = 0  # caption embeddings, never token ids
    prediction: str = "velocity"  # what the samplers and the loss see (the families predict a velocity)

    def __post_init__(self):
        self.patch = tuple(int(p) for p in self.patch)
        if self.dtype not in DTYPES:
            raise BackboneError(f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.cond != "text":
            raise BackboneError(f"model.cond={self.cond!r}: a pretrained backbone is text-conditioned (cond=text)")
        if self.rope_scale is not None:
            if len(self.rope_scale) != 3:
                raise BackboneError(f"model.rope_scale={list(self.rope_scale)} must be [time, height, width] or null")
            self.rope_scale = tuple(float(s) for s in self.rope_scale)
        for name in ("frames", "size", "text_len"):
            if getattr(self, name) < 1:
                raise BackboneError(f"model.{name}={getattr(self, name)} must be >= 1")

    @property
    def head_outputs(self) -> int:
        return 1  # does the clip match its caption: one binary hinge score

    @property
    def modes(self) -> tuple:
        return ("full",) * self.depth  # every family block attends over all tokens of the clip

    @property
    def sequence_parallel(self) -> bool:
        """Whether the family's adapter runs stale's Ulysses sequence parallelism (else refused before training)."""
        return FAMILIES[self.family].sequence_parallel_ready if self.family in FAMILIES else False


def family(class_name: str):
    """Register an adapter class for the diffusers transformer `class_name`."""

    def register(cls):
        cls.class_name = class_name
        FAMILIES[class_name] = cls
        return cls

    return register


class PretrainedBackbone(nn.Module):
    """A diffusers video transformer behind stale's forward. Subclasses set the class attributes and write `run`."""

    class_name: ClassVar[str] = ""
    block_path: ClassVar[str] = "transformer.blocks"  # the family's block list (FSDP2 shards per block)
    # LoRA's default target modules (fnmatch patterns on module names), the family's attention and feed-forward
    lora_targets: ClassVar[tuple] = ()
    # the family's diffusers pipeline class: its LoRA writer (save_lora_weights) and its model_index.json
    pipeline_class: ClassVar[str] = ""
    # the family's RoPE coordinate scale when model.rope_scale is null; None: its RoPE takes none
    default_rope_scale: ClassVar[tuple | None] = None
    # whether `run` splits its tokens over stale.parallel's sequence-parallel group (self.sequence_parallel)
    sequence_parallel_ready: ClassVar[bool] = False

    def __init__(self, transformer: nn.Module, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.transformer = transformer  # the diffusers module, with its own parameter names
        # As in the Stale Transformer: a persistent buffer (no optimiser sees it), checked bit for bit on load
        self.register_buffer("joy_token", joy_vector(config.dim, config.joy_seed), persistent=True)  # (D,)
        self.register_load_state_dict_pre_hook(_check_joy_token)
        self.head = HingeHead(config.dim, config.head_outputs)
        self.sequence_parallel = None  # set by stale.parallel for sequence-parallel steps

    @property
    def blocks(self) -> nn.ModuleList:
        """The family's transformer blocks, as StaleTransformer.blocks: FSDP2 shards each (stale.parallel.fsdp)."""
        return self.get_submodule(self.block_path)

    @property
    def untrained(self) -> tuple:
        """Parameters the pretrained weights do not hold (the hinge head): they train in every fine-tuning mode."""
        return tuple(f"head.{n}" for n, _ in self.head.named_parameters())

    def pretrained_base(self) -> dict:
        """The frozen base a fine-tuning checkpoint leaves out (LoRA, freeze patterns): the pretrained weights,
        recognised by their hash when the checkpoint is resumed or exported (call before adapters are injected)."""
        c = self.config
        return {
            "pretrained": c.pretrained,
            "subfolder": c.subfolder,
            "revision": c.revision,
            "sha256": weights_sha256(self.transformer),
        }

    @staticmethod
    def rope_scale_of(temporal: int, spatial: int, frame_rate: float = 25.0) -> tuple | None:
        """model.rope_scale for a VAE of these compressions at this frame rate, as the family's pipeline computes
        it (None: the family's RoPE takes no scale)."""
        return None

    @staticmethod
    def widths(transformer_config: dict) -> dict:
        """BackboneConfig fields read from the transformer's config.json: in_channels, patch, dim, heads, depth,
        ffn_dim, text_dim."""
        raise NotImplementedError

    def check_clip(self, frames: int, height: int, width: int) -> None:
        """A latent clip (T, H, W) the family cannot take raises BackboneError naming the nearest valid values."""
        pt, ph, pw = self.config.patch
        for name, n, p in (("frames", frames, pt), ("height", height, ph), ("width", width, pw)):
            if n % p:
                lo, hi = n // p * p, n // p * p + p
                raise BackboneError(
                    f"a latent {name} of {n} does not fit {self.class_name}'s patch {list(self.config.patch)}: "
                    f"use {lo or hi} or {hi} latent {name}"
                )

    def run(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """The family's forward on latents x (B, C, T, H, W) at noise levels sigma (B,) or (B, T'), in the module's
        dtype: returns (its prediction (B, C, T, H, W), the joy token's final state (B, 1, D) or None)."""
        raise NotImplementedError

    @staticmethod
    def rotate(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The family's RoPE on (B, S, D) self-attention projections (sequence parallelism's attention processor)."""
        raise NotImplementedError

    def scatter_tokens(self, tokens: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, tuple]:
        """parallel.sequence (self.sequence_parallel set): this rank's tokens (B, S_r, D) and RoPE rows, every block's
        self-attention (`attn1`) exchanging heads (stale/models/pretrained/ulysses.py)."""
        ulysses.install((blk.attn1 for blk in self.blocks), self.rotate)
        return ulysses.scatter(self.sequence_parallel, tokens, rope)

    def block(self, module: nn.Module, *args):
        """One transformer block, recomputed in backward with config.grad_checkpointing."""
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def append_joy(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, S + 1, D): the joy token after the patch tokens (as many as the family's blocks see)."""
        joy = self.joy_token.to(tokens.dtype)[None, None].expand(tokens.shape[0], 1, -1)
        return torch.cat([tokens, joy], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        b, _, T, H, W = x.shape
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, C={cfg.in_channels}, T, H, W); got shape {tuple(x.shape)}")
        self.check_clip(T, H, W)
        if t.shape not in ((b,), (b, T // cfg.patch[0])):
            raise ValueError(f"t must be (B,)=({b},) or per latent frame (B, T')=({b}, {T // cfg.patch[0]})")
        if text is None or text_mask is None or text.shape[:2] != text_mask.shape or text.shape[0] != b:
            raise ValueError(
                f"{self.class_name} needs text (B={b}, L, {cfg.text_dim}) and text_mask (B, L); got "
                f"{None if text is None else tuple(text.shape)} and "
                f"{None if text_mask is None else tuple(text_mask.shape)}"
            )
        # diffusers' own dtype (what its pipelines cast latents to): the first parameter may be one the family
        # keeps in float32 under a bf16 base (Wan's _keep_in_fp32_modules)
        dtype = self.transformer.dtype
        pred, joy = self.run(x.to(dtype), 1 - t, text.to(dtype), text_mask.bool())
        head_dtype = self.head.linear.weight.dtype  # the hinge head trains in its own (float32) weights
        scores = self.head(joy.to(head_dtype)) if joy is not None else x.new_zeros(b, cfg.head_outputs)
        # the families predict noise - data; stale's velocity is data - noise, in the caller's dtype
        return (-pred).to(x.dtype), scores


def _source(pretrained: str, subfolder: str | None, revision: str | None) -> dict:
    """from_pretrained's arguments for `pretrained`: an existing folder, else a hub id (offline: the local cache)."""
    path = Path(str(pretrained)).expanduser()
    if path.exists():
        where = path / subfolder if subfolder else path
        if not (where / "config.json").is_file():
            hint = (
                " (a transformer folder itself: model.subfolder=null)"
                if subfolder and (path / "config.json").is_file()
                else ""
            )
            raise BackboneError(
                f"model.pretrained={pretrained} model.subfolder={subfolder}: {where / 'config.json'} does not "
                f"exist{hint}"
            )
        return dict(pretrained_model_name_or_path=str(path), subfolder=subfolder)
    if not HUB_ID.match(str(pretrained)):
        raise BackboneError(f"model.pretrained={pretrained}: no such folder, and not a hub id (ORG/NAME)")
    return dict(pretrained_model_name_or_path=str(pretrained), subfolder=subfolder, revision=revision)


def read_config(pretrained: str, subfolder: str | None = "transformer", revision: str | None = None) -> dict:
    """The transformer's config.json (no weights), through diffusers' own loader (hub ids from the cache)."""
    from diffusers import ConfigMixin

    class AnyModel(ConfigMixin):  # load_config reads `config_name` from the class: any model's is config.json
        config_name = "config.json"

    source = _source(pretrained, subfolder, revision)
    try:
        return dict(AnyModel.load_config(**source))
    except (OSError, ValueError) as err:
        raise BackboneError(f"model.pretrained={pretrained} model.subfolder={subfolder}: {err}") from None


def adapter_of(class_name: str | None, where: str) -> type[PretrainedBackbone]:
    if class_name in FAMILIES:
        return FAMILIES[class_name]
    later = f" ({class_name} is not adapted yet)" if class_name in NOT_YET else ""
    raise BackboneError(
        f"{where}: _class_name={class_name!r} is not a supported backbone{later}; supported: {sorted(FAMILIES)}"
    )


def backbone_config(pretrained: str | None = None, subfolder: str | None = "transformer", **fields) -> BackboneConfig:
    """The BackboneConfig of `pretrained` (its config.json only, no weights) with the run's fields."""
    if not pretrained:
        raise BackboneError("model.pretrained is not set: give a hub id or a folder (model=diffusers)")
    unknown = set(fields) - {f.name for f in dataclasses.fields(BackboneConfig)}
    if unknown:
        raise BackboneError(
            f"unknown model keys {sorted(unknown)}; known: {sorted(f.name for f in dataclasses.fields(BackboneConfig))}"
        )
    raw = read_config(pretrained, subfolder, fields.get("revision"))
    adapter = adapter_of(raw.get("_class_name"), f"model.pretrained={pretrained} model.subfolder={subfolder}")
    own = adapter.widths(raw)
    # The module's own widths come from its config.json; one given by the run (in_channels from the vae, text_dim from
    # the text encoder, any other set by hand) must agree with it
    source = {"in_channels": " (from the vae)", "text_dim": " (from the text encoder)"}
    for name in own:
        given = fields.pop(name, None)
        if given in (None, 0):
            continue
        if (tuple(int(g) for g in given) if name == "patch" else given) != own[name]:
            raise BackboneError(
                f"model.{name}={given}{source.get(name, '')} does not fit {adapter.class_name} at "
                f"model.pretrained={pretrained}, which has {name}={own[name]}"
            )
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields.get("rope_scale") is not None and adapter.default_rope_scale is None:
        raise BackboneError(
            f"model.rope_scale={list(fields['rope_scale'])}: {adapter.class_name}'s RoPE takes no scale; use null"
        )
    return BackboneConfig(pretrained=str(pretrained), subfolder=subfolder, family=adapter.class_name, **own, **fields)


def load_backbone(pretrained: str | None = None, subfolder: str | None = "transformer", **fields) -> PretrainedBackbone:
    """The model node of `model=diffusers`: the pretrained transformer (the class from its config.json) behind the
    family's adapter, its weights in model.dtype."""
    config = backbone_config(pretrained, subfolder, **fields)
    adapter = FAMILIES[config.family]
    import diffusers

    cls = getattr(diffusers, config.family)
    source = _source(config.pretrained, config.subfolder, config.revision)
    try:
        transformer = cls.from_pretrained(**source, torch_dtype=DTYPES[config.dtype])
    except (OSError, ValueError) as err:
        raise BackboneError(f"model.pretrained={pretrained} model.subfolder={subfolder}: {err}") from None
    return adapter(transformer, config).train()  # from_pretrained leaves eval mode; a new nn.Module trains


def backbone_flops(config: BackboneConfig, frames: int, height: int, width: int) -> dict[str, float]:
    """Analytic forward FLOPs per clip (multiply-adds count 2) of a family block stack: self-attention over all S
    tokens (+ the joy token), cross-attention to L caption tokens and a feed-forward of width ffn_dim in every
    block, as Wan and LTX are built; the patch embedding, caption projection and output projection around them.
    Small terms (norms, RoPE, the time embedding, modulation) are left out, as stale.models.flops does."""
    pt, ph, pw = config.patch
    d, c, f, L, dt = config.dim, config.in_channels, config.ffn_dim, config.text_len, config.text_dim
    pvol = pt * ph * pw
    patches = (frames // pt) * (height // ph) * (width // pw)
    s = patches + int(config.joy)
    per_block = {
        "self_attention_linear": 2 * s * d * 4 * d,  # q, k, v, out
        "self_attention": 4 * s * s * d,  # Q K^T and A V
        "cross_attention_linear": 2 * s * d * 2 * d + 2 * L * d * 2 * d,  # q, out over the clip; k, v over the caption
        "cross_attention": 4 * s * L * d,
        "feed_forward": 2 * s * d * 2 * f,
    }
    parts = {k: float(config.depth * v) for k, v in per_block.items()}
    parts["patch_embed"] = float(2 * patches * c * pvol * d)
    parts["caption_projection"] = float(2 * L * (dt * d + d * d))
    parts["final"] = float(2 * patches * d * pvol * c + 2 * d * config.head_outputs)
    parts["total"] = sum(parts.values())
    return parts


def blank_backbone(config: BackboneConfig) -> PretrainedBackbone:
    """The backbone of `config` with freshly initialised weights (its transformer from its config.json alone), to load
    a whole state dict into: a gathered copy of a sharded model, nothing read twice."""
    import diffusers

    cls = getattr(diffusers, config.family)
    transformer = cls.from_config(read_config(config.pretrained, config.subfolder, config.revision))
    return FAMILIES[config.family](transformer.to(DTYPES[config.dtype]), config)
