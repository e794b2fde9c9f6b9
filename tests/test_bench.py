"""Issue 11: stale-bench. The CLI runs every CPU section and writes the documented JSON; the parts behind the
numbers (the plain loop equals the Lightning step, per-clip FLOPs, the gpu path, section loading) are real."""

import copy
import json
import os
import sys

import pytest
import torch

from helpers import run_cli
from stale.bench import SectionError, build, call_with_supported, gpu, parse_sections, random_batches, report
from stale.cli.bench import listify_sections
from stale.system.schedules import Constant, Cosine

QUICK = [
    "sections=train,sampler,memory,gpu",
    "threads=1",
    "train.batch_size=2",
    "train.steps=3",
    "train.warmup=1",
    "train.rounds=2",
    "train.max_rounds=2",
    "train.variants=[lightning,no_log]",
    "train.micro=null",
    "sampler.batch_size=1",
    "sampler.steps=3",
    "sampler.rounds=2",
    "memory.sizes=[tiny]",
    "memory.batches=[1,3]",
]


def test_cli_runs_every_cpu_section_and_writes_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("stale-bench", *QUICK, f"out={out}", timeout=300)
    doc = json.loads(out.read_text())
    assert set(doc) == {"machine", "command", "config", "sections"}
    assert {"device", "device_name", "torch", "lightning", "cpu_count", "loadavg_1_5_15"} <= set(doc["machine"])
    assert doc["command"].startswith("stale-bench sections=")
    assert list(doc["sections"]) == ["train", "sampler", "memory", "gpu"]
    for name, sec in doc["sections"].items():
        assert {"rows", "summary", "notes", "wall_s"} <= set(sec), name
        assert sec["rows"], name
        assert f"== {name} " in proc.stdout  # the table is printed too

    train = doc["sections"]["train"]
    assert [r["loop"] for r in train["rows"]] == ["plain", "lightning", "no_log"]
    for r in train["rows"][1:]:
        assert r["samples"] == 2 and r["median_ms"] > 0 and isinstance(r["overhead"], float)  # 2 fits
    assert train["summary"]["compared"] == "lightning vs plain"
    assert train["summary"]["framework_overhead"] == train["rows"][1]["overhead_paired"]
    assert train["summary"]["rounds"] == 2 and train["rows"][1]["overhead_error"] is None  # 2 rounds: too few to say
    prof = train["profile"]["lightning"]
    assert (
        prof["self_ms_per_step"]["lightning"] > 0 and "lightning" not in train["profile"]["plain"]["self_ms_per_step"]
    )

    rows = {r["sampler"]: r for r in doc["sections"]["sampler"]["rows"]}
    assert rows["euler"]["nfe"] == 3 and rows["euler"]["forward_ms"] > 0
    assert rows["heun"]["nfe"] >= 3
    assert rows["StaleSystem.sample(euler)"]["status"] == "measured"

    # RSS-based sizes are the benchmark's to report (per_clip_vs_no_ckpt), not a test's to bound
    mem = {r["grad_checkpointing"]: r for r in doc["sections"]["memory"]["rows"]}
    assert set(mem) == {False, True} and isinstance(mem[True]["per_clip_vs_no_ckpt"], float)

    assert all(r["mfu"] == "not measured (no CUDA)" for r in doc["sections"]["gpu"]["rows"])
    assert [r["size"] for r in doc["sections"]["gpu"]["rows"]] == ["s", "b", "l"]


def fit_losses(system, batches, clip: float) -> list[float]:
    """trainer.fit of `system` on `batches` (max_steps = their number); the loss training_step returned at each step."""
    import lightning as L

    from stale.bench.step import InMemory

    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        max_epochs=1,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[Losses()],
    )
    trainer.fit(system, train_dataloaders=InMemory(batches))
    return losses


