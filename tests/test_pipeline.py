"""StalePipeline on a tiny random model: loading an export, labels, classifier-free guidance, determinism."""

import json

import pytest
import torch

from stale.checkpoint import ExportError
from stale.diffusion.generate import guided_velocity
from stale.export import save_pretrained
from stale.models import build_model
from stale.pipeline import StalePipeline


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A very small model whose zero-initialised layers (adaLN-Zero, final layer) are perturbed, so that the
    velocity depends on x, t and the label, as after training."""
    with torch.random.fork_rng():  # the initialisers draw from the global generator
        torch.manual_seed(seed)
        model = build_model("tiny", dim=32, depth=2, heads=2, frames=4, size=8, num_classes=3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    save_pretrained(
        tiny_model(),
        out,
        name="tiny",
        diffusion={"prior": "uniform"},
        sample={"steps": 3, "sampler": "euler", "guidance": 1.0, "seed": 5},
    )
    return out


@pytest.fixture(scope="module")
def pipe(export_dir):
    return StalePipeline.from_pretrained(export_dir)


def test_roundtrip_weights_and_settings(pipe, export_dir):
    ref = tiny_model()
    for k, v in ref.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v), k
    assert pipe.prior == "uniform"
    # `seed` is not a sample default; classifier_guidance and scheduler, absent from this export, default to 0 (off)
    # and None (stale's grid)
    assert pipe.defaults == {
        "steps": 3,
        "sampler": "euler",
        "guidance": 1.0,
        "classifier_guidance": 0.0,
        "scheduler": None,
    }
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model"]["dim"] == 32 and config["model"]["patch"] == [1, 4, 4]


def test_output_shape_dtype_and_determinism(pipe):
    a = pipe(num_videos=3, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 4, 8, 8)  # (B, C, T, H, W)
    assert torch.equal(a, pipe(num_videos=3, seed=1))
    assert not torch.equal(a, pipe(num_videos=3, seed=2))
    assert a.float().std() > 10  # not a constant image
    assert pipe(num_videos=2, frames=8, size=16, steps=2).shape == (2, 3, 8, 16, 16)  # other clip sizes


def test_classifier_free_guidance_formula(pipe):
    x = torch.rand(3, 3, 4, 8, 8) * 2 - 1
    t = torch.full((3,), 0.4)
    labels = torch.tensor([0, 1, 2])
    null = torch.full_like(labels, pipe.null_label)
    with torch.no_grad():
        v_label, v_null = pipe.model(x, t, labels)[0], pipe.model(x, t, null)[0]
        for w in (0.0, 1.0, 2.5):
            v = guided_velocity(pipe.model, labels, w)(x, t)  # w = 2.5: one forward over the doubled batch
            torch.testing.assert_close(v, v_null + w * (v_label - v_null), rtol=0, atol=1e-6)
    assert (v_label - v_null).abs().max() > 1e-2  # the label matters, so the check above can fail
    assert not torch.equal(pipe(num_videos=3, seed=1, guidance=3.0), pipe(num_videos=3, seed=1, guidance=1.0))
    guided = pipe(num_videos=3, seed=1, guidance=3.0)
    assert not torch.equal(pipe(num_videos=3, seed=1, guidance=3.0, classifier_guidance=2.0), guided)


def test_labels(pipe):
    assert pipe.labels(5, None).tolist() == [0, 1, 2, 0, 1]  # cycles through classes, as stale-train does
    assert pipe.labels(2, 1).tolist() == [1, 1]
    assert pipe.labels(2, [2, 3]).tolist() == [2, 3]  # 3 = num_classes = the null label (unconditional)
    assert pipe.labels(2, torch.tensor(0)).tolist() == [0, 0]
    with pytest.raises(ValueError, match="label 4 is outside 0..3"):
        pipe.labels(2, 4)
    with pytest.raises(ValueError, match="2 entries for num_videos=3"):
        pipe.labels(3, [0, 1])
    with pytest.raises(ValueError, match="sampler='nope' is not one of"):
        pipe(num_videos=1, sampler="nope")


def test_batch_size_only_bounds_memory(pipe):
    whole = pipe(num_videos=3, seed=4)
    chunked = pipe(num_videos=3, seed=4, batch_size=2)
    # same noise for every video; the model's float sums may differ in the last bit with the batch size
    assert (whole.int() - chunked.int()).abs().max() <= 1


def test_gaussian_prior_roundtrip(tmp_path):
    save_pretrained(tiny_model(), tmp_path, diffusion={"prior": "gaussian"})
    pipe = StalePipeline.from_pretrained(tmp_path)
    assert pipe.prior == "gaussian"
    out = pipe(num_videos=2, steps=2)
    assert out.shape == (2, 3, 4, 8, 8)


def test_save_pretrained_from_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    again = StalePipeline.from_pretrained(tmp_path)
    assert torch.equal(again(num_videos=2, seed=9), pipe(num_videos=2, seed=9))


def test_broken_exports_name_the_file(export_dir, tmp_path):
    with pytest.raises(ExportError, match="config.json does not exist"):
        StalePipeline.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((export_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ExportError, match="model.safetensors is not a readable safetensors file"):
        StalePipeline.from_pretrained(tmp_path)
    config = json.loads((export_dir / "config.json").read_text())
    config["model"]["dim"] = 64  # weights no longer fit
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((export_dir / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="does not fit the model"):
        StalePipeline.from_pretrained(tmp_path)
    config["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="format_version=99"):
        StalePipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "settings", [{"guidance": 3.0}, {"guidance": 3.0, "classifier_guidance": 2.0}], ids=["cfg3", "cfg3+classifier2"]
)
def test_system_and_pipeline_give_bit_identical_videos(pipe, settings):
    """stale-train's samples (StaleSystem.sample) and the export's (StalePipeline) for one seed, on CPU."""
    from stale.diffusion.objective import StaleObjective
    from stale.system.stale_system import StaleSystem

    system = StaleSystem(tiny_model(), StaleObjective(prior="uniform"))
    labels = torch.tensor([2, 0, 1])
    a = system.sample(labels, steps=3, sampler="heun", seed=6, **settings)
    b = pipe(num_videos=3, label=labels, steps=3, sampler="heun", seed=6, **settings)
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, pipe(num_videos=3, label=labels, steps=3, sampler="heun", seed=6))  # settings matter
