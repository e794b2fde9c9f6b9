"""train(cfg): build data, model, objective and system from a composed Hydra config, fit, then sample.

The console command `stale-train` is a thin @hydra.main wrapper over this function (stale/cli/train.py),
so tests and notebooks can call train() with a config composed by Hydra's compose API.
A value is range-checked where it is used (StaleConfig, StaleSystem, the callbacks' constructors), all of which
run before any data is generated or a step is taken; check_config() holds the key schema and the checks that
span nodes or guard Lightning's own trainer arguments. See docs/training.md for what a run writes and how to
resume it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from stale.checkpoint.weights import prepare
from stale.models.finetune import require_peft
from stale.models.flops import training_flops_per_clip
from stale.models.stale_transformer import SIZES, StaleConfig
from stale.system.budget import ComputeBudget
from stale.system.checkpoint_io import SafeCheckpointIO
from stale.system.deadline import TrainingDeadline
from stale.system.preemption import PreemptionCheckpoint
from stale.system.training_samples import log_videos, sample_to_disk
from stale.system.schedules import SCHEDULE_FNS, lr_multiplier, schedule_params
from stale.system.stale_system import StaleSystem
from stale.system.threads import ThreadTuner
from stale.utils.provenance import provenance
from stale.utils.schema import UnknownKeyError, check_train_keys

log = logging.getLogger("stale")

NEEDS_LOGGER = ("lr_monitor", "throughput")  # callbacks that only log
# strategies with a sequence_parallel argument (stale/parallel/mesh.py)
SEQUENCE_PARALLEL_STRATEGIES = ("stale.parallel.strategies.HydraDDPStrategy", "stale.parallel.strategies.HydraFSDP2Strategy")
PRECISIONS = ("32", "32-true", "bf16-mixed")  # fp16 needs loss scaling, whose skipped steps the NaN guard would count


class ConfigError(ValueError):
    """A config value that cannot work; raised before training starts, naming the key."""


def _loggers(cfg: DictConfig, out: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if name == "wandb":
            # W&B with no account and no network: offline unless a key is configured.
            offline = node.get("offline")
            if offline is None:
                offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
            os.environ.setdefault("WANDB_SILENT", "true")
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            loggers.append(instantiate(node, offline=bool(offline)))
        else:
            loggers.append(instantiate(node))
    return loggers


def _number(cfg: DictConfig, key: str, low: float | None = None, *, strict: bool = False, integer: bool = False,
            optional: bool = False) -> None:
    """Check that the value at dotted `key` is a number (>= low, or > low when strict)."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
    if low is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{key}={value!r} must be {'>' if strict else '>='} {low}")


