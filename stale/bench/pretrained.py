"""A pretrained backbone's training step (issue 30): stale's Wan adapter against the bare diffusers module.

Three steps take turns in one process on one batch of latent clips with caption embeddings, each one
stale.bench.step's training step (StaleSystem's loss, backward, clipping, fused AdamW, constant learning rate):

  diffusers forward+backward     the bare WanTransformer3DModel called as WanPipeline calls it (timestep
                                 (1 - t) * 1000, caption rows past each prompt's length zeroed), its prediction's
                                 MSE to the flow target: the velocity loss alone, the objective's hinge weight 0
  stale adapter, velocity loss   stale's WanBackbone (joy token on) on that same loss: what the adapter's
                                 forward and the extra token cost
  stale adapter step             the adapter with the whole objective: joy token, hinge head and its branch
                                 (a second forward and backward on each clip with its own and its neighbour's
                                 caption), caption dropout

With the joy token off the adapter's velocity is minus the bare module's, bit for bit
(tests/test_pretrained_parity.py), so the first row is the bare module on stale's exact loss. The three share one
set of weights (each step has its own AdamW state), so a GPU holds the model once. The ratios are step time over
the bare step's time (`vs_bare`: the quotient of the medians; `paired_vs_bare`: the median of the per-round
quotients, with its spread), measured in the same rounds so a change in the machine's load reaches all three.

Memory per clip: what one step adds to the memory held before it (activations, temporaries, the gradients that
zero_grad(set_to_none) frees after every step), divided by the batch size, as stale.bench.memory's PeakMemory
measures it (CUDA: allocated tensor bytes; CPU: the resident set size, reset before the step after the allocator
has handed its free pages back: in a warmed-up process the step would otherwise reuse pages already resident).

On a GPU the section also times the adapter step at `gpu`'s clip (Wan 2.1 T2V 1.3B at 480 x 832 x 81 frames by
default: a 21 x 60 x 104 latent clip, random init from its config.json values unless `pretrained` is given; nothing
is downloaded): tokens/s, MFU (stale.models.flops' count of the backbone, the device's dense bf16 peak as the gpu
section takes it) and peak memory, with model.grad_checkpointing false and true. Without CUDA those rows say why
they were not measured.

The CPU default is a tiny random-init WanTransformer3DModel built in-process from `transformer` (its constructor
arguments); `pretrained=PATH` times a Wan transformer folder or pipeline (subfolder transformer) instead.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from stale.bench import gpu as gpu_bench
from stale.bench import median, random_batches, spread, sync, take_turns, timed, torch_threads
from stale.bench.memory import MIB, PeakMemory
from stale.bench.step import TrainStep, make_system, resolve_precision
from stale.diffusion.objective import StaleObjective
from stale.models.flops import training_flops_per_clip
from stale.models.pretrained import BackboneConfig, BackboneError, load_backbone
from stale.models.pretrained.backbone import NUM_TRAIN_TIMESTEPS
from stale.models.pretrained.wan import WanBackbone

WAN = "WanTransformer3DModel"
BARE, VELOCITY, STALE = "diffusers forward+backward", "stale adapter, velocity loss", "stale adapter step"
NO_CUDA = gpu_bench.NOT_MEASURED  # "not measured (no CUDA)"
# a tiny WanTransformer3DModel for the CPU default (conf/bench.yaml pretrained.transformer)
TINY_WAN = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)
# Wan 2.1 T2V 1.3B's transformer/config.json (Wan-AI/Wan2.1-T2V-1.3B-Diffusers): the GPU rows' random-init model
WAN_1_3B = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
GPU = dict(  # the shape: 81 frames of 480 x 832 through Wan's VAE (4x time, 8x space) -> 21 x 60 x 104
    transformer=None, frames=21, height=60, width=104, text_len=512, batch_size=1, steps=5, warmup=2
)


class CachedCaptions:
    """The text encoder of a step whose captions arrive as embeddings, as a stale-encode cache ships them:
    StaleSystem needs one for model.cond=text, and the measured step never encodes a string."""

    def to(self, device):
        return self

    def encode(self, prompts):
        raise RuntimeError("stale.bench.pretrained feeds caption embeddings; it has no text encoder to run")


class BareWan(nn.Module):
    """The bare diffusers module behind stale's call and nothing else: forward(x, t, y, text, text_mask) ->
    (minus its prediction, no scores), called as WanPipeline calls it; `config` is the adapter's with joy off."""

    def __init__(self, transformer: nn.Module, config: BackboneConfig):
        super().__init__()
        self.transformer, self.config = transformer, dataclasses.replace(config, joy=False)

    def forward(self, x, t, y, text, text_mask):
        context = text * text_mask[..., None].to(text.dtype)  # WanPipeline: zeros past each prompt's length
        timestep = (1 - t) * NUM_TRAIN_TIMESTEPS  # the noise level on the scheduler's 0..1000 scale
        pred = self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)
        return -pred[0], x.new_zeros(x.shape[0], 1)  # the family predicts noise - data; stale's velocity is minus it


