"""The Lightning system and train(): losses and their logging, optimiser, precision, compile, checkpointing,
EMA, validation determinism, sampling during training, provenance, and config errors before training."""

import copy
import csv
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging

from helpers import TINY_RUN, compose_train
from stale.diffusion import flow
from stale.system.nan_guard import grad_norm
from stale.system.stale_system import StaleSystem, no_decay
from stale.train import build_system, check_config, train

TINY = [*TINY_RUN, "sample.num_videos=2", "sample.steps=2", "budget.flops_per_clip=1e6"]  # tests pass FLOPs explicitly


def make_cfg(out: Path, *overrides: str, logger: str = "csv"):
    return compose_train(*TINY, f"logger={logger}", f"paths.output_dir={out}", *overrides)


def read_csv(out: Path) -> list[dict]:
    with open(out / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> dict[int, float]:
    """step -> value for the rows where `key` was logged."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


class Recorder(L.Callback):
    """Records, per optimiser step, the gradient norm the optimiser actually sees (after clipping) and the lr."""

    def __init__(self):
        self.norms, self.lrs, self.steps = [], [], []

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        # after the step the gradients are still those it used: the clipped ones
        opt.register_step_post_hook(lambda o, args, kwargs: self.norms.append(float(grad_norm(pl_module))))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.steps.append(trainer.global_step)


# --- config errors, before any data or step ---------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1e-3", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("schedule.sharpness=0", "schedule.sharpness"),
        ("schedule.warmup=10", "schedule.warmup"),  # smoke runs 6 steps
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("compile=maybe", "compile"),
        ("sample.steps=0", "sample.steps"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.precision=16-mixed", "trainer.precision"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("budget.max_flops=-5", "budget.max_flops"),
        ("budget.max_cost=10", "budget.cost_per_gpu_hour"),
        ("nan_guard.max_skips=-1", "nan_guard.max_skips"),
        ("sample_every_n_steps=-2", "sample_every_n_steps"),
        ("model.grad_checkpointing=maybe", "model.grad_checkpointing"),
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
    ],
)
def test_bad_config_fails_before_training_naming_the_key(tmp_path, override, key):
    cfg = make_cfg(tmp_path, override)
    # ConfigError (check_config) or the ValueError of the constructor that uses the value (wrapped by Hydra's
    # instantiate when it built the object)
    with pytest.raises((ValueError, InstantiationException), match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_default_configs_pass_the_checks(tmp_path):
    for schedule in ("arctan", "cosine", "wsd", "constant"):
        check_config(make_cfg(tmp_path, f"schedule={schedule}"))


# --- optimiser ------------------------------------------------------------------------------------------
def test_adamw_groups_exclude_norms_biases_embeddings(tmp_path):
    cfg = make_cfg(tmp_path, "optim.weight_decay=0.05")
    system = build_system(cfg)
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    system.trainer = trainer
    opt = system.configure_optimizers()["optimizer"]
    decay, keep = opt.param_groups
    assert decay["weight_decay"] == 0.05 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in system.model.named_parameters()}
    assert all(p.ndim >= 2 and "y_embed" not in names[id(p)] for p in decay["params"])
    kept = {names[id(p)] for p in keep["params"]}
    assert any(n.startswith("y_embed.") for n in kept) and any(n.endswith(".bias") for n in kept)
    assert len(decay["params"]) + len(keep["params"]) == len(list(system.model.parameters()))
    assert opt.defaults.get("fused")  # one kernel on CPU too (tests/test_bench.py: the same update as the loop)
    assert all(no_decay(n, p) == (id(p) in {id(q) for q in keep["params"]}) for n, p in system.model.named_parameters())


def test_clipping_accumulation_and_losses_logged(tmp_path):
    """One run checks: parts logged and combined with the config weights, clipping, accumulation, lr per step."""
    rec = Recorder()
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        "trainer.max_steps=4",
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=0.01",
        "diffusion.hinge_weight=0.3",
        "schedule=cosine",
        "schedule.warmup=1",
        "sample_every_n_steps=0",
        "trainer.val_check_interval=4",
        "optim.lr=1e-3",
    )
    train(cfg, callbacks=[rec])
    rows = read_csv(out)
    loss, vel, hinge = column(rows, "train/loss"), column(rows, "train/velocity"), column(rows, "train/hinge")
    assert len(loss) == 4 and set(loss) == set(vel) == set(hinge)  # logged once per optimiser step
    for s in loss:  # L = L_velocity + hinge_weight * L_hinge (last micro-batch of each step)
        assert loss[s] == pytest.approx(vel[s] + 0.3 * hinge[s], rel=1e-5)
    assert len(rec.norms) == 4  # 8 micro-batches, 4 optimiser steps
    assert max(rec.norms) <= 0.01 * (1 + 1e-4)  # clipped to gradient_clip_val
    grad = column(rows, "train/grad_norm")
    assert len(grad) == 4 and min(grad.values()) > 0.01  # the logged norm is the one before clipping
    assert rec.steps == [0, 1, 1, 2, 2, 3, 3, 4]
    lr = column(rows, "lr/decay")  # the scheduler moved once per optimiser step
    assert lr[0] == lr[1] == pytest.approx(1e-3) and lr[3] < lr[2] < lr[1]  # warmup 1 step, then decay
    for key in (
        "train/hinge_acc",
        "budget/flops",
        "budget/gpu_hours",
        "train/device/flops_per_sec",
        "train/device/samples_per_sec",
        "val/loss",
        "val/loss_t0.50",
    ):
        assert column(rows, key), f"{key} not logged"
    # ThroughputMonitor's FLOP/s comes from the system's flops_per_batch: budget.flops_per_clip=1e6 per clip
    fps, sps = column(rows, "train/device/flops_per_sec"), column(rows, "train/device/samples_per_sec")
    assert set(fps) == set(sps) and all(fps[s] == pytest.approx(1e6 * sps[s], rel=1e-6) for s in fps)
    assert not column(rows, "train/device/mfu")  # a CPU is not in Lightning's device table: no MFU


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_clips_the_fused_optimizers_gradients(tmp_path, precision):
    """Lightning's AMP plugin refuses to clip for a fused optimizer; bf16 has no GradScaler, so stale clips anyway."""
    system = build_system(make_cfg(tmp_path))
    system.trainer = L.Trainer(
        max_steps=10, precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    opt = system.configure_optimizers()["optimizer"]
    for p in system.model.parameters():
        p.grad = torch.full_like(p, 3.0)
    system.configure_gradient_clipping(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in system.model.parameters()]))
    assert abs(float(norm) - 1.0) < 1e-4


