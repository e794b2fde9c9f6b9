"""Fine-tuning from real checkpoints: init_from into a changed model, LoRA through peft (only adapters train, small
checkpoints, resume, merged vs base + adapter exports), finetune=full with frozen patterns.

A base model is trained for 6 steps in the module (RESUME_RUN of tests/helpers.py, with frame conditioning on),
and every fine-tuning run starts from its checkpoint.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from helpers import RESUME_RUN, StopAt, compose_train, nested_equal, train_on_stream
from stale.checkpoint import read_checkpoint
from stale.checkpoint.weights import InitFromError, init_from
from stale.export import export_checkpoint
from stale.export.export import save_pretrained
from stale.models import build_model
from stale.models.finetune import base_name
from stale.pipeline import StalePipeline
from stale.system.ema import StaleEMA
from stale.train import ConfigError, build_system, check_config

CONTEXT = ["diffusion.context_frames=1", "diffusion.context_prob=0.5"]


class FinalState(L.Callback):
    """The live model's tensors when training ends, after EMAWeightAveraging copied the average into it."""

    def __init__(self):
        self.state, self.trainable = None, None

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.trainable = {n for n, p in pl_module.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train_on_stream(out, *CONTEXT, "callbacks.ema.decay=0.5")
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    final = FinalState()
    # a large learning rate, so that 6 steps move the adapters far enough to change samples
    train_on_stream(
        out,
        *CONTEXT,
        "finetune=lora",
        "finetune.rank=2",
        f"init_from={base}",
        "optim.lr=0.05",
        "callbacks.ema.decay=0.5",
        callbacks=[final],
    )
    return out, final


def tiny_cfg(*overrides):
    return compose_train(*RESUME_RUN, "paths.output_dir=unused", *overrides)  # nothing is written


def test_lora_changes_only_adapter_weights(base, lora_run):
    out, final = lora_run
    base_state = read_checkpoint(base, "ema").state_dict
    adapters = {k for k in final.state if ".lora_" in k}
    assert adapters and final.trainable == adapters  # only adapters train
    for name, value in final.state.items():
        if ".lora_" in name:
            continue
        assert torch.equal(value, base_state[base_name(name)]), f"{name} changed in training"  # joy token too
    assert any(final.state[k].abs().max() > 0 for k in adapters if "lora_B" in k)  # B starts at 0: it trained


def test_lora_checkpoint_is_small_and_rebuilds(base, lora_run):
    out, final = lora_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert ckpt[key] and all(".lora_" in k for k in ckpt[key]), key
    assert ckpt["finetune_base"]["init_from"] == str(base.resolve())
    size, base_size = (out / "checkpoints" / "last.ckpt").stat().st_size, base.stat().st_size
    assert size < base_size / 4, (size, base_size)
    model = read_checkpoint(out / "checkpoints" / "last.ckpt", "ema").build_model()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final.state[name], rtol=0, atol=0)


def test_lora_resume_is_exact(base, lora_run, tmp_path):
    straight, _ = lora_run
    args = [
        *CONTEXT,
        "finetune=lora",
        "finetune.rank=2",
        f"init_from={base}",
        "optim.lr=0.05",
        "callbacks.ema.decay=0.5",
        "sample_every_n_steps=0",
    ]
    train_on_stream(tmp_path / "stopped", *args, callbacks=[StopAt(3)])
    stopped = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    train_on_stream(tmp_path / "resumed", *args, f"ckpt_path={stopped}")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert nested_equal(a["state_dict"], b["state_dict"]) and nested_equal(
        a["current_model_state"], b["current_model_state"]
    )
    # resuming on top of another base is refused
    other = tmp_path / "other"
    save_pretrained(build_model("tiny", dim=32, depth=2, heads=2, frames=4, size=8), other)
    with pytest.raises(Exception, match="resume it with that init_from"):
        train_on_stream(
            tmp_path / "wrong",
            *args[:2],
            "finetune=lora",
            "finetune.rank=2",
            f"init_from={other}",
            f"ckpt_path={stopped}",
        )