def wan_backbone(
    pretrained: str | None,
    subfolder: str | None,
    transformer: dict,
    frames: int,
    height: int,
    text_len: int,
    joy: bool = True,
    seed: int = 0,
) -> WanBackbone:
    """stale's Wan adapter: of the folder or hub id `pretrained` (load_backbone), or of a random-init
    WanTransformer3DModel(**transformer) built here (null pretrained)."""
    fields = dict(frames=frames, size=height, text_len=text_len, joy=joy)
    if pretrained:
        model = load_backbone(pretrained, subfolder, **fields)
        if model.config.family != WAN:
            raise BackboneError(
                f"pretrained.pretrained={pretrained} is a {model.config.family}: this section times {WAN} backbones"
            )
        return model
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    try:
        wan = WanTransformer3DModel(**transformer)
    except TypeError as err:
        raise ValueError(f"pretrained.transformer={transformer}: {err} (the keys are {WAN}'s arguments)") from None
    config = BackboneConfig(
        pretrained="random init", subfolder=None, family=WAN, **WanBackbone.widths(dict(wan.config)), **fields
    )
    return WanBackbone(wan, config)


def captioned_batch(config: BackboneConfig, batch_size: int, frames: int, height: int, width: int, seed: int):
    """One batch as a latent cache with caption embeddings ships it: uint8 latents (B, C, T, H, W) (the step maps
    them to [-1, 1]), labels (unused) and (embeddings (B, L, D_text), mask (B, L)) of captions 1..L tokens long."""
    video, label = random_batches(1, batch_size, frames, (height, width), 1, seed, config.in_channels)[0]
    g = torch.Generator().manual_seed(seed + 1)
    text = torch.randn(batch_size, config.text_len, config.text_dim, generator=g)
    lengths = torch.randint(1, config.text_len + 1, (batch_size,), generator=g)
    mask = torch.arange(config.text_len)[None] < lengths[:, None]  # (B, L)
    return video, label, (text, mask)


def empty_caption(config: BackboneConfig) -> tuple:
    """The empty caption's encoding that caption dropout puts in: one token, zeros."""
    mask = torch.zeros(1, config.text_len, dtype=torch.bool)
    mask[0, 0] = True
    return torch.zeros(1, config.text_len, config.text_dim), mask


def train_step(model: nn.Module, objective: StaleObjective, device: str, precision: str, seed: int) -> TrainStep:
    """stale.bench.step's step of `model` on captions that arrive as embeddings."""
    system = make_system(
        model, objective=objective, seed=seed, text_encoder=CachedCaptions(), empty_text=empty_caption(model.config)
    )
    return TrainStep(system, device, precision)


def steps_of(adapter: WanBackbone, device: str, precision: str, seed: int) -> dict[str, TrainStep]:
    """The three steps of the comparison, on one set of weights: the bare module and the adapter on the velocity
    loss alone, and the adapter on the whole objective."""
    velocity = StaleObjective(hinge_weight=0.0)
    return {
        BARE: train_step(BareWan(adapter.transformer, adapter.config), velocity, device, precision, seed),
        VELOCITY: train_step(adapter, velocity, device, precision, seed),
        STALE: train_step(adapter, StaleObjective(), device, precision, seed),
    }


def step_memory(step: TrainStep, batch, device: str) -> int:
    """Bytes one step adds to what is held before it, at its peak (PeakMemory reset before the step)."""
    meter = PeakMemory(device, trim=True)  # in a warmed-up process: see PeakMemory
    held = meter.reset()
    step(batch)
    return max(0, meter.peak() - held)


