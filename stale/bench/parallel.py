"""Sequence parallelism on CPU processes (gloo): step time, activation memory per rank, communication volume.

For each N in `sequences`, N fresh processes (one torch thread each) train the same model on the same clips,
each holding 1/N of every clip's tokens inside the blocks (stale/parallel/sequence.py); N = 1 is the plain
model in one process. One step is stale.bench.step's training step with diffusion.hinge_weight=0 (one forward
per step, so the volume below is exact; each step's noise is the same on every rank), with the gradient
all-reduce over the group (DDP's job in training) between its backward and its update. Per row:

- step_ms: median wall time of the measured steps on rank 0; cpu_ms: the median process CPU time of a step, the
  largest rank's (on a shared machine the steadier number: the N processes compete for the same cores);
- saved_mib: bytes autograd saved for backward during the forward (torch.autograd.graph.saved_tensors_hooks),
  the largest rank's: the activation memory that sequence parallelism divides;
- rss_step_mib: peak resident set size over all steps above the resident size before the first (model, AdamW
  and clips built), the largest rank's: physical memory, AdamW's state, allocator and gloo buffers included;
- predicted_ratio: the analytic share of a clip's block tokens on the largest rank (T'_r / T' in whole-frame
  blocks, N_r / N in whole-position blocks, averaged over the blocks); measured ratios are against N = 1;
- comm_mib: analytic bytes each rank sends per step (the largest rank's): every layout switch sends the
  tokens this rank holds that other ranks need, the final gather sends this rank's frames to the N - 1 others;
  backward sends the same again (the inverse all-to-alls); the gradient all-reduce sends 2 (N - 1) / N of the
  parameters (ring).
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch

from stale.parallel.sequence import LAYOUT, split_sizes

MIB = 2**20


def analytic(model_cfg, batch: int, sp: int, params: int) -> dict:
    """Predicted block-token share and the bytes the largest rank sends per step (fp32), for sp ranks."""
    t = model_cfg.frames // model_cfg.patch[0]
    n = (model_cfg.size // model_cfg.patch[1]) * (model_cfg.size // model_cfg.patch[2]) + 1
    ts, ns = split_sizes(t, sp), split_sizes(n, sp)
    token_bytes = batch * model_cfg.dim * 4
    shares = [(ts[0] / t if LAYOUT[m] == "frames" else ns[0] / n) for m in model_cfg.modes]
    # switches in the forward: frames -> positions sends T'_r (N - N_r) tokens, positions -> frames N_r (T' - T'_r)
    sent, layout = 0, "frames"
    for m in list(model_cfg.modes) + ["spatial"]:  # the final gather first returns to whole frames
        if LAYOUT[m] != layout:
            sent += ts[0] * (n - ns[0]) if layout == "frames" else ns[0] * (t - ts[0])
            layout = LAYOUT[m]
    if "full" in model_cfg.modes:  # Ulysses: q, k, v out and the output back, (heads - heads_r) of d each
        hs, d = split_sizes(model_cfg.heads, sp), model_cfg.dim // model_cfg.heads
        per_block = 4 * ts[0] * n * (model_cfg.heads - hs[0]) * d / model_cfg.dim
        sent += per_block * sum(m == "full" for m in model_cfg.modes)
    gather = ts[0] * n * (sp - 1)
    comm = 2 * (sent + gather) * token_bytes + (2 * (sp - 1) / sp * params * 4 if sp > 1 else 0)
    return {"predicted_share": sum(shares) / len(shares), "comm_bytes": comm, "tokens_per_rank_max": ts[0] * n}


def _worker(
    rank: int,
    world: int,
    port: int,
    queue,
    model_name: str,
    overrides: dict,
    batch: int,
    steps: int,
    warmup: int,
    seed: int,
) -> None:
    import torch.distributed as dist

    from stale.bench import build, random_batches
    from stale.bench.memory import PeakMemory
    from stale.bench.step import TrainStep, make_system
    from stale.diffusion.objective import StaleObjective
    from stale.parallel.sequence import SequenceParallel, sharded

    torch.set_num_threads(1)
    sp = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        sp = SequenceParallel(dist.group.WORLD)
    try:
        torch.manual_seed(seed)
        model = build(model_name, **overrides)
        cfg = model.config
        # the velocity loss alone (diffusion.hinge_weight=0): one forward per step, so the volume is exact
        step = TrainStep(make_system(model, objective=StaleObjective(hinge_weight=0.0), seed=seed), "cpu")
        clips = random_batches(1, batch, cfg.frames, cfg.size, cfg.num_classes, seed=seed, channels=cfg.in_channels)[0]
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        def train() -> float:
            saved[0] = 0
            with sharded(model, sp), torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u):
                loss = step.backward(clips)["loss"]
            if world > 1:  # every rank holds the clip's loss: the average over the group is the gradient
                grads = [p.grad for p in model.parameters() if p.grad is not None]  # the head has none here
                flat = torch.cat([gr.reshape(-1) for gr in grads])
                dist.all_reduce(flat)
                flat /= world
                for gr, new in zip(grads, flat.split([gr.numel() for gr in grads])):
                    gr.copy_(new.view_as(gr))
            step.update()
            return loss.item()

        rss = PeakMemory("cpu")
        before = rss.reset()  # model, optimiser and clips built; no step taken yet
        times, cpu, losses = [], [], []
        for i in range(warmup + steps):
            if world > 1:
                dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(train())
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        queue.put(
            {
                "rank": rank,
                "step_s": statistics.median(times),
                "cpu_s": statistics.median(cpu),
                "saved": saved[0],
                "rss": rss.peak() - before,
                "loss0": losses[0],
                "method": rss.method,
            }
        )
    except Exception:  # to the parent, which would otherwise wait on the queue
        import traceback

        queue.put({"rank": rank, "error": traceback.format_exc()})
    finally:
        if world > 1:
            dist.destroy_process_group()


def _measure(sp: int, **kwargs) -> list[dict]:
    ctx = torch.multiprocessing.get_context("spawn")  # fresh processes: clean resident sizes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, kwargs=dict(rank=r, world=sp, port=port, queue=queue, **kwargs)) for r in range(sp)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in range(sp)]
    for p in procs:
        p.join(timeout=60)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"a parallel bench process failed:\n{errors[0]}")
    return sorted(results, key=lambda r: r["rank"])


def run(
    model: str = "tiny",
    frames: int = 16,
    size: int = 32,
    batch_size: int = 2,
    sequences=(1, 2),
    steps: int = 5,
    warmup: int = 2,
    pattern=None,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    from stale.bench import build

    if device != "cpu":
        return {"rows": [], "notes": [f"not measured (device={device}: this section runs gloo CPU processes)"]}
    overrides = dict(frames=frames, image=size, **({"pattern": list(pattern)} if pattern else {}))
    built = build(model, **overrides)
    model_cfg, params = built.config, sum(p.numel() for p in built.parameters())
    rows, base = [], None
    for sp in sequences:
        res = _measure(
            sp, model_name=model, overrides=overrides, batch=batch_size, steps=steps, warmup=warmup, seed=seed
        )
        a = analytic(model_cfg, batch_size, sp, params)
        row = {
            "sequence": sp,
            "clip": f"{frames}x{size}x{size}",
            "batch": batch_size,
            "tokens_per_rank": a["tokens_per_rank_max"],
            "step_ms": round(res[0]["step_s"] * 1e3, 1),
            "cpu_ms": round(max(r["cpu_s"] for r in res) * 1e3, 1),
            "saved_mib": round(max(r["saved"] for r in res) / MIB, 2),
            "rss_step_mib": round(max(r["rss"] for r in res) / MIB, 1),
            "comm_mib": round(a["comm_bytes"] / MIB, 2),
            "predicted_ratio": round(a["predicted_share"], 3),
            "loss0": round(res[0]["loss0"], 6),
        }
        base = base or row
        row["saved_ratio"] = round(row["saved_mib"] / base["saved_mib"], 3)
        row["rss_ratio"] = round(row["rss_step_mib"] / base["rss_step_mib"], 3) if base["rss_step_mib"] else None
        row["step_ratio"] = round(row["step_ms"] / base["step_ms"], 3)
        row["cpu_ratio"] = round(row["cpu_ms"] / base["cpu_ms"], 3)
        rows.append(row)
    return {
        "rows": rows,
        "summary": {f"saved_ratio_N{r['sequence']}": r["saved_ratio"] for r in rows},
        "notes": [
            __doc__.split("\n\n")[1].replace("\n", " "),
            f"model {model} {model_cfg.modes}",
            "memory: " + res[0]["method"],
            "predicted_ratio is the block-token share only: the patch "
            "embedding, the final gather, the head and the final layer hold the whole clip on every rank",
        ],
    }