def test_merged_export_samples_like_base_plus_adapter(lora_run, base, tmp_path):
    out, _ = lora_run
    ckpt = out / "checkpoints" / "last.ckpt"
    export_checkpoint(ckpt, tmp_path / "merged", merge=True)
    export_checkpoint(ckpt, tmp_path / "base", merge=False)
    assert (tmp_path / "base" / "lora" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "merged" / "lora").exists()
    merged = StalePipeline.from_pretrained(tmp_path / "merged")
    adapted = StalePipeline.from_pretrained(tmp_path / "base", lora=tmp_path / "base" / "lora")
    plain = StalePipeline.from_pretrained(tmp_path / "base")
    kw = dict(num_videos=3, label=[0, 1, 2], steps=4, seed=3, guidance=2.0)
    a, b, c = merged(**kw), adapted(**kw), plain(**kw)
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float rounding of W + BA vs W x + B(A x)
    assert not torch.equal(a, c)  # the adapter changes the videos the base gives
    torch.manual_seed(0)
    x, t, y = torch.rand(2, 3, 4, 8, 8) * 2 - 1, torch.rand(2), torch.tensor([0, 3])
    with torch.no_grad():
        v_merged, v_adapted, v_plain = (p.model(x, t, y)[0] for p in (merged, adapted, plain))
    torch.testing.assert_close(v_merged, v_adapted, atol=1e-5, rtol=1e-4)
    assert (v_merged - v_plain).abs().max() > 100 * (v_merged - v_adapted).abs().max()  # the adapter matters
    from_ckpt = StalePipeline.from_checkpoint(ckpt)(**kw)
    assert (from_ckpt.int() - a.int()).abs().max() <= 1


