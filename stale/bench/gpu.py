"""GPU throughput: tokens/s and model FLOPs utilisation (MFU) for sizes S, B and L (docs/bench/overhead.md).

For each size: 16-frame clips at the largest of `resolutions` whose eager bf16 step fits, then a timed loop of
stale.bench.step's training step with bf16 autocast, torch.compile and the flash SDPA kernel, in plain PyTorch
(Lightning's own cost is the `train` section). `temporal_kernels` times temporal attention on each SDPA backend.

  tokens/s = batch x video tokens per clip / step time (the joy token and the hinge branch not counted)
  MFU      = training FLOPs per clip x batch / step time / the device's peak dense bf16 FLOP/s

FLOPs are "analytic" (stale.models.flops, with the hinge branch's share; the counted figure beside them as a
cross-check) or "counted" (FlopCounterMode over one eager step). Without CUDA the rows say "not measured (no
CUDA)"; measure() itself runs on any device (the tests run it on CPU).
"""

from __future__ import annotations

import contextlib
import gc

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from stale.bench import build, random_batches, sync, timed
from stale.bench.memory import PeakMemory
from stale.bench.step import TrainStep, make_system, resolve_precision
from stale.models.flops import training_flops_per_clip

# Peak dense bf16 tensor FLOP/s (no sparsity) from the vendors' data sheets; first match of the
# device name wins, so the more specific names come first. `peak_tflops=` overrides. Not Lightning's
# get_available_flops: in Lightning 2.6 "NVIDIA H200" matches no entry, and its H100 NVL and H200 SXM1
# figures are the sparse ones (twice the dense peak).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
)
TARGET_MFU_B = 0.45  # issue 11: MFU >= 45% for B on an H100 or H200 in bf16
NOT_MEASURED = "not measured (no CUDA)"


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def _backend(sdpa: str):
    if sdpa in (None, "auto", "default"):
        return contextlib.nullcontext()
    if sdpa not in SDPA:
        raise ValueError(f"gpu.sdpa={sdpa!r} is not one of {sorted(SDPA)} or auto")
    return sdpa_kernel(SDPA[sdpa])


def train_step(model, device: str, precision: str, compile: bool) -> TrainStep:
    """The measured step (stale.bench.step) of `model`; compile=True compiles as stale-train's compile=true does
    (the model, and the loss of both objective branches as one fullgraph graph), dynamic=False: one static graph
    per batch shape."""
    return TrainStep(make_system(model, compile={"dynamic": False} if compile else False), device, precision)


def hinge_share(batch_size: int) -> float:
    """Share of the batch that the objective's hinge branch runs again (forward and backward)."""
    from stale.diffusion.objective import StaleObjective

    obj = StaleObjective()
    if obj.hinge_weight <= 0:
        return 0.0
    return max(1, round(batch_size * obj.hinge_fraction)) / batch_size  # as StaleObjective.__call__ rounds it


def count_flops_per_clip(model, batch, device: str, precision: str = "32-true") -> float:
    """Training FLOPs per clip, counted by FlopCounterMode over one eager forward + backward of the objective.

    On CPU attention is counted through the math SDPA kernel: the CPU flash kernel has no FLOP formula
    and would count as 0. CUDA's flash, efficient and cuDNN kernels have formulas and keep the configured
    backend (the math kernel would materialise the attention matrices).
    """
    from torch.utils.flop_counter import FlopCounterMode

    step = train_step(model, device, precision, compile=False)
    math = sdpa_kernel(SDPBackend.MATH) if not device.startswith("cuda") else contextlib.nullcontext()
    with math, FlopCounterMode(display=False) as counter:
        step.backward(batch)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch[0].shape[0]


def flops_per_clip(
    model, frames: int, size: int, batch, device: str, precision: str = "32-true", source: str = "auto"
) -> tuple[float, str]:
    """Training FLOPs per clip of one objective step, and where they come from.

    analytic: stale.models.flops.training_flops_per_clip (3 x forward of one clip) x (1 + hinge share),
    since the objective's hinge branch runs a second forward and backward on part of the batch.
    counted: FlopCounterMode over a real step (hinge branch included by construction).
    """
    if source in ("auto", "analytic"):
        share = hinge_share(batch[0].shape[0])
        per_clip = float(training_flops_per_clip(model.config, frames=frames, size=size)) * (1 + share)
        return per_clip, f"analytic (stale.models.flops x {1 + share:g} for the hinge branch)"
    if source != "counted":
        raise ValueError(f"gpu.flops={source!r} is not one of auto, analytic, counted")
    return count_flops_per_clip(model, batch, device, precision), "counted (FlopCounterMode)"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def unless_oom(fn, device: str):
    """fn()'s result, or None when it ran out of memory; the memory it held is freed either way."""
    try:
        return fn()
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not _is_oom(e):
            raise
        return None
    finally:
        _free(device)


