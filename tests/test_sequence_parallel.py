"""Sequence parallelism over 2 gloo processes equals one process (forward, backward, training).

Each worker builds the same model and inputs from one seed, runs the whole clip unsharded (the reference) and
then sharded over its sequence-parallel group; the outputs must agree, and the ranks' gradients averaged (what
DDP does) must equal the unsharded gradient.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import PARALLEL_RUN, losses_of, resumes_exactly, run_cli, spawn_ranks, weights_of
from stale.parallel.sequence import LAYOUT, split_sizes


def _model_and_inputs(model_kw: dict, frames: int, per_frame_t: bool):
    """The model (float64) and its call's inputs, from one seed on every rank: the Stale Transformer of model_kw,
    or with model_kw["pipeline"] that tiny pipeline's pretrained backbone on latents and caption embeddings."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if "pipeline" in model_kw:
        from stale.models.pretrained import load_backbone

        kw = {k: v for k, v in model_kw.items() if k != "pipeline"}
        model = load_backbone(str(model_kw["pipeline"]), **kw).double()
        c = model.config
        x = torch.randn(2, c.in_channels, frames, c.size, c.size, generator=g, dtype=torch.float64)
        text = torch.randn(2, c.text_len, c.text_dim, generator=g, dtype=torch.float64)
        mask = torch.tensor([[1] * c.text_len, [1] * (c.text_len - 3) + [0] * 3], dtype=torch.bool)
        extra = (text, mask)
    else:
        from stale.models.stale_transformer import build_model

        model = build_model("tiny", **model_kw).double()
        for p in model.parameters():  # adaLN-Zero starts every block as the identity: make the blocks do work
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(2, 3, frames, 8, 8, generator=g, dtype=torch.float64)
        extra = ()
    gt = frames // model.config.patch[0]
    t = torch.rand((2, gt) if per_frame_t else (2,), generator=g, dtype=torch.float64)
    return model, (x, t, torch.tensor([0, 2]), *extra)


def _forward_backward(
    rank: int, world: int, port: int, queue, model_kw: dict, frames: int, per_frame_t: bool, sp_size: int
) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from stale.parallel.sequence import SequenceParallel, sharded

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
        model, args = _model_and_inputs(model_kw, frames, per_frame_t)
        g = torch.Generator().manual_seed(2)
        w_v = torch.randn(args[0].shape, generator=g, dtype=torch.float64)  # a loss that weighs every output element
        w_s = torch.randn(2, model.config.head_outputs, generator=g, dtype=torch.float64)
        seen = []  # the tokens the first block sees (frames x positions, or S): the whole clip, then this rank's share
        model.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(math.prod(inputs[0].shape[1:-1])))

        def run():
            model.zero_grad()
            seen.clear()
            v, s = model(*args)
            ((v * w_v).sum() + (s * w_s).sum()).backward()
            return v.detach(), s.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, seen[0]

        model.train()
        v0, s0, g0, whole = run()
        with sharded(model, SequenceParallel(mesh.get_group("sp"))):
            v1, s1, g1, share = run()
        assert model.sequence_parallel is None  # only inside the block
        for grad in g1.values():  # DDP's average over the ranks
            dist.all_reduce(grad)
            grad /= world
        err_v, err_s = (v1 - v0).abs().max().item(), (s1 - s0).abs().max().item()
        rel = {n: ((g1[n] - g0[n]).abs().max() / g0[n].abs().max().clamp_min(1e-12)).item() for n in g0}
        err_g = max(rel.values())
        queue.put(
            {
                "rank": rank,
                "v": err_v,
                "s": err_s,
                "g": err_g,
                "vmax": v0.abs().max().item(),
                "zero_grads": sum(int(g0[n].abs().max() == 0) for n in g0),
                "seen": (whole, share),
                "worst": max(rel, key=rel.get),
            }
        )
    except Exception:  # report it: the other rank would wait in a collective until the queue times out
        import traceback

        queue.put({"rank": rank, "error": traceback.format_exc()})
        os._exit(1)
    finally:
        dist.destroy_process_group()