def test_bf16_mixed_and_grad_checkpointing_step(tmp_path):
    """bf16-mixed trains on CPU; gradient checkpointing gives the same gradients as storing activations."""
    cfg = make_cfg(tmp_path)
    system = build_system(cfg)
    x = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1])

    def grads(checkpointing: bool, autocast: bool):
        m = copy.deepcopy(system)
        m.model.config.grad_checkpointing = checkpointing
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m.objective(m.model, flow.to_unit_range(x), y, m.null_label)["loss"]
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in m.model.parameters() if p.grad is not None])

    l0, g0 = grads(False, False)
    l1, g1 = grads(True, False)
    assert torch.equal(l0, l1) and torch.allclose(g0, g1, atol=1e-6)
    l2, g2 = grads(False, True)
    assert torch.isfinite(l2) and abs(float(l2 - l0)) < 0.05 * float(l0)  # bf16 is close, not equal

    out = tmp_path / "bf16"
    train(
        make_cfg(
            out,
            "trainer.precision=bf16-mixed",
            "model.grad_checkpointing=true",
            "trainer.max_steps=2",
            "schedule.warmup=1",
            "sample_every_n_steps=0",
        )
    )
    loss = column(read_csv(out), "train/loss")
    assert len(loss) == 2 and all(torch.isfinite(torch.tensor(v)) for v in loss.values())


@pytest.mark.slow  # Dynamo tracing of training, validation and sampling graphs: ~10-30 s on 2 shared cores
def test_compile_trains_and_keeps_parameter_names(tmp_path):
    """compile=... compiles the model in place: same state-dict keys, so checkpoints do not depend on it, and
    the training step's loss with fullgraph=True. aot_eager runs Dynamo and AOTAutograd without code generation (inductor, the default, needs minutes
    of C++ compilation on this CPU)."""
    from torch._dynamo.utils import counters

    out = tmp_path / "compiled"
    cfg = make_cfg(
        out,
        "compile={backend: aot_eager}",
        "trainer.max_steps=2",
        "schedule.warmup=1",
        "sample_every_n_steps=0",
        "trainer.limit_val_batches=0",
        "sample.steps=1",
    )
    counters.clear()
    train(cfg)
    # the training step's loss is one fullgraph graph (a break would raise): both objective branches and the
    # noise draws inside it, and Dynamo counted no break anywhere in the run
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    plain = build_system(make_cfg(tmp_path / "plain"))
    assert set(ckpt["state_dict"]) == set(plain.state_dict())
    assert len(column(read_csv(out), "train/loss")) == 2


# --- EMA, validation, sampling, provenance ---------------------------------------------------------------
def test_validation_is_deterministic_and_uses_ema(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out, "trainer.max_steps=3", "sample_every_n_steps=0", "callbacks.ema.decay=0.5")
    train(cfg)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(ckpt["current_model_state"])  # EMA in state_dict, live weights beside
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"])
    logged = column(read_csv(out), "val/loss")[2]  # validation after step 3 (logged at step index 2)

    system, datamodule = build_system(cfg), instantiate(cfg.data)

    def validate(weights: dict, rng_seed: int) -> float:
        system.load_state_dict(weights)
        torch.manual_seed(rng_seed)  # training RNG state must not matter
        trainer = L.Trainer(logger=False, enable_progress_bar=False, limit_val_batches=1, enable_model_summary=False)
        return trainer.validate(system, datamodule=datamodule, verbose=False)[0]["val/loss"]

    ema_a, ema_b = validate(ckpt["state_dict"], 1), validate(ckpt["state_dict"], 2)
    live = validate(ckpt["current_model_state"], 3)
    assert ema_a == ema_b  # bit-identical whatever the global RNG
    assert ema_a == pytest.approx(logged, rel=1e-6)  # what fit logged was the EMA model's loss
    assert live != ema_a


