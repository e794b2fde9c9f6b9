"""FSDP2 (trainer=fsdp, fsdp_cpu): per-block fully_shard, the sharded EMA, checkpoints, resume.

The fast test spawns 2 gloo processes and trains the tiny model sharded (stale.parallel.fsdp) next to an unsharded
copy with torch's AveragedModel: gradients, clipped gradient norm, weights, EMA, the EMA's checkpoint round trip and
the gathered copy must agree, both as 2 data-parallel ranks and as 1 data-parallel x 2 sequence-parallel ranks.
The slow tests run stale-train itself: trainer=fsdp_cpu against trainer=ddp_cpu, resume, stale-export, and
2 data-parallel x 2 sequence-parallel groups over 4 processes.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.distributed.tensor import DTensor

from helpers import PARALLEL_RUN, losses_of, resumes_exactly, run_cli, spawn_ranks, weights_of
from stale.parallel.fsdp import FULL, ShardedEMA, gathered_copy, shard_model
from stale.system.nan_guard import grad_norm  # imported before the workers fork: Lightning's import hangs after it


def _train_sharded_and_plain(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from stale.models.stale_transformer import build_model
    from stale.parallel.sequence import SequenceParallel, sharded

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sp_group = SequenceParallel(init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "sp")).get_group("sp"))
        out = {"rank": rank}
        for case in ("dp", "sp"):  # 2 ranks with 2 clips each | both ranks all 4 clips, each half of every clip
            torch.manual_seed(0)
            model = build_model(
                "tiny", dim=32, heads=4, depth=3, patch=[1, 4, 4], frames=4, size=8, grad_checkpointing=True
            ).double()
            for p in model.parameters():  # adaLN-Zero starts every block as the identity: make the blocks do work
                torch.nn.init.normal_(p, std=0.2)
            plain = copy.deepcopy(model)
            shard_model(model, "cpu", world, "32-true")
            averaged = AveragedModel(plain, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=False)
            ema = ShardedEMA(get_ema_multi_avg_fn(0.5))
            ema.track(model)
            opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-2)
            opt_s = torch.optim.AdamW(model.parameters(), lr=1e-2)
            err = {"grad": 0.0, "norm": 0.0}
            for step in range(3):
                g = torch.Generator().manual_seed(step)
                x = torch.randn(4, 3, 4, 8, 8, generator=g, dtype=torch.float64)
                t, y = torch.rand(4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0])

                def loss(m, x, t, y):
                    v, s = m(x, t, y)
                    return v.pow(2).mean() + s.pow(2).mean()

                loss(plain, x, t, y).backward()
                if case == "dp":  # the mean over each rank's 2 clips; FSDP2 averages the 2 ranks' gradients
                    loss(model, x.chunk(world)[rank], t.chunk(world)[rank], y.chunk(world)[rank]).backward()
                else:
                    with sharded(model, sp_group):
                        loss(model, x, t, y).backward()
                norm_p, norm_s = grad_norm(plain), grad_norm(model)  # the NaN guard's norm, before clipping
                err["norm"] = max(err["norm"], abs(norm_s - norm_p).item())
                for n, p in model.named_parameters():
                    err["grad"] = max(
                        err["grad"], (p.grad.full_tensor() - plain.get_parameter(n).grad).abs().max().item()
                    )
                for m in (plain, model):  # clipping engages (norms are ~1-10): the sharded norm must be the whole one
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
                opt_p.step(), opt_s.step(), opt_p.zero_grad(), opt_s.zero_grad()
                averaged.update_parameters(plain)
                ema.update(model)
                with torch.no_grad():  # validation-like forward without backward: FSDP2 keeps the root gathered
                    model.eval(), plain.eval()
                    loss(model, x, t, y), loss(plain, x, t, y)
                    model.train(), plain.train()
            weights = get_model_state_dict(model, options=FULL)
            average = ema.full_state_dict(model)
            if rank == 0:
                reference = averaged.module.state_dict()
                err["weights"] = max((weights[k] - v).abs().max().item() for k, v in plain.state_dict().items())
                err["ema"] = max((average[k] - v).abs().max().item() for k, v in reference.items())
                err["ema_moved"] = max((v - plain.state_dict()[k]).abs().max().item() for k, v in reference.items())
                out["keys"] = sorted(average) == sorted(reference)
            # the checkpoint round trip: a full state dict on every rank becomes the shards again
            full = [averaged.module.state_dict()]
            dist.broadcast_object_list(full, src=0)
            ema.track(model)  # forget the average
            ema.load_full_state_dict(model, full[0], n_averaged=3)
            assert not any(isinstance(v, DTensor) for v in full[0].values())  # torch's loader leaves it alone
            again = ema.full_state_dict(model)
            copy_ = gathered_copy(model)  # rank 0: a plain model with the live weights
            with ema.swapped(model):
                ema_copy = gathered_copy(model)
            if rank == 0:
                err["reload"] = max((again[k] - v).abs().max().item() for k, v in full[0].items())
                g = torch.Generator().manual_seed(9)
                x, t = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
                y = torch.tensor([1, 2])
                copy_.eval(), plain.eval(), ema_copy.eval()
                with torch.no_grad():
                    err["copy"] = (copy_(x, t, y)[0] - plain(x, t, y)[0]).abs().max().item()
                    err["ema_copy"] = (ema_copy(x, t, y)[0] - averaged.module(x, t, y)[0]).abs().max().item()
                out["copy_plain"] = not any(type(p).__name__ == "DTensor" for p in copy_.parameters())
            out[case] = err
        queue.put(out)
    except Exception:  # report it: the other rank would wait in a collective until the queue times out
        import traceback

        queue.put({"rank": rank, "error": traceback.format_exc()})
        queue.close()
        queue.join_thread()  # the message must leave before os._exit ends the process
        os._exit(1)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_fsdp2_shards_train_and_average_like_one_process():
    rank0 = spawn_ranks(_train_sharded_and_plain)[0]
    assert rank0["keys"] and rank0["copy_plain"]
    for case in ("dp", "sp"):
        err = rank0[case]
        assert err["ema_moved"] > 1e-3, err  # the average is not the weights: decay 0.5 over 3 steps
        for key in ("grad", "norm", "weights", "ema", "reload", "copy", "ema_copy"):  # float64
            assert err[key] < 1e-10, (case, key, err)


# --------------------------------------------------------------------------------------------------------
# stale-train trainer=fsdp_cpu, end to end (each run ~30 s of two processes on this CPU: slow).

FSDP = ["trainer=fsdp_cpu", "trainer.devices=2"]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_fsdp2_training_matches_ddp_resumes_exactly_and_exports(tmp_path):
    """trainer=fsdp_cpu == trainer=ddp_cpu (losses, weights, EMA), with periodic samples from the gathered EMA;
    resumed from its step-2 checkpoint it repeats steps 2-3 and its weights and EMA exactly; stale-export and the
    one checkpoint reader read its file."""
    from stale.checkpoint import read_checkpoint

    run_cli("stale-train", *PARALLEL_RUN, "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}")
    run_cli("stale-train", *PARALLEL_RUN, *FSDP, "sample_every_n_steps=2", f"hydra.run.dir={tmp_path / 'fsdp'}")
    ddp, fsdp = losses_of(tmp_path / "ddp"), losses_of(tmp_path / "fsdp")
    assert sorted(fsdp) == [0, 1, 2, 3] and fsdp == pytest.approx(ddp, rel=1e-5, abs=0)
    assert abs(ddp[3] - ddp[0]) > 1e-3
    w1, w2 = (weights_of(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("ddp", "fsdp"))
    assert any(k.startswith("ema.") for k in w1) and w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
    assert (tmp_path / "fsdp" / "samples" / "contact_sheet.png").is_file()  # rank 0 sampled after fit
    assert list((tmp_path / "fsdp" / "samples").glob("step0000002/*.mp4"))  # and from the gathered EMA at step 2

    resumes_exactly(tmp_path, "fsdp", FSDP, fsdp, w2)

    ckpt = read_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    for k, v in ckpt.state_dict.items():  # the EMA, whole
        torch.testing.assert_close(v, w2[f"ema.model.{k}"], rtol=0, atol=0)
    run_cli("stale-export", f"ckpt={tmp_path / 'fsdp' / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'export'}")
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert exported.keys() <= ckpt.state_dict.keys() and len(exported) > 10
    for k, v in exported.items():
        torch.testing.assert_close(v, ckpt.state_dict[k], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_fsdp2_composes_with_sequence_parallelism_and_checkpointing(tmp_path):
    """4 processes, 2 data-parallel groups x 2 sequence-parallel ranks, FSDP2 sharding over all 4, checkpointed
    blocks == plain DDP over 2 processes: the reduce-scatter over dp x sp ranks is the data-parallel mean."""
    short = [*PARALLEL_RUN, "trainer.max_steps=3", "trainer.val_check_interval=3"]
    run_cli("stale-train", *short, "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'dp'}")
    run_cli(
        "stale-train",
        *short,
        "trainer=fsdp_cpu",
        "trainer.devices=4",
        "parallel.sequence=2",
        "model.grad_checkpointing=true",
        f"hydra.run.dir={tmp_path / 'fsdp_sp'}",
        timeout=500,
    )
    dp, fsdp_sp = losses_of(tmp_path / "dp"), losses_of(tmp_path / "fsdp_sp")
    assert sorted(dp) == [0, 1, 2] and fsdp_sp == pytest.approx(dp, rel=1e-5, abs=0)
    w1, w2 = (weights_of(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("dp", "fsdp_sp"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune=lora"], "finetune=lora is not supported with trainer=fsdp"),
        (["finetune.freeze=[patch_embed.*]"], "finetune.freeze=['patch_embed.*'] is not supported with trainer=fsdp"),
        (["compile=true"], "compile=True is not supported with trainer=fsdp"),
    ],
)
def test_fsdp2_refuses_unsupported_settings_before_training(overrides, message, tmp_path, compose_train):
    from stale.train import ConfigError, check_config

    (tmp_path / "base.ckpt").write_bytes(b"")  # init_from must exist; the FSDP2 check comes before reading it
    cfg = compose_train(
        "trainer=fsdp_cpu", *overrides, f"init_from={tmp_path / 'base.ckpt'}", f"paths.output_dir={tmp_path}"
    )
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.").replace("*", r"\*")):
        check_config(cfg)