def hinge_clips(batch_size: int, objective: StaleObjective) -> int:
    """Clips the text objective's hinge branch runs through the model again: each of n clips with its own and its
    neighbour's caption (none below two clips), as StaleObjective.text_loss draws n."""
    if objective.hinge_weight <= 0 or batch_size < 2:
        return 0
    return 2 * min(batch_size, max(2, round(batch_size * objective.hinge_fraction)))


def compare(
    adapter: WanBackbone,
    batch,
    rounds: int,
    warmup: int,
    device: str,
    precision: str,
    seed: int,
) -> dict:
    """The three steps warmed up, their memory measured, then timed step by step in turns."""
    batch_size = batch[0].shape[0]
    steps = steps_of(adapter, device, precision, seed)
    for _ in range(warmup):  # the first step also creates each AdamW state
        for step in steps.values():
            step(batch)
    memory = {name: step_memory(step, batch, device) for name, step in steps.items()}
    times = take_turns({name: lambda step=step: step(batch) for name, step in steps.items()}, rounds, device)
    bare = median(times[BARE])
    rows = []
    for name, ts in times.items():
        paired = [s / b for s, b in zip(ts, times[BARE])]
        rows.append(
            {
                "row": name,
                "step_ms": round(1e3 * median(ts), 3),
                "step_spread": round(spread(ts), 3),
                "vs_bare": round(median(ts) / bare, 4),
                "paired_vs_bare": round(median(paired), 4),
                "paired_spread": round(spread(paired), 3),
                "step_mem_mib": round(memory[name] / MIB, 3),
                "mem_per_clip_mib": round(memory[name] / MIB / batch_size, 3),
            }
        )
    return {"rows": rows, "method": PeakMemory(device, trim=True).method}