def test_split_sizes_and_layouts():
    assert split_sizes(5, 2) == [3, 2] and split_sizes(17, 4) == [5, 4, 4, 4] and split_sizes(2, 2) == [1, 1]
    assert LAYOUT == {"spatial": "frames", "temporal": "positions", "full": "frames"}


CASES = {  # model overrides, frames, per-frame times
    # odd T' = 5 over 2 ranks (3 + 2 frames); N = 2 x 2 + 1 = 5 positions, the joy token last (3 + 2)
    "alternating-odd-frames": (dict(dim=32, heads=4, depth=4, patch=[1, 4, 4], frames=5, size=8), 5, False),
    # per-frame times (frame conditioning: c is sliced per rank in the frames layout), checkpointed blocks
    "alternating-per-frame-t-checkpointed": (
        dict(dim=32, heads=4, depth=3, patch=[1, 4, 4], frames=4, size=8, grad_checkpointing=True),
        4,
        True,
    ),
    # full attention, heads exchanged (Ulysses); 3 heads over 2 ranks: uneven head split, odd T' = 3
    "full-odd-heads": (dict(dim=24, heads=3, depth=2, patch=[1, 4, 4], frames=3, size=8, pattern="full"), 3, False),
    # a temporal block first, then full: every layout change, tubelets over time (pt = 2, T' = 3)
    "mixed-pattern": (
        dict(dim=32, heads=4, depth=4, patch=[2, 4, 4], frames=6, size=8, pattern=["temporal", "full", "spatial"]),
        6,
        True,
    ),
    # model.pos=rope: every mode's rotation, full attention's after the head exchange; odd T' = 3 and
    # N = 5 split unevenly, checkpointed blocks
    "rope-mixed-pattern": (
        dict(
            dim=32,
            heads=4,
            depth=3,
            patch=[1, 4, 4],
            frames=3,
            size=8,
            pos="rope",
            pattern=["temporal", "full", "spatial"],
            grad_checkpointing=True,
        ),
        3,
        False,
    ),
}


@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_equals_one_process(case):
    model_kw, frames, per_frame_t = CASES[case]
    results = spawn_ranks(_forward_backward, model_kw, frames, per_frame_t, 2)
    for r in results:
        assert r["vmax"] > 1e-3 and r["zero_grads"] == 0  # the comparison is not trivially zero
        assert r["v"] < 1e-10 and r["s"] < 1e-10, r  # float64: exact up to summation order
        assert r["g"] < 1e-10, (r["worst"], r["g"])
        assert r["seen"][1] < r["seen"][0]  # the blocks ran on this rank's share


# a pretrained backbone (the tiny Wan and LTX pipelines' transformers, 2 heads): its S = T'H'W' tokens plus the joy
# token split over the ranks, Ulysses through its self-attention; (model fields, latent frames, per-frame times)
BACKBONE_CASES = {
    # T' = 3 of 2 x 2 latents, patch (1, 2, 2): S = 3 + 1 = 4 tokens (2 + 2)
    "wan": (dict(frames=3, size=2, text_len=8), 3, False),
    # T' = 5 of 4 x 4 latents: S = 5 x 4 + 1 = 21 tokens (11 + 10), per-frame times sliced
    # per token, the blocks recomputed in backward through the same exchange
    "wan-odd-per-frame-t-checkpointed": (dict(frames=5, size=4, text_len=8, grad_checkpointing=True), 5, True),
    # LTX-Video (patch 1, RoPE over all heads in float32): T' = 3 of 2 x 2 latents, S = 12 + 1 = 13 tokens (7 + 6)
    "ltx": (dict(frames=3, size=2, text_len=8), 3, False),
    # per-frame times (its per-token time embedding sliced), checkpointed blocks
    "ltx-per-frame-t-checkpointed": (dict(frames=3, size=2, text_len=8, grad_checkpointing=True), 3, True),
}