def check_config(cfg: DictConfig) -> None:
    """The checks no single constructor can make, before any data is generated or a step is taken: the key
    schema, checks that span nodes, and Lightning's trainer arguments (its Trainer does not range-check them)."""
    keys = {"model": {"name"} | {f.name for f in dataclasses.fields(StaleConfig)}}  # build_model's **overrides
    if cfg.schedule.get("name") in SCHEDULE_FNS:
        keys["schedule"] = {"name", "warmup"} | set(schedule_params(cfg.schedule.name))
    try:
        check_train_keys(cfg, keys)  # a misspelt key would otherwise train with the default (stale/utils/schema.py)
    except UnknownKeyError as e:
        raise ConfigError(str(e)) from None
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    if cfg.get("init_from") and not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from={cfg.init_from!r} does not exist (a stale-train checkpoint or a stale-export folder)")
    if (cfg.get("finetune") or {}).get("name") == "lora":
        if not cfg.get("init_from"):
            raise ConfigError("finetune=lora needs init_from=CKPT_OR_EXPORT_DIR (the frozen base the adapters train on)")
        try:
            require_peft()
        except ImportError as e:
            raise ConfigError(str(e)) from None
    autoencoder = check_autoencoder(cfg)  # fills in the latent shape, the normalisation and the prior's scale
    check_text_node(cfg)
    patch = list(cfg.model.get("patch", [1, 1, 1]))
    frames, size = (cfg.model.frames, cfg.model.size) if autoencoder is not None else (cfg.data.frames, cfg.data.size)
    if frames % patch[0] or size % patch[1] or size % patch[2]:
        if autoencoder is not None:
            raise ConfigError(f"the latent clip of {frames} x {size} x {size} (data.frames={cfg.data.frames} and "
                              f"data.size={cfg.data.size} through {autoencoder.cls}) must be divisible by "
                              f"model.patch={patch}: choose a smaller model.patch or a larger clip")
        raise ConfigError(f"data.frames={frames} and data.size={size} must be divisible by model.patch={patch}")
    if cfg.data.get("buckets") is not None:
        check_buckets(cfg, patch, autoencoder)
    if cfg.trainer.max_steps is None and (cfg.get("deadline") or {}).get("max_minutes") is None:
        raise ConfigError("trainer.max_steps=null lets a training deadline decide the step count, but "
                          "deadline.max_minutes is null: set one of them")
    _number(cfg, "deadline.max_steps" if cfg.trainer.max_steps is None else "trainer.max_steps", 0, strict=True,
            integer=True)  # streams have no epochs
    _number(cfg, "trainer.accumulate_grad_batches", 1, integer=True)
    _number(cfg, "trainer.gradient_clip_val", 0, optional=True)  # 0 or null: no clipping
    if str(cfg.trainer.get("precision")) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.get('precision')!r} is not one of {PRECISIONS}")
    _number(cfg, "data.batch_size", 1, integer=True)  # x accumulation x devices: the clips a budget step pays for
    sched = OmegaConf.to_container(cfg.schedule, resolve=True)
    try:  # the schedule's own ranges, and its warmup against trainer.max_steps
        lr_multiplier(sched.pop("name", None), sched.pop("warmup", 0), max_steps(cfg), **sched)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_parallel(cfg)
    check_fsdp(cfg)
    _number(cfg, "sample.num_videos", 1, integer=True)  # the final sampling runs after fit: check it before
    _number(cfg, "sample.steps", 1, integer=True)
    return autoencoder


def check_fsdp(cfg: DictConfig) -> None:
    """FSDP2 (trainer=fsdp, fsdp_cpu) trains the plain model whole: not LoRA adapters (peft's layers), nor frozen
    tensors left out of checkpoints (finetune.freeze with init_from), which its full-state-dict loading needs; and
    not compiled (torch.compile's one-graph step stops at FSDP2's hooks)."""
    strategy = cfg.trainer.get("strategy")
    if not isinstance(strategy, DictConfig) or strategy.get("_target_") != "stale.parallel.strategies.HydraFSDP2Strategy":
        return
    if cfg.get("compile"):  # tried once: dynamo meets FSDP2's hooks inside the fullgraph training-step graph
        raise ConfigError(f"compile={cfg.compile} is not supported with trainer=fsdp / fsdp_cpu (FSDP2) yet: its "
                          "hooks break the one-graph training step; use compile=false")
    finetune = cfg.get("finetune") or {}
    if finetune.get("name") == "lora" or (finetune.get("freeze") and cfg.get("init_from")):
        what = "finetune=lora" if finetune.get("name") == "lora" else f"finetune.freeze={list(finetune.freeze)}"
        raise ConfigError(f"{what} is not supported with trainer=fsdp / fsdp_cpu (FSDP2) yet: use trainer=ddp / "
                          "ddp_cpu (docs/parallel.md)")


def check_parallel(cfg: DictConfig) -> None:
    """parallel.sequence: an integer, a strategy that can split a clip over ranks, at least one latent frame per
    rank, and one head per rank for full attention (docs/parallel.md)."""
    _number(cfg, "parallel.sequence", 1, integer=True)
    p = cfg.parallel.sequence
    if p == 1:
        return
    strategy = cfg.trainer.get("strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy)
    if target not in SEQUENCE_PARALLEL_STRATEGIES or strategy.get("sequence_parallel") != p:
        raise ConfigError(f"parallel.sequence={p} needs a multi-process trainer that splits clips over ranks: "
                          f"trainer=ddp_cpu / fsdp_cpu (CPU processes) or trainer=ddp / fsdp (GPUs), not trainer.strategy="
                          f"{target or strategy!r}")
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int) and (devices * nodes) % p:
        raise ConfigError(f"parallel.sequence={p} must divide trainer.devices x trainer.num_nodes = {devices * nodes}")
    node = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("_target_", "name")}
    model = StaleConfig(**{**SIZES.get(cfg.model.name, {}), **node})  # what build_model builds (it names a bad size)
    latent_frames = model.frames // model.patch[0]
    if latent_frames < p:
        raise ConfigError(f"parallel.sequence={p} splits each clip's {latent_frames} latent frames over {p} ranks: "
                          f"use at most {latent_frames} (every rank needs a frame)")
    if "full" in model.modes and model.heads < p:
        raise ConfigError(f"parallel.sequence={p} with full attention splits model.heads={model.heads} over the "
                          f"ranks (Ulysses): use at most {model.heads}")