def test_samples_during_training_use_ema_and_go_to_wandb(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        "trainer.max_steps=4",
        "sample_every_n_steps=2",
        "callbacks.ema.decay=0.5",
        "trainer.val_check_interval=4",
        logger="wandb",
    )

    class Check(L.Callback):
        seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            from stale.system.training_samples import ema_module

            ema = ema_module(trainer, pl_module)
            ema_cb = next(c for c in trainer.callbacks if isinstance(c, WeightAveraging))
            self.seen.append(ema is ema_cb._average_model.module and ema is not pl_module)

    train(cfg, callbacks=[Check()])
    assert Check.seen and all(Check.seen)
    step2 = sorted((out / "samples" / "step0000002").glob("sample_*.mp4"))
    assert len(step2) == 2 and all(p.stat().st_size > 0 for p in step2)  # debug=smoke: 2 videos mid-run
    assert not (out / "samples" / "step0000004").exists()  # the final step is sampled by train() itself
    assert len(list((out / "samples").glob("sample_*.mp4"))) == 2
    videos = list((out / "wandb").glob("offline-run-*/files/media/videos/samples_*.mp4"))
    assert len(videos) == 2 + 2  # wandb.Video from the mp4 files: step 2 and the end


def test_every_checkpoint_has_provenance(tmp_path):
    out = tmp_path / "run"
    train(make_cfg(out, "trainer.max_steps=3", "sample_every_n_steps=0", "optim.lr=0.002"))
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} == {"step0000003.ckpt", "last.ckpt"}
    for path in ckpts:
        prov = torch.load(path, weights_only=True)["provenance"]
        assert prov["config"]["optim"]["lr"] == 0.002 and prov["config"]["trainer"]["max_steps"] == 3
        assert len(prov["git"]["commit"]) == 40 and isinstance(prov["git"]["dirty"], bool)
        assert prov["packages"]["torch"] == torch.__version__
        assert prov["packages"]["lightning"] == L.__version__
        train_shards = prov["shards"]["train"]
        assert train_shards and all(Path(s["url"]).is_file() and s["bytes"] > 0 for s in train_shards)
        assert prov["shards"]["val"] and prov["world_size"] == 1


def test_system_rejects_bad_lr():
    from stale.diffusion.objective import StaleObjective
    from stale.models import build_model

    with pytest.raises(ValueError, match="optim.lr"):
        StaleSystem(
            build_model("tiny", dim=32, depth=1, heads=2),
            StaleObjective(),
            optimizer=functools.partial(torch.optim.AdamW, lr=-1.0),
        )


def test_joy_token_survives_ema_checkpoint_and_export_exactly(tmp_path):
    """The joy token is fixed: after a real run it equals joy_vector(dim, seed) in the EMA weights, in last.ckpt
    (EMA and raw) and in the export; weights whose token differs are refused on load, naming the token."""
    from safetensors.torch import load_file

    from stale.checkpoint import CheckpointError, read_checkpoint
    from stale.export import export_checkpoint
    from stale.models.stale_transformer import JoyTokenMismatchError, joy_vector
    from stale.system.training_samples import ema_module

    class Grab(L.Callback):
        token = None

        def on_train_end(self, trainer, pl_module):  # before EMAWeightAveraging copies the average back
            Grab.token = ema_module(trainer, pl_module).model.joy_token.detach().cpu().clone()

    out = tmp_path / "run"
    train(
        make_cfg(
            out,
            "trainer.max_steps=4",
            "sample_every_n_steps=0",
            "callbacks.ema.decay=0.9",
            "optim.lr=0.01",
            logger="none",
        ),
        callbacks=[Grab()],
    )
    want = joy_vector(32, 0x1F602)  # TINY's dim, StaleConfig's default joy_seed
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(Grab.token, want)
    assert torch.equal(ckpt["state_dict"]["model.joy_token"], want)  # the EMA weights
    assert torch.equal(ckpt["current_model_state"]["model.joy_token"], want)
    export_checkpoint(out / "checkpoints" / "last.ckpt", tmp_path / "export", check=False)
    assert torch.equal(load_file(tmp_path / "export" / "model.safetensors")["joy_token"], want)

    model = read_checkpoint(out / "checkpoints" / "last.ckpt").build_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["joy_token"][3] += 1e-6
    with pytest.raises(JoyTokenMismatchError, match="joy_token .* is not joy_vector\\(dim=32"):
        model.load_state_dict(state)
    assert torch.equal(model.joy_token, want)  # refused before anything was copied
    ckpt["state_dict"]["model.joy_token"] = ckpt["state_dict"]["model.joy_token"] * 1.0001
    torch.save(ckpt, tmp_path / "drifted.ckpt")
    with pytest.raises(CheckpointError, match="joy_token"):
        read_checkpoint(tmp_path / "drifted.ckpt").build_model()