@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(BACKBONE_CASES))
def test_sequence_parallel_equals_one_process_on_a_pretrained_backbone(case, tmp_path_factory):
    from helpers import tiny_pipeline

    model_kw, frames, per_frame_t = BACKBONE_CASES[case]
    family = case.split("-")[0]
    model_kw = {**model_kw, "pipeline": tiny_pipeline(tmp_path_factory, family)}
    results = spawn_ranks(_forward_backward, model_kw, frames, per_frame_t, 2)
    side = model_kw["size"] // {"wan": 2, "ltx": 1}[family]  # the patch: Wan (1, 2, 2), LTX 1
    tokens = frames * side**2 + 1  # then the joy token
    for r in results:
        assert r["vmax"] > 1e-3 and r["zero_grads"] == 0
        assert r["v"] < 1e-10 and r["s"] < 1e-10, r
        # Wan's cross-attention norm is diffusers' FP32LayerNorm and LTX turns RoPE in float32 (even in a float64
        # model): gradients summed over the ranks' tokens in another order differ at float32 precision (Wan: 1.2e-7,
        # 2.7e-7 measured)
        assert r["g"] < 1e-6, (r["worst"], r["g"])
        assert r["seen"] == (tokens, split_sizes(tokens, 2)[r["rank"]])


# --------------------------------------------------------------------------------------------------------
# Training: `stale-train trainer=ddp_cpu trainer.devices=2 parallel.sequence=2` against one process, and resume.

SP = ["trainer=ddp_cpu", "trainer.devices=2", "parallel.sequence=2"]


def _last_metrics(run: Path) -> dict[str, float]:
    """Each metric's last logged value."""
    with open(run / "logs" / "metrics.csv") as f:
        return {k: float(v) for r in csv.DictReader(f) for k, v in r.items() if v not in ("", None)}


