"""Which SDPA kernel suits temporal attention? (a GPU experiment behind BENCHMARKS.md's B profile)

Temporal attention runs B x (H'W' + 1) sequences of only T' tokens (16 here); flash attention's backward
took 23.5% of B's compiled step on an H100. This times B's eager bf16 training step (objective forward,
backward, AdamW) at 16 x 64 x 64, batch 4, with spatial attention on flash and temporal attention on each
SDPA backend in turn, all in one process, variants interleaved.

    python scripts/gpu_temporal_kernels.py [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from stale.bench import build, random_batches, sync
from stale.bench.gpu import PlainStep
from stale.models.stale_transformer import StaleBlock

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", default="b")
    ap.add_argument("--res", type=int, default=64)
    args = ap.parse_args()
    choice = {"temporal": "flash"}
    plain_attend = StaleBlock.attend

    def attend(self, x):  # temporal blocks use the chosen backend, spatial ones flash
        backend = BACKENDS[choice["temporal"]] if self.mode == "temporal" else SDPBackend.FLASH_ATTENTION
        with sdpa_kernel(backend):
            return plain_attend(self, x)

    StaleBlock.attend = attend
    torch.manual_seed(0)
    model = build(args.size, 16, args.res).cuda()
    trainer = PlainStep(model, "cuda", torch.bfloat16, compile=False)
    batch = [t.cuda() for t in random_batches(1, 4, 16, args.res)[0]]
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name in BACKENDS:
            choice["temporal"] = name
            try:
                for _ in range(2):
                    trainer.step(batch)
                sync("cuda")
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainer.step(batch)
                sync("cuda")
                times.setdefault(name, []).append((time.perf_counter() - t0) / args.steps)
            except RuntimeError as e:
                times.setdefault(name, [])
                print(f"{name}: failed: {str(e).splitlines()[0][:120]}")
    base = min(times["flash"]) if times["flash"] else None
    for name, ts in times.items():
        if ts:
            print(f"temporal={name:9s} step {1e3 * min(ts):8.2f} ms  vs flash {min(ts) / base:6.3f}"
                  if base else f"temporal={name:9s} step {1e3 * min(ts):8.2f} ms")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
