"""Frame conditioning: per-frame times in the model, context frames clean and out of the loss in the objective, given
frames back unchanged from generate and from stale-sample image= / video=, and the acceptance chain on the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli
from stale.data.conditioning import ConditioningError, load_image, load_video
from stale.data.media import save_videos
from stale.data.synthetic import SyntheticSpec, make_clip
from stale.data.video_io import decode_mp4, write_mp4_file
from stale.diffusion.generate import generate
from stale.diffusion.objective import StaleObjective
from stale.models import build_model
from stale.pipeline.sample_to_dir import sample_to_dir

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def random_model(**kw):
    """A tiny model with every weight random (adaLN-Zero would otherwise output exactly 0)."""
    torch.manual_seed(0)
    model = build_model("tiny", dim=32, depth=2, heads=2, frames=4, size=8, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("patch", [(1, 4, 4), (2, 4, 4)])
def test_per_frame_time_equal_to_per_clip_time_when_all_frames_share_it(patch):
    model = random_model(patch=patch, prediction="data")
    x, t, y = torch.rand(2, 3, 4, 8, 8) * 2 - 1, torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    v1, s1 = model(x, t, y)
    v2, s2 = model(x, t[:, None].expand(2, 4 // patch[0]), y)
    torch.testing.assert_close(v1, v2, atol=1e-3, rtol=1e-3)  # float32 sums over other row counts: ~5e-5 apart
    torch.testing.assert_close(s1, s2, atol=1e-3, rtol=1e-3)
    t3 = t[:, None].expand(2, 4 // patch[0]).clone()
    t3[:, 0] = 1.0  # another time for the first latent frame changes the output
    assert (model(x, t3, y)[0] - v1).abs().max() > 0.1
    with pytest.raises(ValueError, match="per latent frame"):
        model(x, torch.rand(2, 3), y)


class Recorder:
    """Forward hook: records the model's inputs; optionally replaces the velocity on the first frame by garbage."""

    def __init__(self, corrupt: bool):
        self.corrupt, self.inputs = corrupt, []

    def __call__(self, module, args, output):
        self.inputs.append(args)
        if not self.corrupt:
            return output
        v, scores = output
        v = v.clone()
        v[:, :, :1] = 1e3
        return v, scores


def objective_run(model, x, y, corrupt: bool, **kw):
    rec = Recorder(corrupt)
    handle = model.register_forward_hook(rec)
    try:
        torch.manual_seed(5)
        out = StaleObjective(**kw)(model, x, y, null_label=4)
    finally:
        handle.remove()
    return out, rec


def test_context_frames_are_clean_inputs_and_out_of_the_loss():
    model = random_model().train()
    rng = np.random.default_rng(0)
    clips = np.stack([make_clip(rng, SyntheticSpec(frames=4, size=8), k % 4) for k in range(6)])
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    y = torch.arange(6) % 4
    kw = dict(context_frames=1, context_prob=1.0, dog_weight=0.1)
    out, rec = objective_run(model, x, y, corrupt=False, **kw)
    x_t, t, _ = rec.inputs[0]  # the flow branch
    assert t.shape == (6, 4) and torch.all(t[:, 0] == 1) and torch.all(t[:, 1:] < 1)
    assert torch.equal(x_t[:, :, 0], x[:, :, 0])  # the context frame is the clean frame
    assert not torch.equal(x_t[:, :, 1], x[:, :, 1])
    bad, _ = objective_run(model, x, y, corrupt=True, **kw)
    for key in ("velocity", "dog"):
        torch.testing.assert_close(bad[key], out[key])  # a velocity on context frames costs nothing
    # the negative control: without context the corrupted frame dominates the loss
    plain, _ = objective_run(model, x, y, corrupt=True, dog_weight=0.1)
    assert plain["velocity"] > 100 * out["velocity"]
    # the joy token's head still trains with context on
    model.zero_grad()
    out["loss"].backward()
    assert "hinge" in out and model.head.linear.weight.grad.abs().max() > 0
    # context_prob=0.5: about half of the clips get context
    _, rec = objective_run(
        model, x.repeat(20, 1, 1, 1, 1), y.repeat(20), corrupt=False, context_frames=1, context_prob=0.5
    )
    share = (rec.inputs[0][1][:, 0] == 1).float().mean()
    assert 0.3 < share < 0.7


@pytest.mark.parametrize("sampler,guidance", [("euler", 1.0), ("heun", 3.0)])
def test_generate_keeps_context_frames_unchanged(sampler, guidance):
    model = random_model()
    context = torch.randint(0, 256, (2, 3, 2, 8, 8), dtype=torch.uint8)
    videos = generate(model, torch.tensor([0, 1]), steps=3, sampler=sampler, guidance=guidance, seed=1, context=context)
    assert torch.equal(videos[:, :, :2], context)
    free = generate(model, torch.tensor([0, 1]), steps=3, sampler=sampler, guidance=guidance, seed=1)
    assert not torch.equal(videos[:, :, 2:], free[:, :, 2:])  # the rest follows the context
    with pytest.raises(ValueError, match="less than the clip"):
        generate(model, torch.tensor([0, 1]), steps=2, context=torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8))