def check_buckets(cfg: DictConfig, patch: list, autoencoder) -> None:
    """data.buckets: a preset or a list of pixel clips, every one of which the model's patch divides: directly in
    pixel space, and with vae=... after the autoencoder, which must take each bucket: latents encoded on the fly, or
    a stale-encode cache's buckets (check_autoencoder copied them from its info.json)."""
    from stale.data.buckets import BucketError, parse_buckets

    buckets = cfg.data.buckets
    try:
        parsed = parse_buckets(OmegaConf.to_container(buckets) if OmegaConf.is_config(buckets) else buckets,
                               tuple(patch) if autoencoder is None else None)
    except BucketError as e:
        raise ConfigError(str(e)) from None
    grids = [(b.frames, b.height, b.width) for b in parsed]  # the model's input clips
    if autoencoder is not None:
        from stale.latent.autoencoder import AutoencoderError

        for i, b in enumerate(parsed):
            try:
                grids[i] = autoencoder.latent_grid(b.frames, b.height, b.width, key=f"data.buckets[{i}]")
            except AutoencoderError as e:
                raise ConfigError(f"{e} (the bucket {b.name})") from None
            if any(n % p for n, p in zip(grids[i], patch)):
                raise ConfigError(f"data.buckets[{i}]: the bucket {b.name} is the latent clip "
                                  f"{'x'.join(map(str, grids[i]))} through {autoencoder.cls}, which model.patch={patch} "
                                  "does not divide")
    if cfg.model.get("pos_base") is None:
        side = round(max(h * w for _, h, w in grids) ** 0.5 / patch[1])
        log.warning("data.buckets with model.pos_base=null: integer positions (sin-cos or RoPE) held up far worse than "
                    "resolution-scaled ones on grids not trained on (docs/buckets.md); consider model.pos_base=%d "
                    "(the largest bucket's grid side)", side)


def _is_latent_data(cfg: DictConfig) -> bool:
    return str(cfg.data.get("_target_", "")).endswith("LatentDataModule")


