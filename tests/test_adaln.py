"""Timestep conditioning: model.adaln=single (adaLN-single, PixArt-alpha / Latte) beside the default per-block
adaLN-Zero."""

import pytest
import torch

from stale.models import build_model
from stale.models.flops import count_parameters, parameter_count


def test_single_shares_one_modulation_network_and_starts_as_identity():
    per_block, single = (build_model("tiny", frames=4, size=16, adaln=a) for a in ("per_block", "single"))
    d, depth = per_block.config.dim, per_block.config.depth
    # (depth - 1) fewer Linear(D, 6D); each block keeps a (6D,) offset
    assert count_parameters(per_block) - count_parameters(single) == (depth - 1) * (6 * d * d + 6 * d) - depth * 6 * d
    assert parameter_count(single.config) == count_parameters(single)
    assert not any(k.startswith("blocks.") and "adaLN_modulation.1" in k for k in single.state_dict())
    assert all(f"blocks.{i}.adaLN_modulation.1.weight" in per_block.state_dict() for i in range(depth))
    x, t, y = torch.randn(2, 3, 4, 16, 16), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        blocks_in = {}
        single.blocks[0].register_forward_pre_hook(lambda m, a: blocks_in.update(x=a[0].clone()))
        single.blocks[-1].register_forward_hook(lambda m, a, out: blocks_in.update(out=out.clone()))
        v, _ = single(x, t, y)
    assert torch.equal(blocks_in["x"], blocks_in["out"])  # gates start at zero: every block is the identity
    assert torch.count_nonzero(v) == 0


def test_single_trains_its_shared_network_and_offsets():
    torch.manual_seed(0)
    model = build_model("tiny", frames=4, size=16, adaln="single")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = torch.randn(2, 3, 4, 16, 16), torch.rand(2), torch.tensor([0, 1])
    for _ in range(3):
        v, s = model(x, t, y)
        ((v - x).square().mean() + s.square().mean()).backward()
        opt.step()
        opt.zero_grad()
    assert model.adaLN_single[-1].weight.abs().sum() > 0
    assert all(b.adaLN_modulation.offset.abs().sum() > 0 for b in model.blocks)


def test_bad_adaln_names_the_key():
    with pytest.raises(ValueError, match="model.adaln='shared'"):
        build_model("tiny", adaln="shared")


def test_single_exports_to_onnx(tmp_path):
    """The shared modulation goes through torch.export and ONNX like the per-block one (tests/test_export.py).
    The same export carries model.pos=rope and a full-attention block, so its rotation (slices,
    multiplies, a concatenation) is checked in onnxruntime too without a second ~15 s export in make test."""
    from stale.export.onnx import check_onnx, export_onnx

    torch.manual_seed(0)
    model = build_model(
        "tiny", frames=4, size=16, adaln="single", pos="rope", depth=3, pattern=["spatial", "temporal", "full"]
    ).eval()
    with torch.no_grad():  # leave the zero init: an all-zero velocity would compare anything as equal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export_onnx(model, tmp_path / "m.onnx")
    assert check_onnx(tmp_path / "m.onnx", model) < 1e-4
