"""stale-bench sections=pretrained: stale's Wan adapter step against the bare diffusers module in one run. The CLI
writes both timings, their ratio and memory per clip, and marks the GPU rows unmeasured without CUDA; the bare row
computes stale's own loss; the GPU rows' path runs on CPU with a tiny transformer."""

import json

import pytest
import torch

from helpers import TINY_TRANSFORMERS, run_cli
from stale.bench import pretrained

BARE, STALE = "diffusers forward+backward", "stale adapter step"
CLIP = dict(frames=3, height=4, width=6, text_len=8)  # latent T x H x W, caption tokens


def test_cli_times_the_adapter_step_against_the_bare_diffusers_module(tmp_path):
    out = tmp_path / "bench.json"
    run_cli(
        "stale-bench", "sections=pretrained", "pretrained.rounds=3", "pretrained.warmup=1", f"out={out}", timeout=120
    )
    sec = json.loads(out.read_text())["sections"]["pretrained"]
    assert {"rows", "summary", "notes", "wall_s"} <= set(sec)
    rows = {(r["row"], r.get("grad_checkpointing")): r for r in sec["rows"]}
    bare, stale = rows[BARE, None], rows[STALE, None]
    assert bare["step_ms"] > 0 and stale["step_ms"] > 0
    assert stale["vs_bare"] == pytest.approx(stale["step_ms"] / bare["step_ms"], rel=1e-3)
    assert sec["summary"]["stale_over_bare"] == stale["vs_bare"] and bare["vs_bare"] == 1.0
    batch = sec["setup"]["batch_size"]
    for r in (bare, stale):
        assert r["mem_per_clip_mib"] > 0
        assert r["mem_per_clip_mib"] == pytest.approx(r["step_mem_mib"] / batch, abs=1e-3)
    # the hinge branch puts more clips through the model: the whole step holds more than the bare one
    assert stale["step_mem_mib"] > bare["step_mem_mib"]
    for ckpt in (False, True):
        gpu = rows[f"{STALE} (GPU)", ckpt]
        for key in ("status", "tokens_per_s", "mfu", "peak_mem_gib"):
            assert gpu[key] == "not measured (no CUDA)", key
    assert sec["summary"]["gpu_rows"] == "not measured (no CUDA)"


def test_the_bare_row_computes_the_adapters_loss_without_the_joy_token():
    """The bare module on stale's loss is the adapter with joy=false on it, bit for bit; the joy token changes it."""
    objective = pretrained.StaleObjective(hinge_weight=0.0)
    frames, height, text_len = CLIP["frames"], CLIP["height"], CLIP["text_len"]
    plain = pretrained.wan_backbone(None, None, TINY_TRANSFORMERS["wan"], frames, height, text_len, joy=False)
    joyful = pretrained.wan_backbone(None, None, TINY_TRANSFORMERS["wan"], frames, height, text_len, joy=True)
    bare = pretrained.BareWan(plain.transformer, plain.config)
    batch = pretrained.captioned_batch(plain.config, 4, CLIP["frames"], CLIP["height"], CLIP["width"], seed=0)

    def loss(model):
        step = pretrained.train_step(model, objective, "cpu", "32-true", seed=0)
        with torch.no_grad():
            return step.system.batch_loss(batch, seed=7)["loss"]

    assert torch.equal(loss(bare), loss(plain))
    assert not torch.equal(loss(bare), loss(joyful))


def test_gpu_rows_run_on_cpu_and_count_the_hinge_clips():
    seen = []  # batch sizes of every model call in one training step

    class Counting(pretrained.WanBackbone):
        def forward(self, x, *args):
            seen.append(x.shape[0])
            return super().forward(x, *args)

    tiny = TINY_TRANSFORMERS["wan"]
    rows = {
        b: pretrained.gpu_rows(
            None, None, "cpu", "32-true", 0, tiny, **CLIP, batch_size=b, steps=1, warmup=0, measure_on_cpu=True
        )
        for b in (1, 2)
    }
    for b, (plain, ckpt) in rows.items():
        assert (plain["grad_checkpointing"], ckpt["grad_checkpointing"]) == (False, True)
        for r in (plain, ckpt):
            assert r["status"] == "measured" and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
            assert r["tokens_per_clip"] == 3 * (4 // 2) * (6 // 2)  # patch (1, 2, 2), the joy token not counted
            assert r["mfu"] == "n/a (peak unknown)"
    # the objective's hinge branch at batch 2: every clip again with its own and its neighbour's caption
    adapter = pretrained.wan_backbone(None, None, tiny, CLIP["frames"], CLIP["height"], CLIP["text_len"])
    counting = Counting(adapter.transformer, adapter.config)
    step = pretrained.train_step(counting, pretrained.StaleObjective(), "cpu", "32-true", seed=0)
    step(pretrained.captioned_batch(adapter.config, 2, CLIP["frames"], CLIP["height"], CLIP["width"], seed=0))
    assert seen == [2, 4]
    assert rows[2][0]["flops_per_clip"] == pytest.approx(3 * rows[1][0]["flops_per_clip"])  # (2 + 4) / 2 per clip