def check_autoencoder(cfg: DictConfig):
    """vae=diffusers: load the autoencoder (a bad vae.pretrained stops here, naming the path), check the pixel
    clip against its shape rules (naming the key and the nearest valid values) and write what follows into the
    config, so that the checkpoint and the export record it: model.in_channels/frames/size (the latent clip),
    vae.shift/scale/sha256 (the normalisation and the weights) and diffusion.prior_scale (sqrt(3) when null:
    docs/latent.md). Returns the Autoencoder, or None in pixel space."""
    vae = cfg.get("vae") or {}
    if vae.get("name", "none") in ("none", None):
        if _is_latent_data(cfg):
            raise ConfigError("data=latents holds latents of an autoencoder: add vae=diffusers "
                              "vae.pretrained=<the folder or hub id stale-encode used>")
        return None
    if vae.get("name") != "diffusers":
        raise ConfigError(f"vae.name={vae.get('name')!r}: use vae=none or vae=diffusers")
    try:
        from stale.latent.autoencoder import AutoencoderError, load_autoencoder
        from stale.latent.cache import CacheError, cache_buckets, cache_info
    except ImportError as e:
        raise ConfigError(f"vae=diffusers needs the latent extra: pip install 'stale[latent]' ({e})") from None
    if OmegaConf.is_missing(vae, "pretrained") or not vae.get("pretrained"):
        raise ConfigError("vae=diffusers needs vae.pretrained=<a diffusers autoencoder folder or hub id>")
    node = OmegaConf.to_container(vae, resolve=True)
    node.pop("name")
    info = None
    if _is_latent_data(cfg):
        try:
            info, info_path = cache_info(cfg.data.shards, "data.shards")
        except (CacheError, ValueError) as e:
            raise ConfigError(str(e)) from None
        for key in ("frames", "size"):
            if cfg.data.get(key) is not None and cfg.data[key] != info[key]:
                raise ConfigError(f"data.{key}={cfg.data[key]}, but the cache {info_path} holds clips of {key} "
                                  f"{info[key]}: leave data.{key} unset with data=latents, or encode again")
        buckets = cfg.data.get("buckets")
        try:  # a cache encoded with buckets trains with them: data.buckets may only repeat its list
            buckets = cache_buckets(info, info_path, OmegaConf.to_container(buckets) if OmegaConf.is_config(buckets)
                                    else buckets)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        with open_dict(cfg):
            cfg.data.frames, cfg.data.size, cfg.data.buckets = info["frames"], info["size"], buckets
        if node.get("stats") is None:
            node["stats"] = info["stats"]
    try:
        autoencoder = load_autoencoder(**node)
        if info is not None and info["vae"]["sha256"] != autoencoder.source["sha256"]:
            raise ConfigError(f"data.shards: the cache {info_path} was encoded by the autoencoder at "
                              f"{info['vae']['pretrained']!r} (weights sha256 {info['vae']['sha256'][:12]}...), "
                              f"but vae.pretrained={vae.pretrained!r} holds other weights "
                              f"({autoencoder.source['sha256'][:12]}...)")
        c, t, h, _ = autoencoder.latent_shape(cfg.data.frames, cfg.data.size)
    except AutoencoderError as e:
        raise ConfigError(str(e)) from None
    with open_dict(cfg):
        cfg.model.in_channels, cfg.model.frames, cfg.model.size = c, t, h
        cfg.vae.shift = [float(v) for v in autoencoder.shift]
        cfg.vae.scale = [float(v) for v in autoencoder.scale]
        cfg.vae.sha256 = autoencoder.source["sha256"]
        cfg.vae.normalization = autoencoder.normalization
        if cfg.diffusion.get("prior_scale") is None:
            cfg.diffusion.prior_scale = math.sqrt(3.0)
    return autoencoder


def check_text_node(cfg: DictConfig) -> None:
    """model.cond and text_encoder agree, and the data can carry captions; the encoder loads in load_text."""
    cond = cfg.model.get("cond", "label")
    name = (cfg.get("text_encoder") or {}).get("name", "none")
    if cond not in ("label", "text"):
        raise ConfigError(f"model.cond={cond!r} is not one of label, text")
    if cond == "text" and name in ("none", None):
        raise ConfigError("model.cond=text needs a text encoder: text_encoder=hf text_encoder.pretrained=DIR_OR_HUB_ID, "
                          "or text_encoder=learned (no download)")
    if cond == "label" and name not in ("none", None):
        raise ConfigError(f"text_encoder={name} conditions on captions: add model.cond=text")
    if name not in ("none", None, "hf", "learned"):
        raise ConfigError(f"text_encoder.name={name!r} is not one of none, hf, learned")
    if cond == "text" and name == "hf" and (OmegaConf.is_missing(cfg.text_encoder, "pretrained")
                                            or not cfg.text_encoder.get("pretrained")):
        raise ConfigError("text_encoder=hf needs text_encoder.pretrained=<a transformers folder or hub id>")