def test_init_from_a_changed_model_reports_by_name(tmp_path):
    source = build_model("tiny", dim=32, depth=2, heads=2, frames=4, size=8, num_classes=4)
    save_pretrained(source, tmp_path / "src")
    bigger = build_model("tiny", dim=32, depth=3, heads=2, frames=4, size=8, num_classes=6)
    report, record = init_from(bigger, tmp_path / "src")
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in report.new} == {"blocks.2"}
    assert set(report.reshaped) == {"y_embed.embedding_table.weight", "head.linear.weight", "head.linear.bias"}
    assert report.dropped == [] and report.unexpected == []
    assert torch.equal(bigger.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert len(record["sha256"]) == 64
    # fewer blocks: the source's last block is dropped, and that is explained by the depth change
    smaller = build_model("tiny", dim=32, depth=1, heads=2, frames=4, size=8, num_classes=4)
    report, _ = init_from(smaller, tmp_path / "src")
    assert report.dropped and all(n.startswith("blocks.1.") for n in report.dropped) and not report.unexpected
    # a wider MLP is not explained by any config change the loader knows: stop, naming the tensors
    wider = build_model("tiny", dim=32, depth=2, heads=2, frames=4, size=8, num_classes=4, mlp_ratio=2.0)
    with pytest.raises(InitFromError, match=r"blocks\.0\.mlp\.0\.weight.*init_from_strict=false"):
        init_from(wider, tmp_path / "src")
    report, _ = init_from(wider, tmp_path / "src", strict=False)
    assert "blocks.0.mlp.0.weight" in report.reshaped and "blocks.0.attn.qkv.weight" in report.loaded


def test_init_from_warns_when_the_positions_change_meaning(tmp_path, caplog):
    """sin-cos weights into a RoPE model (or another pattern): every tensor fits, so only a warning can tell."""
    save_pretrained(build_model("tiny", dim=32, depth=2, heads=2, frames=4, size=8), tmp_path / "src")
    rope = build_model("tiny", dim=32, depth=2, heads=2, frames=4, size=8, pos="rope")
    with caplog.at_level("WARNING", logger="stale"):
        report, _ = init_from(rope, tmp_path / "src")
    assert not report.unexpected and not report.new
    assert "model.pos was sincos when these weights trained and is rope now" in caplog.text
    assert "pos_base" not in caplog.text and "pattern" not in caplog.text  # unchanged fields say nothing
    caplog.clear()
    with caplog.at_level("WARNING", logger="stale"):
        init_from(build_model("tiny", dim=32, depth=2, heads=2, frames=4, size=8), tmp_path / "src")
    assert "model." not in caplog.text


def test_init_from_config_checks(base):
    with pytest.raises(ConfigError, match="finetune=lora needs init_from"):
        check_config(tiny_cfg("finetune=lora"))
    with pytest.raises(ConfigError, match="init_from=.*does not exist"):
        check_config(tiny_cfg("init_from=/nonexistent/last.ckpt"))
    with pytest.raises(ConfigError, match="unknown config key finetune.rnk"):
        check_config(tiny_cfg("finetune=lora", f"init_from={base}", "+finetune.rnk=4"))
    with pytest.raises(ConfigError, match="init_from_strict=false"):  # another width reshapes everything
        build_system(tiny_cfg(f"init_from={base}", "model.dim=64", "model.heads=2"))
    with pytest.raises(ConfigError, match="finetune.target_modules pattern 'blocks.\\*.nope' matches nothing"):
        build_system(tiny_cfg("finetune=lora", f"init_from={base}", "finetune.target_modules=[blocks.*.nope]"))
    system = build_system(tiny_cfg(f"init_from={base}", "model.num_classes=6"))  # a new label table trains
    assert system.model.y_embed.embedding_table.weight.shape[0] == 7


def test_full_finetune_with_frozen_patterns(base, tmp_path):
    final = FinalState()
    train_on_stream(tmp_path, f"init_from={base}", "finetune.freeze=[patch_embed.*,blocks.0.*]", callbacks=[final])
    base_state = read_checkpoint(base, "ema").state_dict
    frozen = [k for k in final.state if k.startswith(("patch_embed.", "blocks.0."))]
    assert frozen and not final.trainable & set(frozen)
    for name in frozen:
        assert torch.equal(final.state[name], base_state[name]), name
    assert not torch.equal(final.state["blocks.1.attn.qkv.weight"], base_state["blocks.1.attn.qkv.weight"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k[len("model.") :] in frozen for k in ckpt["state_dict"])  # left out, rebuilt from init_from
    model = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt").build_model()
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], final.state["blocks.1.attn.qkv.weight"])


def test_ema_leaves_unchanged_tensors_bit_identical(tmp_path):
    """Why stale.system.ema exists: Lightning's EMA formula rounds a tensor averaged with itself; StaleEMA's
    foreach lerp does not (a real fit with one frozen layer), and moves the others as an EMA does."""
    from lightning.pytorch.demos.boring_classes import BoringModel
    from torch.optim.swa_utils import get_ema_avg_fn

    p = torch.randn(10_000)
    assert not torch.equal(get_ema_avg_fn(0.995)(p.clone(), p, 1), p)  # EMAWeightAveraging's update drifts

    class TwoLayers(BoringModel):
        def __init__(self):
            super().__init__()
            self.frozen = torch.nn.Linear(32, 32)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.layer(self.frozen(x))

    torch.manual_seed(0)
    model, ema = TwoLayers(), StaleEMA(decay=0.9)
    frozen, start = model.frozen.weight.clone(), model.layer.weight.clone()
    trainer = L.Trainer(
        max_steps=5,
        callbacks=[ema],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model)  # at the end the callback copies the average into the model
    assert torch.equal(model.frozen.weight, frozen)
    assert not torch.equal(model.layer.weight, start)
    with pytest.raises(ValueError, match="callbacks.ema.decay=1.0"):
        StaleEMA(decay=1.0)