@pytest.mark.ddp
@pytest.mark.timeout(400)
def test_sequence_parallel_training_matches_one_process_and_resumes(tmp_path):
    from stale.checkpoint import read_checkpoint

    window = "callbacks.throughput.window_size=2"  # ThroughputMonitor's rates from the second step on
    run_cli("stale-train", *PARALLEL_RUN, window, f"hydra.run.dir={tmp_path / 'one'}")
    run_cli("stale-train", *PARALLEL_RUN, *SP, window, f"hydra.run.dir={tmp_path / 'sp'}")
    one, sp = losses_of(tmp_path / "one"), losses_of(tmp_path / "sp")
    assert sorted(one) == sorted(sp) == [0, 1, 2, 3]
    assert sp == pytest.approx(one, rel=1e-5, abs=0)  # step 0: same weights, clips, noise; then same gradients
    assert abs(one[3] - one[0]) > 1e-3  # the steps changed the weights
    w1, w2 = (weights_of(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("one", "sp"))
    assert any(k.startswith("ema.") for k in w1) and w1.keys() == w2.keys()
    for k in w1:  # weights and EMA: AdamW's update is at most lr a step, float noise in tiny gradients shows ~1e-6
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4)

    # Counting: the 2 ranks train the one process's clips, so per device they count half its clips and FLOPs (the
    # global figures multiply per-device ones by the world size), and the budget's global FLOPs equal its
    m1, m2 = _last_metrics(tmp_path / "one"), _last_metrics(tmp_path / "sp")
    assert m2["budget/flops"] == pytest.approx(m1["budget/flops"], rel=1e-9) and m1["budget/flops"] > 0
    assert m2["train/samples"] == pytest.approx(m1["train/samples"] / 2)
    per_batch = {
        k: m["train/device/flops_per_sec"] / m["train/device/batches_per_sec"] for k, m in (("one", m1), ("sp", m2))
    }
    assert per_batch["sp"] == pytest.approx(per_batch["one"] / 2, rel=1e-6)

    # resume the sequence-parallel run from step 2: steps 2 and 3 and the final weights as the straight run
    resumes_exactly(tmp_path, "sp", SP, sp, w2)
    ckpt = read_checkpoint(tmp_path / "sp" / "checkpoints" / "last.ckpt")  # stale-export's reader
    assert ckpt.run_config["parallel"]["sequence"] == 2


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(400)
def test_sequence_parallel_composes_with_data_parallelism(tmp_path):
    """4 processes as 2 data-parallel groups x 2 sequence-parallel ranks == plain DDP over 2 processes: the same
    clips per data rank, the same noise, the same averaged gradient; and the loader's checkpoint state is
    gathered from all 4 processes and read back by data rank."""
    short = [*PARALLEL_RUN, "trainer.max_steps=3", "trainer.val_check_interval=3"]
    run_cli("stale-train", *short, "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'dp'}")
    run_cli(
        "stale-train",
        *short,
        "trainer=ddp_cpu",
        "trainer.devices=4",
        "parallel.sequence=2",
        f"hydra.run.dir={tmp_path / 'dpsp'}",
        timeout=400,
    )
    dp, dpsp = losses_of(tmp_path / "dp"), losses_of(tmp_path / "dpsp")
    assert sorted(dp) == [0, 1, 2] and dpsp == pytest.approx(dp, rel=1e-5, abs=0)
    w1, w2 = (weights_of(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("dp", "dpsp"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4)
    loader = torch.load(tmp_path / "dpsp" / "checkpoints" / "last.ckpt", weights_only=True)["loops"]
    assert "'rank': 1" in str(loader) and "'world_size': 2" in str(loader)  # data ranks 0, 1 of 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.sequence=2"], "needs a multi-process trainer"),  # trainer=cpu: one process
        (["parallel.sequence=0", *SP[:2]], "parallel.sequence=0 must be >= 1"),
        (["trainer=ddp_cpu", "trainer.devices=3", "parallel.sequence=2"], "must divide trainer.devices"),
        (["trainer=fsdp_cpu", "trainer.devices=3", "parallel.sequence=2"], "must divide trainer.devices"),  # FSDP2 too
        ([*SP, "data.frames=4", "model.patch=[4,4,4]"], "1 latent frames over 2 ranks"),
        ([*SP, "model.pattern=full", "model.heads=1", "model.dim=32"], "model.heads=1 over the ranks"),
    ],
)
def test_parallel_config_is_checked_before_training(overrides, message, tmp_path, compose_train):
    from stale.train import ConfigError, check_config

    cfg = compose_train(*overrides, f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        check_config(cfg)


# --------------------------------------------------------------------------------------------------------
# stale-bench sections=parallel: the analytic volume, and the section on a tiny clip.


def test_analytic_volume_counts_each_layout_switch_and_the_gather():
    from stale.bench.parallel import analytic
    from stale.models.stale_transformer import StaleConfig

    # T' = 5 -> [3, 2] frames, N = 2 x 2 + 1 = 5 -> [3, 2] positions; rank 0 is the largest
    cfg = StaleConfig(dim=8, heads=2, depth=4, patch=(1, 4, 4), frames=5, size=8)  # S T S T
    one = analytic(cfg, batch=2, sp=1, params=100)
    assert one["comm_bytes"] == 0 and one["predicted_share"] == 1
    two = analytic(cfg, batch=2, sp=2, params=100)
    # forward: S->T sends 3 frames x 2 positions, T->S 3 positions x 2 frames, S->T again; the gather first
    # returns to frames (3 x 2) and sends 3 frames x 5 positions to the other rank: 6 + 6 + 6 + 6 + 15 = 39
    token = 2 * 8 * 4  # batch x dim x fp32
    assert two["comm_bytes"] == 2 * 39 * token + 2 * (1 / 2) * 100 * 4  # backward as much; ring all-reduce
    assert two["predicted_share"] == pytest.approx((3 / 5 + 3 / 5) / 2)
    assert two["tokens_per_rank_max"] == 15


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_parallel_bench_section_runs_and_halves_saved_activations():
    from stale.bench.parallel import run

    out = run(frames=4, size=8, batch_size=1, sequences=(1, 2), steps=1, warmup=0)
    one, two = out["rows"]
    assert one["loss0"] == pytest.approx(two["loss0"], rel=1e-5)  # the same step, sharded
    assert one["comm_mib"] == 0 and two["comm_mib"] > 0
    assert two["saved_mib"] < one["saved_mib"] and two["predicted_ratio"] == pytest.approx(
        (2 / 4 + 3 / 5) / 2
    )  # S: T' 2/4, T: N 3/5