def load_text(cfg: DictConfig, datamodule=None):
    """model.cond=text: load (hf) or build (learned: a vocabulary of the training captions) the text encoder, write
    what follows into the config (model.text_dim/text_len/text_vocab, text_encoder.sha256/words) so that the
    checkpoint and the export record it, and return (encoder, the empty caption's encoding); (None, None) else.
    A stale-encode cache with caption embeddings must have been made by the same encoder (weights hash)."""
    if cfg.model.get("cond", "label") != "text":
        return None, None
    from stale.text.encoders import TextEncoderError, build_vocabulary, load_text_encoder

    node = OmegaConf.to_container(cfg.text_encoder, resolve=True)
    if node["name"] == "learned" and not node.get("words"):
        if datamodule is None:
            raise ConfigError("text_encoder=learned builds its vocabulary from the training shards: pass the datamodule")
        from stale.data.captions import read_captions

        captions = read_captions(datamodule.train_urls, "data.shards", node.get("vocab_captions"))
        if not captions:
            raise ConfigError("text_encoder=learned: the training shards hold no caption (.txt or .json 'caption')")
        node["words"] = build_vocabulary(captions, int(node.get("max_words", 5000)))
    try:
        encoder = load_text_encoder(node)
    except TextEncoderError as e:
        raise ConfigError(str(e)) from None
    with open_dict(cfg):
        cfg.text_encoder.sha256 = encoder.source["sha256"]
        cfg.model.text_len = encoder.max_length
        if node["name"] == "learned":
            cfg.text_encoder.words = list(encoder.words)
            cfg.model.text_vocab, cfg.model.text_layers = encoder.vocab_size, int(node.get("layers", 2))
            cfg.model.text_dim = 0  # the model's width
        else:
            cfg.model.text_dim, cfg.model.text_vocab = encoder.dim, 0
    cached = getattr(datamodule, "text_info", None)  # a stale-encode cache with caption embeddings
    if cached is not None:
        if cached["sha256"] != encoder.source["sha256"] or cached["max_length"] != encoder.max_length:
            raise ConfigError(f"data.shards: the cache's captions were encoded by {cached['pretrained']!r} "
                              f"(sha256 {cached['sha256'][:12]}..., max_length {cached['max_length']}), not by "
                              f"text_encoder.pretrained={cfg.text_encoder.pretrained!r} (sha256 "
                              f"{encoder.source['sha256'][:12]}..., max_length {encoder.max_length})")
        return encoder, datamodule.empty_text
    return encoder, encoder.empty()