def measure_gpu(
    adapter: WanBackbone,
    checkpointing: bool,
    frames: int,
    height: int,
    width: int,
    batch_size: int,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    peak: float | None,
    seed: int,
) -> dict:
    """tokens/s, MFU and peak memory of the adapter's whole step (the objective) at one clip."""
    adapter.config.grad_checkpointing = bool(checkpointing)  # read by every block call
    objective = StaleObjective()
    batch = captioned_batch(adapter.config, batch_size, frames, height, width, seed)
    meter = PeakMemory(device)
    meter.reset()
    step = train_step(adapter, objective, device, precision, seed)
    warm_s = timed(lambda: step(batch), device, warmup) * warmup if warmup else 0.0
    step_s = timed(lambda: step(batch), device, steps)
    pt, ph, pw = adapter.config.patch
    tokens = (frames // pt) * (height // ph) * (width // pw)  # the joy token and the hinge branch not counted
    # by the MFU convention: model FLOPs (3 x forward, a checkpointed block's recompute not counted) of every clip the
    # objective runs through the model, the hinge branch's included
    runs = 1 + hinge_clips(batch_size, objective) / batch_size
    per_clip = training_flops_per_clip(adapter.config, frames, (height, width)) * runs
    achieved = per_clip * batch_size / step_s
    return {
        "row": f"{STALE} ({'GPU' if str(device).startswith('cuda') else device})",
        "grad_checkpointing": bool(checkpointing),
        "latent_clip": [frames, height, width],
        "batch_size": batch_size,
        "tokens_per_clip": tokens,
        "step_ms": round(1e3 * step_s, 3),
        "tokens_per_s": round(batch_size * tokens / step_s, 1),
        "tflops_per_s": round(achieved / 1e12, 3),
        "flops_per_clip": per_clip,
        "mfu": round(achieved / (peak * 1e12), 4) if peak else "n/a (peak unknown)",
        "peak_mem_gib": round(meter.peak() / 2**30, 3),
        "warmup_s": round(warm_s, 2),
    }


def gpu_rows(
    pretrained: str | None,
    subfolder: str | None,
    device: str,
    precision: str,
    seed: int,
    transformer: dict | None = None,
    frames: int = 21,
    height: int = 60,
    width: int = 104,
    text_len: int = 512,
    batch_size: int = 1,
    steps: int = 5,
    warmup: int = 2,
    checkpointing=(False, True),
    peak_tflops: float | None = None,
    measure_on_cpu: bool = False,
) -> list[dict]:
    """One row per model.grad_checkpointing value; without CUDA (and measure_on_cpu, the tests' switch) rows that
    say why they were not measured."""
    cuda = str(device).startswith("cuda")
    if not cuda and not measure_on_cpu:
        return [
            {"row": f"{STALE} (GPU)", "grad_checkpointing": bool(c), "status": NO_CUDA, "tokens_per_s": NO_CUDA}
            | {"mfu": NO_CUDA, "peak_mem_gib": NO_CUDA}
            for c in checkpointing
        ]
    adapter = wan_backbone(pretrained, subfolder, transformer or WAN_1_3B, frames, height, text_len, seed=seed)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops or (gpu_bench.peak_tflops(name) if cuda and precision == "bf16-mixed" else None)
    rows = []
    for ckpt in checkpointing:
        args = (adapter, ckpt, frames, height, width, batch_size, steps, warmup, device, precision, peak, seed)
        row = gpu_bench.unless_oom(lambda args=args: measure_gpu(*args), device)
        if row is None:
            why = f"not measured (out of memory at batch {batch_size})"
            row = {"row": f"{STALE} (GPU)", "grad_checkpointing": bool(ckpt), "status": why, "tokens_per_s": why}
            row |= {"mfu": why, "peak_mem_gib": why}
        rows.append({**row, "status": row.get("status", "measured"), "device_name": name})
    return rows


def run(
    pretrained: str | None = None,
    subfolder: str | None = "transformer",
    transformer: dict = TINY_WAN,
    frames: int = 3,
    height: int = 4,
    width: int = 6,
    text_len: int = 8,
    batch_size: int = 4,
    rounds: int = 10,
    warmup: int = 2,
    precision: str = "auto",
    threads: int | None = None,
    gpu: dict | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """frames, height, width: the latent clip of the comparison (the tiny default: 3 x 4 x 6); transformer: the
    random-init WanTransformer3DModel's arguments when pretrained is null; gpu: the GPU rows' settings (GPU's
    defaults, `peak_tflops`, `checkpointing`, `measure_on_cpu`)."""
    precision = resolve_precision(precision, device, "pretrained.precision")
    gpu = {**GPU, **(gpu or {})}
    with torch_threads(threads) as previous:
        adapter = wan_backbone(pretrained, subfolder, transformer, frames, height, text_len, seed=seed)
        adapter.check_clip(frames, height, width)
        batch = captioned_batch(adapter.config, batch_size, frames, height, width, seed)
        result = compare(adapter, batch, rounds, warmup, device, precision, seed)
        del adapter
        sync(device)
        rows = result["rows"] + gpu_rows(pretrained, subfolder, device, precision, seed, **gpu)
    by_name = {r["row"]: r for r in result["rows"]}
    measured = [r for r in rows[3:] if r["status"] == "measured"]
    return {
        "rows": rows,
        "summary": {
            "stale_over_bare": by_name[STALE]["vs_bare"],
            "velocity_loss_over_bare": by_name[VELOCITY]["vs_bare"],
            "stale_mem_per_clip_mib": by_name[STALE]["mem_per_clip_mib"],
            "gpu_rows": "measured" if measured else rows[-1]["status"],
        },
        "setup": {
            "model": pretrained or f"random-init {WAN}({transformer})",
            "latent_clip": [frames, height, width],
            "text_len": text_len,
            "batch_size": batch_size,
            "precision": precision,
            "rounds": rounds,
            "warmup": warmup,
            "torch_threads": threads or previous,
            "memory_method": result["method"],
            "gpu": {k: v for k, v in gpu.items() if k != "transformer"} | {"model": pretrained or "Wan 2.1 1.3B"},
        },
        "notes": [
            "vs_bare = median step time / the bare diffusers step's median, all timed in the same rounds (the order "
            "rotating); paired_vs_bare = the median of the per-round quotients",
            "the bare row is the diffusers module on the velocity loss (MSE to the flow target) alone; the adapter "
            "step adds the joy token and the hinge branch (2n clips more through the model, n = max(2, B/4))",
            f"mem_per_clip_mib = what one step adds to the memory held before it / batch size ({result['method']})",
            "GPU rows (CUDA only; 'not measured (no CUDA)' elsewhere): the adapter's whole step at the gpu clip (Wan 2.1 1.3B, 480x832x81 frames -> latent "
            "21x60x104 by default), bf16-mixed, MFU from stale.models.flops (3 x forward, hinge clips included)",
        ],
    }
