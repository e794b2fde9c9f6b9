"""Peak training memory per clip, for each model size, with and without gradient checkpointing.

One training step is stale.bench.step's. Memory per clip is the slope between two batch sizes,
(peak(B2) - peak(B1)) / (B2 - B1), which cancels weights, gradients, optimiser state and library baggage
(`fixed_mib` is that rest). cuda: torch.cuda.max_memory_allocated(); cpu: the peak resident set size of a fresh
process per row, its high-water mark reset before each measured step on Linux (docs/bench/overhead.md).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys

import torch

from stale.bench import build, random_batches, sync
from stale.bench.step import TrainStep, make_system, resolve_precision

MARK = "STALE_BENCH_MEMORY "
MIB = 2**20


def trim_allocator() -> bool:
    """Return glibc's free heap pages to the system (malloc_trim(0)); False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """The most memory this process held since the last reset(), on `device`: the one peak-memory meter of the bench.

    cuda: torch.cuda.max_memory_allocated (live tensor bytes; the caching allocator's reserve is extra).
    cpu: the peak resident set size. Writing 5 to /proc/self/clear_refs resets VmHWM (the RSS high-water mark) to
    the current RSS, so a phase's peak excludes earlier transients such as importing torch; elsewhere getrusage's
    ru_maxrss, which never resets (a fresh process per measurement keeps that usable). `method` says which.

    trim (CPU): reset() first hands the C allocator's free pages back to the system (glibc's malloc_trim), so that a
    phase in a process that already ran one (a warmed-up step) counts the memory it allocates, not 0 because the
    allocator kept the previous phase's pages resident. Off by default: the memory section's fresh processes do
    not need it, and its recorded numbers were measured without it.
    """

    def __init__(self, device: str = "cpu", trim: bool = False):
        self.device, self.cuda = device, str(device).startswith("cuda")
        self.trim = trim and not self.cuda and trim_allocator()
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            self.reset_hwm()
            self.method = "peak RSS (VmHWM, reset per phase) of a fresh process"
        except OSError:
            self.method = "peak RSS (ru_maxrss) of a fresh process"
        if self.trim:
            self.method += ", the allocator's free pages returned first (malloc_trim)"

    @staticmethod
    def reset_hwm() -> int:
        """Reset Linux's RSS high-water mark; return the current RSS in bytes (OSError where there is none)."""
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return PeakMemory.status("VmRSS")

    @staticmethod
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
        raise OSError(f"/proc/self/status has no {key}")

    def reset(self) -> int:
        """Reset the peak (where possible); return the memory held now, in bytes."""
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if self.trim:
            trim_allocator()
        if "VmHWM" in self.method:
            return self.reset_hwm()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        sync(self.device)
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        if "VmHWM" in self.method:
            return self.status("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peaks(
    size: str, checkpointing: bool, frames: int, image: int, batches: tuple[int, int], device: str, seed: int
) -> dict:
    """Memory held before the first step and the peaks of steps at batches[0] and batches[1]."""
    torch.manual_seed(seed)
    model = build(size, frames, image, grad_checkpointing=checkpointing)
    b1, b2 = batches
    data = {b: random_batches(1, b, frames, image, seed=seed)[0] for b in (b1, b2)}
    step = TrainStep(make_system(model), device, "auto")
    meter = PeakMemory(device)
    base = meter.reset()
    step(data[b1])  # the first step also creates AdamW's state
    meter.reset()
    step(data[b1])
    p1 = meter.peak()
    meter.reset()
    step(data[b2])
    p2 = meter.peak()
    return {
        "base": base,
        "p1": p1,
        "p2": p2,
        "parameters": sum(p.numel() for p in model.parameters()),
        "method": meter.method,
    }