def test_train_step_lands_where_trainer_fit_lands():
    """k steps of stale.bench.step.TrainStep and trainer.fit from the same init on the same batches: the same losses
    at every step and the same weights after. The system has what a wrong optimiser or loss would get wrong: weight
    decay on two parameter groups, a warmup-cosine schedule, the hinge branch and DoG, gradient clipping; the same
    run with another schedule or without DoG lands elsewhere (the comparison can fail)."""
    from stale.bench.step import TrainStep, make_system
    from stale.diffusion.objective import StaleObjective

    torch.manual_seed(0)  # an init whose first step moves every block (see the hinge note in the test below)
    base = build("debug", 4, 8)
    batches = random_batches(4, 2, 4, 8, seed=1)
    cosine = Cosine(warmup=2)

    def system(schedule=cosine, dog_weight=0.1):
        return make_system(
            copy.deepcopy(base),
            lr=3e-3,
            objective=StaleObjective(dog_weight=dog_weight),
            schedule=schedule,
            weight_decay=0.05,
            seed=5,
        )

    def plain(sys_, clip=0.02):  # tight enough to clip these gradients (at 0.5 no-clipping went unnoticed)
        step = TrainStep(sys_, "cpu", clip=clip, steps=len(batches))
        return [float(step(b)) for b in batches], sys_.model

    lit = system()
    lit_losses = fit_losses(lit, batches, clip=0.02)
    losses, model = plain(system())
    assert len(lit_losses) == len(batches)
    assert losses == pytest.approx(lit_losses, rel=1e-6, abs=1e-7)
    for (name, a), b, c in zip(lit.model.named_parameters(), model.parameters(), base.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert sum(not torch.equal(a, c) for a, c in zip(model.parameters(), base.parameters())) > 10  # it trained

    def max_weight_gap(other):
        return max((a - b).abs().max().item() for a, b in zip(lit.model.parameters(), other.parameters()))

    assert max_weight_gap(plain(system(schedule=Constant(warmup=0)))[1]) > 1e-4  # another optimiser
    other_losses, _ = plain(system(dog_weight=0.0))
    assert abs(other_losses[0] - lit_losses[0]) > 1e-4  # another loss


def test_step_timing_pairs_every_lightning_step_with_a_plain_step():
    from stale.bench import train

    res = train.run(
        frames=2,
        size=8,
        batch_size=1,
        steps=3,
        warmup=1,
        rounds=1,
        max_rounds=1,
        variants=["no_log", "barebones"],
        timing="step",
        profile=False,
        micro=None,
    )
    assert [r["loop"] for r in res["rows"]] == ["plain", "no_log", "barebones"]
    assert res["rows"][0]["samples"] == 2 * 3  # plain steps beside both variants' fits
    for r in res["rows"][1:]:
        assert r["samples"] == 3 and isinstance(r["overhead_paired"], float)  # a timing: reported, not bounded
    assert res["setup"]["timing"] == "step"


def test_gpu_path_runs_on_cpu_with_a_tiny_model():
    res = gpu.run(
        sizes=["tiny"],
        frames=4,
        resolutions=[8, 16],
        batch_size=4,
        dtype="float32",
        compile=False,
        sdpa="flash",
        steps=1,
        warmup=1,
        flops="counted",
        measure_on_cpu=True,
        device="cpu",
    )
    (row,) = res["rows"]
    assert row["clip"] == [4, 16, 16]  # the largest resolution that fits is chosen
    assert row["tokens_per_clip"] == 4 * 4 * 4 and row["tokens_per_s"] > 0 and row["step_ms"] > 0
    assert row["flops_source"].startswith("counted") and row["mfu"].startswith("n/a")
    assert res["summary"]["meets_target"] is False  # no B row measured


def test_counted_flops_are_per_clip():
    """FlopCounterMode over a real step, divided by the batch: the same per clip at batch 4 and 8."""
    model = build("tiny", 4, 16)
    per_clip = [gpu.count_flops_per_clip(model, random_batches(1, b, 4, 16)[0], "cpu") for b in (4, 8)]
    assert per_clip[0] == pytest.approx(per_clip[1], rel=1e-6)
    # forward + backward is about 3x the forward's 2 x (weights per token) x tokens; the hinge branch adds 1/4
    tokens = 4 * (16 // 4) ** 2 + 4  # + the joy token of each frame
    per_token = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("blocks") and "adaLN" not in n and p.ndim == 2
    )
    assert 0.8 < per_clip[0] / (6 * per_token * tokens * 1.25) < 1.6


def test_analytic_flops_agree_with_the_counter():
    """stale.models.flops (another part of stale) x (1 + hinge share) against FlopCounterMode."""
    model = build("tiny", 4, 16)
    batch = random_batches(1, 8, 4, 16)[0]
    analytic, source = gpu.flops_per_clip(model, 4, 16, batch, "cpu", "32-true", "analytic")
    counted, _ = gpu.flops_per_clip(model, 4, 16, batch, "cpu", "32-true", "counted")
    assert source.startswith("analytic") and analytic == pytest.approx(counted, rel=0.03)


def test_peak_table_prefers_specific_names():
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu.peak_tflops("NVIDIA GeForce GTX 1080") is None


def test_sections_are_named_in_errors(tmp_path):
    assert parse_sections("train, sampler,train") == ["train", "sampler"]
    with pytest.raises(SectionError, match="nope"):
        parse_sections("train,nope")
    proc = run_cli("stale-bench", "sections=train,nope", f"out={tmp_path / 'x.json'}", check=False, timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_command_line_and_foreign_section_results():
    assert listify_sections(["sections=train,data", "out=x.json"]) == ["sections=[train,data]", "out=x.json"]
    assert listify_sections(["sections=[a,b]", "sections=train"]) == ["sections=[a,b]", "sections=train"]
    # attention returns a list of rows, data one dict: both become {"rows": [...]}
    assert report.normalise([{"T": 8}])["rows"] == [{"T": 8}]
    data = report.normalise({"clips_per_s": 3.0, "per_worker": [1.0, 2.0]})
    assert data["rows"] == [{"clips_per_s": 3.0}] and data["details"] == {"per_worker": [1.0, 2.0]}
    assert call_with_supported(lambda frames=1: frames, {"frames": 2}, device="cpu") == 2
    assert call_with_supported(lambda device="x", **kw: device, {}, device="cpu") == "cpu"
    assert json.loads(json.dumps(report._jsonable({"a": float("nan"), "b": (1, 2)}))) == {"a": None, "b": [1, 2]}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_median_error_is_the_robust_standard_error_of_the_median():
    from stale.bench.train import median_error

    ratios = [1.00, 1.02, 1.04, 1.06, 1.08]  # exclusive quartiles 1.01 and 1.07: IQR 0.06, robust sigma 0.06 / 1.349
    assert abs(median_error(ratios) - 1.2533 * 0.06 / 1.349 / 5**0.5) < 1e-9
    assert median_error(ratios[:3]) == float("inf")  # too few rounds to say


def test_gpu_check_script_says_what_it_would_measure_on_cpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    proc = subprocess.run(
        ["bash", str(script), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "MFU and tokens/s of B" in proc.stdout and "the longest clip" in proc.stdout
    assert "temporal attention on each SDPA backend" in proc.stdout  # the last part: the whole list is printed
    assert "no CUDA device here; nothing measured" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def test_cpu_section_times_fused_against_loop_adamw():
    from stale.bench import cpu

    res = cpu.run(
        frames=2, size=8, batch_size=1, steps=2, rounds=2, threads=(1,), compile=(False,), fused=(True, False)
    )
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"1 thread, eager, fused AdamW", "1 thread, eager, loop AdamW"}
    assert (
        res["summary"]["default"] == "1 thread, eager, fused AdamW"
        and rows[res["summary"]["default"]]["speed_vs_default"] == 1.0
    )
    assert all(r["step_ms"] > 0 for r in rows.values())


def test_fused_adamw_of_the_system_updates_as_the_per_tensor_loop_does():
    """StaleSystem uses AdamW's fused kernel on CPU too (faster, BENCHMARKS.md): it must be the same update."""
    from stale.bench.step import make_system

    torch.manual_seed(0)
    base = build("tiny", 2, 8)
    system = make_system(copy.deepcopy(base), 1e-3)
    system.schedule_steps = 10  # no Trainer here to read max_steps from
    opt = system.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    loop = copy.deepcopy(base)
    ref = torch.optim.AdamW(
        loop.parameters(), lr=1e-3, betas=system.optimizer.keywords["betas"], weight_decay=0.0, foreach=False
    )
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(system.model.parameters(), loop.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for (name, p), q in zip(system.model.named_parameters(), loop.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(next(system.model.parameters()), next(base.parameters()))


def test_longest_clip_search_finds_the_boundary_in_few_tries():
    from stale.bench.memory import largest_size_that_fits, longest_clip

    for boundary, step in [(27, 1), (24, 4), (4, 4), (142, 1), (1000, 8)]:
        tried = []

        def fits(n, boundary=boundary):
            tried.append(n)
            return n <= boundary

        got = largest_size_that_fits(fits, max(4, step), 1024, step)
        assert got == boundary // step * step and got % step == 0
        assert len(tried) <= 2 * 10 + 2  # doubling then bisecting, not a scan
    assert largest_size_that_fits(lambda n: False, 4, 64, 4) == 0
    assert largest_size_that_fits(lambda n: True, 4, 64, 4) == 64  # capped by the limit
    with pytest.raises(ValueError, match="start=6"):
        largest_size_that_fits(lambda n: True, 6, 64, 4)
    assert longest_clip("b", device="cpu")["longest_frames"] is None  # no out-of-memory to find on a CPU


def test_gpu_rows_render_and_replace_only_their_block(tmp_path):
    import json

    from stale.bench import gpu_rows, machine_info

    res = gpu.run(
        sizes=["tiny"],
        frames=4,
        resolutions=[16],
        batch_size=2,
        dtype="float32",
        compile=False,
        sdpa="flash",
        steps=1,
        warmup=1,
        flops="analytic",
        peak_tflops=1.0,
        measure_on_cpu=True,
        device="cpu",
    )
    (row,) = res["rows"]
    (tmp_path / "gpu_b.json").write_text(json.dumps({"machine": machine_info("cpu"), "sections": {"gpu": res}}))
    text = gpu_rows.render(tmp_path)
    assert f"{row['step_ms']:.1f} ms" in text and f"**{row['mfu']:.1%}**" in text
    for missing in (
        "| l | | | | | | not measured",
        "| s | | | | | | not measured",
        "Longest clip B trains: not measured",
        "Data wait at 256 px (data section): not measured",
    ):  # parts without JSON never borrow numbers
        assert missing in text
    assert "FSDP2 on the GPU (trainer=fsdp): not measured" in text
    (tmp_path / "fsdp.json").write_text(
        json.dumps(
            {  # as scripts/gpu_check.sh's fsdp part writes it (steps as keys)
                "one": {"0": 1.0, "1": 0.5},
                "fsdp": {"0": 1.0, "1": 0.51},
                "resumed": {"1": 0.51},
                "export": ["config.json"],
            }
        )
    )
    fsdp_line = next(line for line in gpu_rows.render(tmp_path).splitlines() if "FSDP2" in line)
    assert "within 2.00% at every step (2 compared)" in fsdp_line and "1 steps within 0.00e+00" in fsdp_line
    md = tmp_path / "BENCH.md"
    md.write_text("# Title\n\nbefore\n")
    gpu_rows.write(tmp_path, md)
    first = md.read_text()
    assert first.startswith("# Title\n\nbefore\n") and first.count(gpu_rows.BEGIN) == 1
    md.write_text(first + "\nafter\n")
    gpu_rows.write(tmp_path, md)  # a second write replaces the block, keeps the text around it
    assert md.read_text() == first + "\nafter\n"
    md.write_text("only " + gpu_rows.BEGIN)
    with pytest.raises(ValueError, match="only one of the markers"):
        gpu_rows.write(tmp_path, md)


def test_peer_section_times_stale_against_diffusers_latte():
    """Issue 21: both models train on the same batch at matched size; the row pair carries params and the ratio."""
    from stale.bench import peer

    res = peer.run(
        cases=({"model": "tiny", "frames": 2, "size": 8, "batch_size": 1},),
        rounds=2,
        warmup=1,
        threads=1,
        variants={"single": {"adaln": "single"}},
    )
    stale_row, latte_row, single_row = res["rows"]
    assert single_row["model"] == "stale single" and single_row["params"] < stale_row["params"]
    assert single_row["stale_over_latte"] > 0 and "stale_over_latte" not in latte_row
    assert (stale_row["model"], latte_row["model"]) == ("stale", "latte")
    assert stale_row["case"] == latte_row["case"] == "tiny 2x8x8 b1"
    assert stale_row["step_ms"] > 0 and latte_row["step_ms"] > 0 and stale_row["stale_over_latte"] > 0
    assert res["summary"] == {"tiny 2x8x8 b1": stale_row["stale_over_latte"]}
    # matched: Latte's pairs of blocks at stale's width; parameters counted from the built modules
    latte = peer.latte_model(128, 4, 4, 4, 3, 2, 8)
    assert len(latte.transformer_blocks) == 2 and latte.transformer_blocks[0].attn2 is None
    assert latte_row["params"] == sum(p.numel() for p in latte.parameters())
    assert stale_row["params"] == sum(p.numel() for p in build("tiny", 2, 8).parameters())


def test_peer_step_trains_both_models():
    """The timed step is a real training step for both: each model's loss on the same batch and noise goes down."""
    from stale.bench import peer

    torch.manual_seed(0)
    stale = build("tiny", 2, 8, prediction="velocity")
    models = {"stale": stale, "latte": peer.matched_latte(stale, 2, seed=0)}
    batch = random_batches(1, 2, 2, 8)[0]
    for name, model in models.items():
        step = peer.shared_step(model, seed=0)
        step.optimizer.param_groups[0]["lr"] = step.optimizer.param_groups[1]["lr"] = 3e-3

        def loss():
            with torch.no_grad():
                return step.system.batch_loss(batch, seed=123)["loss"].item()  # fixed noise and times

        before = loss()
        for _ in range(5):
            step(batch)
        assert loss() < before, name
    assert "hinge" not in step.system.batch_loss(batch, seed=0)  # the step both share: no hinge branch


def test_temporal_kernels_time_the_step_per_backend_on_cpu():
    """gpu.temporal_kernels (once scripts/gpu_temporal_kernels.py): each backend a row; one the CPU lacks, an error."""
    from stale.models import stale_transformer

    before = list(stale_transformer.TEMPORAL_SDPA)
    res = gpu.temporal_kernels(
        "tiny",
        frames=4,
        resolution=8,
        batch_size=1,
        device="cpu",
        dtype="float32",
        backends=("math", "efficient"),
        steps=1,
        rounds=1,
    )
    math, efficient = res["rows"]
    assert math["temporal"] == "math" and math["step_ms"] > 0 and math["vs_math"] == 1.0
    assert efficient["step_ms"] is None and "error" in efficient  # no memory-efficient kernel on a CPU
    assert stale_transformer.TEMPORAL_SDPA == before  # the model's kernel list is given back


def test_data_section_measures_worker_cpu_past_the_prefetched_batches():
    """The data section on an H100 divided by zero: 8 workers each held PREFETCH decoded batches, so the 6 measured
    batches came off the queue and the workers spent no CPU in the window. It now measures past them."""
    import math

    from stale.bench import data

    res = data.run(kinds=("synthetic",), workers=(2,), clips=16, batch_size=2, batches=1, repeats=1)
    (row,) = res["rows"]
    assert row["workers"] == 2 and row["loader_clips_per_s_per_worker"] > 0
    assert row["batches_measured"] >= 2 * 2 * 4  # twice what 2 workers with prefetch_factor 4 hold ready
    assert math.isfinite(row["loader_clips_per_cpu_s"]) and row["loader_clips_per_cpu_s"] > 0


def load_experiment(name: str):
    """A script of experiments/ (not installed) as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_decomposition_drops_the_joy_token_outside_the_model():
    """experiments/peer_decomposition.py's no-joy variant (once a .patch of the model): the blocks see the H'W'
    patches of a frame and no joy token, the velocity no longer depends on it, and the run gives every row."""
    exp = load_experiment("peer_decomposition")
    torch.manual_seed(0)
    plain = build("tiny", 2, 8, prediction="velocity")
    for p in plain.parameters():  # adaLN-Zero starts every block as the identity: give the blocks something to do
        torch.nn.init.normal_(p, std=0.05)
    nojoy = exp.without_joy(copy.deepcopy(plain))
    seen = []
    nojoy.blocks[1].block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[2]))
    x, t, y = torch.rand(2, 3, 2, 8, 8) * 2 - 1, torch.rand(2), torch.tensor([0, 1])

    def velocities():
        with torch.no_grad():
            return plain(x, t, y)[0], nojoy(x, t, y)[0]

    with_joy, without = velocities()
    assert seen == [(8 // 4) ** 2]  # the patches of a frame, no joy token
    assert with_joy.shape == without.shape and not torch.allclose(with_joy, without)
    for model in (plain, nojoy):
        model.joy_token.add_(1.0)  # another joy token: it moves the model's velocity, not the variant's
    moved, unmoved = velocities()
    assert not torch.allclose(moved, with_joy) and torch.equal(unmoved, without)

    exp.CASES["toy"] = ("tiny", 2, 8, 1, {})
    out = exp.decomposition("toy", rounds=2, warmup=0)
    assert [r["model"] for r in out["rows"]] == ["stale", "no_qk", "no_joy", "no_joy_no_qk", "latte"]
    assert all(r["stale_over_latte"] > 0 for r in out["rows"][:4])


def test_finetune_experiment_runs_at_a_toy_budget(tmp_path):
    """experiments/finetune.py (docs/finetune.md's tables) trains through the measured step and scores every arm."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "finetune.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--steps",
            "2",
            "--base-steps",
            "2",
            "--ft-steps",
            "2",
            "--test-clips",
            "4",
            "--sample-steps",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results_all.json").read_text())
    assert {"context", "no_context + given frames", "real clips (reference)"} <= set(res["continuation"])
    assert {"base (no fine-tuning)", "full", "lora r=8"} <= set(res["lora"])
    assert res["lora"]["lora r=8"]["trainable_params"] < res["lora"]["full"]["trainable_params"]
    assert (tmp_path / "lora_sheet.png").stat().st_size > 0