def thread_tuner(cfg: DictConfig) -> ThreadTuner | None:
    """cfg.threads on CPU: an integer sets torch's threads now; auto returns a ThreadTuner that measures 1 thread
    against this process's share of the cores in the first steps (unless $OMP_NUM_THREADS chose); null keeps
    torch's default (one per core)."""
    threads = cfg.get("threads", "auto")
    if threads is None or _accelerator_is_cuda(cfg) or (threads == "auto" and os.environ.get("OMP_NUM_THREADS")):
        return None
    if threads == "auto":
        devices = cfg.trainer.get("devices", 1)
        share = max(1, (os.cpu_count() or 1) // (devices if isinstance(devices, int) and devices > 0 else 1))
        return ThreadTuner(sorted({1, share})) if share > 1 else None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads={threads!r} must be auto, null or an integer >= 1")
    torch.set_num_threads(threads)
    return None


def max_steps(cfg: DictConfig) -> int:
    """The step count the trainer is built with: trainer.max_steps, or with trainer.max_steps=null the most
    a training deadline may plan (deadline.max_steps); the deadline lowers it once it has measured the rate."""
    return cfg.trainer.max_steps if cfg.trainer.max_steps is not None else cfg.deadline.max_steps


def build_system(cfg: DictConfig, autoencoder=None, text=(None, None)) -> StaleSystem:
    """The system of a (checked) config; `autoencoder` is check_config's, else loaded from the resolved vae node;
    `text` is load_text's (encoder, empty caption encoding)."""
    model = instantiate(cfg.model, _convert_="all")
    finetune = OmegaConf.to_container(cfg.finetune, resolve=True) if cfg.get("finetune") else None
    try:  # init_from (weights into a possibly different model), then what trains: stale/checkpoint/weights.py
        prepared = prepare(model, finetune, cfg.get("init_from"), bool(cfg.get("init_from_strict", True)))
    except ValueError as e:  # InitFromError, CheckpointError, a bad finetune node
        raise ConfigError(str(e)) from None
    objective = instantiate(cfg.diffusion, caption_dropout=cfg.data.get("caption_dropout", 0.1))
    vae = cfg.get("vae") or {}
    if autoencoder is None and vae.get("name") == "diffusers":
        from stale.latent.autoencoder import load_autoencoder

        autoencoder = load_autoencoder(**{k: v for k, v in OmegaConf.to_container(vae, resolve=True).items()
                                          if k != "name"})
    compile_opts = cfg.get("compile", False)
    system = StaleSystem(model, objective, **OmegaConf.to_container(cfg.optim),
                         schedule=OmegaConf.to_container(cfg.schedule, resolve=True),
                         seed=cfg.seed,
                         compile=OmegaConf.to_container(compile_opts) if isinstance(compile_opts, DictConfig)
                         else compile_opts,
                         provenance=provenance(),
                         finetune_base=prepared.base,
                         run_config=OmegaConf.to_container(cfg, resolve=True), autoencoder=autoencoder,
                         text_encoder=text[0], empty_text=text[1], prompts=cfg.sample.get("prompts"))
    system.clip_flops = clip_flops(cfg, system)  # each batch's FLOPs for ThroughputMonitor and the budget
    return system


def clip_flops(cfg: DictConfig, system: StaleSystem) -> Callable[[tuple[int, int, int]], float]:
    """Training FLOPs per clip as a function of the model input's (T, H, W): budget.flops_per_clip if set (the
    same for every shape), else the analytic count of stale.models.flops at that shape (buckets change it from
    batch to batch; with a vae the shape is the latent one)."""
    if cfg.budget.get("flops_per_clip") is not None:
        fixed = float(cfg.budget.flops_per_clip)
        return lambda thw: fixed
    config = system.model.config
    # the label-free hinge branch runs forward + backward on hinge_fraction of the batch (model.cond=text: twice,
    # each clip with its own caption and with another's)
    passes = 2 if config.cond == "text" else 1
    factor = 1 + passes * system.objective.hinge_fraction if system.objective.hinge_weight > 0 else 1.0

    @functools.lru_cache(maxsize=None)
    def flops(thw: tuple[int, int, int]) -> float:
        return factor * float(training_flops_per_clip(config, frames=thw[0], size=(thw[1], thw[2])))

    return flops


def build_callbacks(cfg: DictConfig, system: StaleSystem) -> list[L.Callback]:
    """The callbacks group (Lightning's own: EMA, checkpoints, lr and throughput monitors; sampling), then the
    NaN guard and the compute budget. Lightning moves checkpoint callbacks last, after every other hook."""
    callbacks = []
    has_logger = any(node is not None for node in (cfg.get("logger") or {}).values())
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if not has_logger and name in NEEDS_LOGGER:
            continue  # logger=none: these callbacks refuse to run without a logger
        kwargs = {}
        if name == "ema" and node.get("device", None) is None and _accelerator_is_cuda(cfg):
            # the model is still on the CPU when the callback copies it; keep the average on the GPU
            kwargs["device"] = "cuda"
        callbacks.append(instantiate(node, **kwargs))
    callbacks.append(instantiate(cfg.nan_guard))
    config = system.model.config  # the budget plans with the model's own clip
    callbacks.append(instantiate(cfg.budget, flops_per_clip=system.clip_flops((config.frames, config.size, config.size))))
    tuner = thread_tuner(cfg)
    if tuner is not None:
        callbacks.append(tuner)
    if cfg.trainer.max_steps is None:  # a deadline, not a step count (the CPU default: conf/trainer/cpu.yaml)
        callbacks.append(instantiate(cfg.deadline, out_dir=cfg.paths.output_dir))
    return callbacks


def _checkpoint_io(cfg: DictConfig) -> dict:
    """SafeCheckpointIO (clear disk-full errors) unless plugins are configured (FSDP2's full-file checkpoints use it
    too; its distributed ones, save_distributed_checkpoint=true, are written by torch.distributed.checkpoint)."""
    if cfg.trainer.get("plugins") is not None:
        return {}
    return {"plugins": [SafeCheckpointIO()]}


def _accelerator_is_cuda(cfg: DictConfig) -> bool:
    acc = str(cfg.trainer.get("accelerator", "auto"))
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def train(cfg: DictConfig, datamodule: L.LightningDataModule | None = None, callbacks: list | tuple = ()) -> dict:
    """Fit a system as configured and return the final metrics. For notebooks and tests, `datamodule`
    replaces cfg.data and `callbacks` are added to the configured ones."""
    out = Path(cfg.paths.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    autoencoder = check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    text = cfg.model.get("cond", "label") == "text"
    if datamodule is None and text:  # the data first: the learned encoder's vocabulary comes from its captions
        datamodule = instantiate(cfg.data, _convert_="all", captions=True)
    system = build_system(cfg, autoencoder, load_text(cfg, datamodule))
    callbacks = build_callbacks(cfg, system) + list(callbacks)
    budget = next(c for c in callbacks if isinstance(c, ComputeBudget))
    loggers = _loggers(cfg, out)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     max_steps=max_steps(cfg), **_checkpoint_io(cfg))
    if budget.max_flops is not None:  # the schedule decays to its floor where the FLOP budget ends
        clips_per_step = (cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * trainer.world_size
                          // cfg.parallel.sequence)  # the ranks of a sequence-parallel group share clips
        affordable = budget.max_steps_within(clips_per_step)
        warmup = int(cfg.schedule.get("warmup", 0))
        if affordable <= warmup:
            raise ConfigError(f"budget.max_flops={budget.max_flops:.4g} pays for {affordable} steps of "
                              f"{budget.flops_per_clip * clips_per_step:.4g} FLOPs, not more than "
                              f"schedule.warmup={warmup}")
        system.schedule_steps = min(max_steps(cfg), affordable)
    # _convert_: plain lists in the DataModule's hparams, so checkpoints load with weights_only=True
    datamodule = datamodule if datamodule is not None else instantiate(cfg.data, _convert_="all")
    if text:
        datamodule.hparams.captions = True
    n_params = sum(p.numel() for p in system.model.parameters())
    n_train = sum(p.numel() for p in system.model.parameters() if p.requires_grad)
    log.info("model %s: %.2fM parameters (%s trainable); outputs in %s", cfg.model.name, n_params / 1e6,
             f"{n_train:,}", out)

    preempt = next((c for c in callbacks if isinstance(c, PreemptionCheckpoint)), None)
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:  # PreemptionCheckpoint saved last.ckpt in on_exception: a clean stop, not a failure
        if preempt is None:
            raise
    if preempt is not None and preempt.stopped_by:
        if trainer.is_global_zero:
            print(preempt.report(trainer.global_step))
        return {"stopped_by_signal": 1.0, "step": float(trainer.global_step)}

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        report = {"run dir": out, "checkpoint": out / "checkpoints" / "last.ckpt", "steps": trainer.global_step,
                  "spend": budget.summary(), **({"stopped by": budget.stop_reason} if budget.stop_reason else {})}
        report.update(system.loss_summary())
        for c in callbacks:
            if isinstance(c, TrainingDeadline):
                report.update(c.summary())
        report.update(_sample_and_save(cfg, system, out, loggers, trainer.global_step))
        for lg in loggers:
            if type(lg).__name__ == "CSVLogger":
                lg.save()
                report["metrics csv"] = Path(lg.log_dir) / "metrics.csv"
            if type(lg).__name__ == "WandbLogger":
                report["wandb run"] = Path(lg.experiment.dir).parent
                lg.experiment.finish()
        print("\nstale-train finished. Outputs:")
        for k, v in report.items():
            print(f"  {k:<15} {v}")
    return metrics


def _sample_and_save(cfg: DictConfig, system: StaleSystem, out: Path, loggers: list, step: int) -> dict:
    """Sample with the EMA weights (the EMA callback copied them into the model at the end of fit)."""
    s = cfg.sample
    paths = sample_to_disk(system, out / "samples", num_videos=s.num_videos, steps=s.steps, sampler=s.sampler,
                           guidance=s.guidance, seed=s.seed, progress=s.get("progress", False),
                           classifier_guidance=s.get("classifier_guidance", 0.0), prompts=system.prompts)
    log_videos(loggers, paths, step)
    return {"samples": out / "samples", "contact sheet": paths["contact_sheet"], "gif grid": paths["gif"]}