def fits(size: str, frames: int, resolution: int, batch_size: int, device: str, precision: str, sdpa: str) -> bool:
    """Whether one eager training step fits in memory (compiled steps use no more than eager ones)."""

    def step() -> bool:  # its references die with it, before unless_oom frees the memory
        trainer = train_step(build(size, frames, resolution), device, precision, compile=False)
        with _backend(sdpa):
            trainer(random_batches(1, batch_size, frames, resolution)[0])
        sync(device)
        return True

    return bool(unless_oom(step, device))


def largest_fitting(
    size: str, frames: int, resolutions, batch_size: int, device: str, precision: str, sdpa: str
) -> int | None:
    for res in sorted(resolutions, reverse=True):
        if fits(size, frames, res, batch_size, device, precision, sdpa):
            return res
    return None


def _model_and_batch(size: str, frames: int, resolution: int, batch_size: int, device: str, seed: int):
    """The seeded model of `size` on `device` and one uint8 batch for it: what measure() and profile_kernels() time."""
    torch.manual_seed(seed)
    model = build(size, frames, resolution).to(device)
    return model, [t.to(device) for t in random_batches(1, batch_size, frames, resolution, seed=seed)[0]]


def measure(
    size: str = "b",
    frames: int = 16,
    resolution: int = 128,
    batch_size: int = 4,
    device: str = "cuda",
    dtype: str = "bfloat16",
    compile: bool = True,
    sdpa: str = "flash",
    steps: int = 10,
    warmup: int = 3,
    flops: str = "auto",
    peak: float | None = None,
    seed: int = 0,
    cross_check: bool = True,
) -> dict:
    """Time `steps` training steps after `warmup` (compilation happens there); tokens/s, FLOPs and MFU.

    cross_check: when the FLOPs are analytic, also count them with FlopCounterMode and report both.
    """
    precision = resolve_precision(dtype, device, "gpu.dtype")
    meter = PeakMemory(device)
    meter.reset()
    model, batch = _model_and_batch(size, frames, resolution, batch_size, device, seed)
    with _backend(sdpa):
        per_clip, source = flops_per_clip(model, frames, resolution, batch, device, precision, flops)
        analytic = source.startswith("analytic")
        counted = count_flops_per_clip(model, batch, device, precision) if cross_check and analytic else None
        trainer = train_step(model, device, precision, compile)
        warm_s = timed(lambda: trainer(batch), device, warmup) * warmup if warmup else 0.0
        step_s = timed(lambda: trainer(batch), device, steps)
    pt, ph, pw = model.config.patch
    tokens = (frames // pt) * (resolution // ph) * (resolution // pw)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = peak if peak else (peak_tflops(name) if precision == "bf16-mixed" and device.startswith("cuda") else None)
    achieved = per_clip * batch_size / step_s
    return {
        "size": size,
        "device_name": name,
        "clip": [frames, resolution, resolution],
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_clip": tokens,
        "step_ms": round(1e3 * step_s, 3),
        "tokens_per_s": round(batch_size * tokens / step_s, 1),
        "tflops_per_s": round(achieved / 1e12, 3),
        "flops_per_clip": per_clip,
        "flops_source": source,
        **({"flops_per_clip_counted": counted} if counted else {}),
        "peak_tflops": peak,
        "mfu": round(achieved / (peak * 1e12), 4) if peak else "n/a (peak unknown)",
        "dtype": dtype,
        "compile": compile,
        "sdpa": sdpa,
        "warmup_s": round(warm_s, 2),
        "peak_mem_gib": round(meter.peak() / 2**30, 2) if device.startswith("cuda") else None,
    }


ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa")  # kernel name parts, as profile_kernels groups them
MATMUL_KERNELS = ("gemm", "sm90", "addmm", "bmm", "cutlass", "matmul", "cublas", "nvjet")


def profile_kernels(
    size: str = "b",
    frames: int = 16,
    resolution: int = 128,
    batch_size: int = 4,
    device: str = "cuda",
    dtype: str = "bfloat16",
    compile: bool = True,
    sdpa: str = "flash",
    steps: int = 3,
    top: int = 15,
    seed: int = 0,
) -> dict:
    """Where a training step's GPU time goes: the top kernels by CUDA time over `steps` profiled steps,
    and the share of attention, matmul and everything else (elementwise, norms, copies)."""
    from torch.profiler import ProfilerActivity, profile

    model, batch = _model_and_batch(size, frames, resolution, batch_size, device, seed)
    trainer = train_step(model, device, resolve_precision(dtype, device, "gpu.dtype"), compile)
    cuda = device.startswith("cuda")  # on CPU (tests) the operators' own CPU time stands in
    with _backend(sdpa):
        timed(lambda: trainer(batch), device, 3)  # compile and warm up outside the profile
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            timed(lambda: trainer(batch), device, steps)

    def time_of(e) -> float:
        return e.device_time_total if cuda else e.self_cpu_time_total

    events = [e for e in prof.key_averages() if time_of(e) > 0]
    total = sum(time_of(e) for e in events) or 1.0

    def kind(name: str) -> str:
        n = name.lower()
        if any(k in n for k in ATTENTION_KERNELS):
            return "attention"
        return "matmul" if n.endswith("::mm") or any(k in n for k in MATMUL_KERNELS) else "other"

    shares: dict[str, float] = {}
    for e in events:
        shares[kind(e.key)] = shares.get(kind(e.key), 0.0) + time_of(e) / total
    rows = [
        {"kernel": e.key[:90], "share": round(time_of(e) / total, 4), "calls": e.count}
        for e in sorted(events, key=lambda e: -time_of(e))[:top]
    ]
    return {
        "size": size,
        "clip": [frames, resolution, resolution],
        "batch_size": batch_size,
        "step_ms_profiled": round(total / 1e3 / steps, 3),
        "shares": {k: round(v, 4) for k, v in shares.items()},
        "top": rows,
    }


TEMPORAL_BACKENDS = ("efficient", "flash", "cudnn", "math")


def temporal_kernels(
    size: str = "b",
    frames: int = 16,
    resolution: int = 64,
    batch_size: int = 4,
    device: str = "cuda",
    dtype: str = "bfloat16",
    backends=TEMPORAL_BACKENDS,
    steps: int = 8,
    rounds: int = 2,
    seed: int = 0,
) -> dict:
    """Which SDPA kernel suits temporal attention (B (H'W' + 1) sequences of only T' tokens)? The eager training
    step with the model's temporal blocks on each backend in turn (stale_transformer.TEMPORAL_SDPA, the list they
    try, set to that one backend; spatial blocks keep torch's choice), variants interleaved round by round. A
    backend the device lacks gives a row with its error. Behind BENCHMARKS.md's temporal-kernel figures."""
    from unittest import mock

    from stale.models import stale_transformer

    model, batch = _model_and_batch(size, frames, resolution, batch_size, device, seed)
    trainer = train_step(model, device, resolve_precision(dtype, device, "gpu.dtype"), compile=False)
    times, errors = {b: [] for b in backends}, {}
    for _ in range(rounds):
        for name in backends:
            if name in errors:
                continue
            with mock.patch.object(stale_transformer, "TEMPORAL_SDPA", [SDPA[name]]):
                try:
                    timed(lambda: trainer(batch), device, 2)  # warm-up
                    times[name].append(timed(lambda: trainer(batch), device, steps))
                except RuntimeError as e:  # no such kernel for this device, dtype or shape: a result, not a crash
                    errors[name] = " ".join(str(e).split())[:160]
    ref = min(times[backends[0]]) if times[backends[0]] else None
    rows = [
        {
            "temporal": name,
            "step_ms": round(1e3 * min(ts), 2) if ts else None,
            "vs_" + backends[0]: round(min(ts) / ref, 3) if ts and ref else None,
            **({"error": errors[name]} if name in errors else {}),
        }
        for name, ts in times.items()
    ]
    return {
        "rows": rows,
        "size": size,
        "clip": [frames, resolution, resolution],
        "batch_size": batch_size,
        "dtype": dtype,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }


def run(
    sizes=("s", "b", "l"),
    frames: int = 16,
    resolutions=(256, 192, 128, 96, 64),
    batch_size: int = 4,
    dtype: str = "bfloat16",
    compile: bool = True,
    sdpa: str = "flash",
    steps: int = 10,
    warmup: int = 3,
    flops: str = "auto",
    peak_tflops: float | None = None,
    measure_on_cpu: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """One row per size; measure_on_cpu runs the same path without CUDA (tests: tiny, float32, no compile)."""
    if not device.startswith("cuda") and not measure_on_cpu:
        return {
            "rows": [{"size": s, "tokens_per_s": NOT_MEASURED, "mfu": NOT_MEASURED} for s in sizes],
            "summary": {"status": NOT_MEASURED, "target_mfu_b": TARGET_MFU_B},
            "notes": ["the gpu section needs CUDA; its code path is tested on CPU (tests/test_bench.py)"],
        }
    precision, rows = resolve_precision(dtype, device, "gpu.dtype"), []
    for s in sizes:
        res = largest_fitting(s, frames, resolutions, batch_size, device, precision, sdpa)
        why = f"no resolution in {list(resolutions)} fits batch {batch_size}"
        if res is not None:
            why = "compiled step OOM"
            args = (s, frames, res, batch_size, device, dtype, compile, sdpa, steps, warmup, flops, peak_tflops, seed)
            row = unless_oom(lambda: measure(*args), device)
        if res is None or row is None:
            row = {"size": s, **({"clip": [frames, res, res]} if res else {}), "tokens_per_s": f"not measured ({why})"}
            row["mfu"] = "not measured"
        rows.append(row)
    b = next((r for r in rows if r["size"] == "b" and isinstance(r.get("mfu"), float)), None)
    summary = {
        "target_mfu_b": TARGET_MFU_B,
        "mfu_b": b["mfu"] if b else "not measured",
        "meets_target": bool(b) and b["mfu"] >= TARGET_MFU_B,
    }
    return {
        "rows": rows,
        "summary": summary,
        "notes": [
            f"bf16 autocast, torch.compile={compile}, SDPA backend {sdpa}, batch {batch_size}, "
            f"{frames} frames, largest fitting resolution of {list(resolutions)}"
        ],
    }