def test_conditioning_image_wrong_size_is_resized_or_refused(tmp_path, caplog):
    square = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    Image.fromarray(square).save(tmp_path / "big.png")
    with caplog.at_level("WARNING", logger="stale"):
        img = load_image(tmp_path / "big.png", 16)
    assert img.shape == (3, 1, 16, 16) and img.dtype == torch.uint8
    assert "big.png is 32x32: resized" in caplog.text
    expected = np.array(Image.fromarray(square).resize((16, 16), Image.BICUBIC))
    assert torch.equal(img[:, 0].permute(1, 2, 0), torch.from_numpy(expected))
    Image.fromarray(square[:, :20]).save(tmp_path / "wide.png")
    with pytest.raises(ConditioningError, match=r"image=.*wide\.png is 20x32, not square"):
        load_image(tmp_path / "wide.png", 16)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ConditioningError, match=r"notes\.png is not a readable image"):
        load_image(tmp_path / "notes.png", 16)
    clip = np.stack([make_clip(np.random.default_rng(1), SyntheticSpec(frames=3, size=16), 0)])[0]
    write_mp4_file(tmp_path / "clip.mp4", clip)
    assert load_video(tmp_path / "clip.mp4", 2, 16).shape == (3, 2, 16, 16)
    with pytest.raises(ConditioningError, match=r"clip\.mp4 has 3 frames, fewer than context_frames=5"):
        load_video(tmp_path / "clip.mp4", 5, 16)


def codec_error(frame: np.ndarray, frames: int, tmp) -> float:
    """Mean absolute error of the mp4 round trip of a clip that holds `frame` still: what the codec alone loses."""
    save_videos(torch.from_numpy(np.repeat(frame[None], frames, 0)).permute(3, 0, 1, 2)[None], tmp)
    return float(np.abs(decode_mp4((tmp / "sample_000.mp4").read_bytes())[0].astype(int) - frame).mean())


@pytest.mark.slow
def test_acceptance_context_base_lora_export_image_to_video(tmp_path):
    """The issue's acceptance chain on the command line: base with context -> LoRA from it -> merged and unmerged
    exports -> stale-sample image=PNG and video=MP4: the given frames open every video."""
    base, lora = tmp_path / "base", tmp_path / "lora"
    common = [
        "debug=smoke",
        "logger=none",
        "diffusion.context_frames=1",
        "diffusion.context_prob=0.5",
        "sample.num_videos=1",
        "sample.steps=2",
        "callbacks.samples.num_videos=1",
    ]
    run_cli("stale-train", *common, f"hydra.run.dir={base}", env=ONE_THREAD)
    proc = run_cli(
        "stale-train",
        *common,
        "finetune=lora",
        f"init_from={base}/checkpoints/last.ckpt",
        f"hydra.run.dir={lora}",
        env=ONE_THREAD,
    )
    assert "init_from" in proc.stdout + proc.stderr
    ckpt = lora / "checkpoints" / "last.ckpt"
    run_cli("stale-export", f"ckpt={ckpt}", f"out={tmp_path / 'merged'}", "merge=true", env=ONE_THREAD)
    run_cli("stale-export", f"ckpt={ckpt}", f"out={tmp_path / 'unmerged'}", "merge=false", env=ONE_THREAD)
    clip = make_clip(np.random.default_rng(3), SyntheticSpec(frames=8, size=16, style="simple"), 1)
    Image.fromarray(clip[0]).save(tmp_path / "first.png")
    write_mp4_file(tmp_path / "clip.mp4", clip)
    allowed = codec_error(clip[0], 8, tmp_path / "codec") + 2.0
    run_cli(
        "stale-sample",
        f"model={tmp_path / 'merged'}",
        f"image={tmp_path / 'first.png'}",
        f"out={tmp_path / 'samples_merged'}",
        "num_videos=2",
        "steps=3",
        "progress=false",
        env=ONE_THREAD,
    )
    # the same library function as stale-sample, in this process (each command costs ~10 s of imports here)
    sample_to_dir(
        tmp_path / "samples_adapter",
        model=tmp_path / "unmerged",
        lora=tmp_path / "unmerged" / "lora",
        image=tmp_path / "first.png",
        num_videos=2,
        steps=3,
        progress=False,
    )
    sample_to_dir(
        tmp_path / "samples_continued",
        model=tmp_path / "merged",
        video=tmp_path / "clip.mp4",
        context_frames=1,
        num_videos=2,
        steps=3,
        progress=False,
    )
    for name in ("merged", "adapter", "continued"):
        out = tmp_path / f"samples_{name}"
        for i in range(2):
            video = decode_mp4((out / f"sample_{i:03d}.mp4").read_bytes()).astype(int)
            assert video.shape == (8, 16, 16, 3)
            err = np.abs(video[0] - clip[0]).mean()
            assert err <= allowed, f"{name} sample {i}: first frame off by {err:.2f} (codec alone {allowed - 2:.2f})"
    bad = run_cli(
        "stale-sample",
        f"model={tmp_path / 'merged'}",
        f"image={tmp_path / 'clip.mp4'}",
        f"out={tmp_path / 'no'}",
        check=False,
        env=ONE_THREAD,
    )
    assert bad.returncode != 0 and "clip.mp4 is not a readable image" in bad.stderr + bad.stdout