def _peaks_cpu_subprocess(args: dict) -> dict:
    """_peaks(**args) on the CPU in a fresh Python process (with this one's torch threads): its own peak RSS."""
    args = {**args, "threads": torch.get_num_threads()}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "stale.bench.memory", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker for {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def run(
    sizes=("tiny", "s"),
    frames: int = 8,
    size: int = 16,
    batches=(2, 10),
    checkpointing=(False, True),
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    b1, b2 = (int(b) for b in batches)
    if not 0 < b1 < b2:
        raise ValueError(f"memory.batches={list(batches)} must be two batch sizes 0 < B1 < B2")
    rows = []
    for name in sizes:
        plain_per_clip = None
        for ckpt in checkpointing:
            args = dict(size=name, checkpointing=bool(ckpt), frames=frames, image=size, batches=[b1, b2], seed=seed)
            if device.startswith("cuda"):
                m = _peaks(**args, device=device)
                torch.cuda.empty_cache()
            else:
                m = _peaks_cpu_subprocess(args)
            per_clip = (m["p2"] - m["p1"]) / (b2 - b1)
            row = {
                "size": name,
                "grad_checkpointing": bool(ckpt),
                "parameters": m["parameters"],
                "clip": [frames, size, size],
                "per_clip_mib": round(per_clip / MIB, 3),
                "fixed_mib": round((m["p1"] - m["base"] - b1 * per_clip) / MIB, 2),
                "peak_mib_at_b2": round((m["p2"] - (0 if device.startswith("cuda") else m["base"])) / MIB, 2),
                "method": m["method"],
            }
            if not ckpt:
                plain_per_clip = per_clip
            elif plain_per_clip:
                row["per_clip_vs_no_ckpt"] = round(per_clip / plain_per_clip, 3)
            rows.append(row)
    return {
        "rows": rows,
        "setup": {
            "batches": [b1, b2],
            "device": device,
            "precision": resolve_precision("auto", device),
        },
        "notes": [
            "per_clip_mib = (peak(B2) - peak(B1)) / (B2 - B1); fixed_mib = peak(B1) - held before "
            "the first step - B1 x per_clip (weights' gradients, AdamW state, workspaces)",
            "cpu peak_mib_at_b2 is above the process's resident size before the first step; cuda "
            "peak_mib_at_b2 is all live tensor memory",
        ],
    }


def largest_size_that_fits(fits, start: int, limit: int, step: int) -> int:
    """Largest n in {start, start + step, ...} <= limit with fits(n), assuming fits is monotone (0 if none).

    Doubles n until a try fails (or passes limit), then bisects between the last fit and the first failure
    in multiples of step: about 2 log2(limit / start) tries, each one training step.
    """
    if start < step or start % step:
        raise ValueError(f"start={start} must be a positive multiple of step={step}")
    good, bad, n = 0, None, start
    while n <= limit:
        if not fits(n):
            bad = n
            break
        good, n = n, n * 2
    hi = bad if bad is not None else limit + step  # the first size known not to fit (or past the limit)
    while hi - good > step:
        mid = (good + hi) // 2 // step * step
        if mid <= good:
            break
        good, hi = (mid, hi) if fits(mid) else (good, mid)
    return good


def longest_clip(
    size: str = "b",
    resolution: int = 128,
    checkpointing: bool = False,
    device: str = "cuda",
    batch_size: int = 1,
    start: int = 4,
    max_frames: int = 1024,
    seed: int = 0,
) -> dict:
    """The longest clip (frames at resolution x resolution) whose bf16 training step fits on the GPU.

    One eager training step per try (stale.bench.step, bf16-mixed); a try that raises CUDA's
    out-of-memory error does not fit. Frames move in multiples of the model's temporal patch.
    """
    if not device.startswith("cuda"):
        return {
            "size": size,
            "grad_checkpointing": checkpointing,
            "longest_frames": None,
            "note": "not measured (no CUDA): out-of-memory needs a device with a fixed memory size",
        }
    tries = []

    def fits(frames: int) -> bool:
        torch.manual_seed(seed)
        model = step = None
        try:
            model = build(size, frames, resolution, grad_checkpointing=checkpointing)
            step = TrainStep(make_system(model), device, "bf16-mixed")
            meter = PeakMemory(device)
            meter.reset()
            step(random_batches(1, batch_size, frames, resolution, seed=seed)[0])
            tries.append({"frames": frames, "fits": True, "peak_gib": round(meter.peak() / 2**30, 2)})
            return True
        except torch.cuda.OutOfMemoryError:
            tries.append({"frames": frames, "fits": False})
            return False
        finally:
            del model, step  # before emptying the cache: a failed try must not hold its memory into the next
            torch.cuda.empty_cache()

    from stale.bench import model_kwargs

    pt, ph, pw = model_kwargs(size, frames=start, size=resolution)["patch"]
    best = largest_size_that_fits(fits, start, max_frames, pt)
    tokens = best // pt * (resolution // ph) * (resolution // pw)
    return {
        "size": size,
        "grad_checkpointing": checkpointing,
        "resolution": resolution,
        "batch_size": batch_size,
        "longest_frames": best,
        "tokens_per_clip": tokens,
        "tries": tries,
        "device": torch.cuda.get_device_name(),
    }


if __name__ == "__main__":  # worker: one (size, checkpointing) row in a fresh process
    a = json.loads(sys.argv[1])
    torch.set_num_threads(int(a.pop("threads")))
    print(MARK + json.dumps(_peaks(**a, device="cpu")), flush=True)
