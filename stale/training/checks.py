"""The checks that span config nodes, in one place: what no single constructor can see, before any data is
generated or a step is taken. A value's own range is checked by the constructor that takes it (StaleConfig,
StaleObjective, StaleSystem, the callbacks, the data modules); these check keys against the schema, one node
against another, and Lightning's trainer arguments, which its Trainer does not range-check.

check_composed(cfg) needs nothing loaded; check_clip and check_model run once the frozen parts are resolved
(stale/training/resolve.py), on the autoencoder's latent clip and the model's StaleConfig.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stale.checkpoint.weights import check_base
from stale.data.buckets import BucketError, parse_buckets
from stale.models import MODEL_NODES, StaleConfig, config_of
from stale.models.finetune import require_peft
from stale.system.stale_system import StaleSystem
from stale.text.encoders import TextEncoderError, text_encoder_kind
from stale.utils.schema import MOVED_KEYS, UnknownKeyError, check_train_keys, target_keys, unknown_key_message

log = logging.getLogger("stale")

# strategies with a sequence_parallel argument (stale/parallel/mesh.py)
SEQUENCE_PARALLEL_STRATEGIES = (
    "stale.parallel.strategies.HydraDDPStrategy",
    "stale.parallel.strategies.HydraFSDP2Strategy",
)
FSDP2_STRATEGY = "stale.parallel.strategies.HydraFSDP2Strategy"
PRECISIONS = ("32", "32-true", "bf16-mixed")  # fp16 needs loss scaling, whose skipped steps the NaN guard would count


class ConfigError(ValueError):
    """A config value that cannot work; raised before training starts, naming the key."""


def number(
    cfg: DictConfig,
    key: str,
    low: float | None = None,
    *,
    strict: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """The value at dotted `key` is a number (>= low, or > low when strict)."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
    if low is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{key}={value!r} must be {'>' if strict else '>='} {low}")


def max_steps(cfg: DictConfig) -> int:
    """The step count the trainer is built with: trainer.max_steps, or with trainer.max_steps=null the most a
    training deadline may plan (deadline.max_steps); the deadline lowers it once it has measured the rate."""
    return cfg.trainer.max_steps if cfg.trainer.max_steps is not None else cfg.deadline.max_steps


def is_latent_data(cfg: DictConfig) -> bool:
    return str(cfg.data.get("_target_", "")).endswith("LatentDataModule")


def has_autoencoder(cfg: DictConfig) -> bool:
    """vae=diffusers (a node with a _target_); vae=none is the empty node: pixel space."""
    return bool((cfg.get("vae") or {}).get("_target_"))


def build(node: DictConfig, **kwargs):
    """instantiate(node), with the constructor's own ValueError (naming the key) as a ConfigError instead of
    Hydra's InstantiationException around it."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        raise ConfigError(str(cause) if isinstance(cause, ValueError) else str(e)) from None


def check_composed(cfg: DictConfig) -> None:
    """Every check that needs nothing loaded: the key schema, files named by the config, the trainer, the
    schedule against the step count, the strategy against parallelism, and the text and vae nodes' agreement."""
    check_keys(cfg)
    check_files(cfg)
    check_trainer(cfg)
    check_schedule(cfg)
    check_parallel(cfg)
    check_fsdp(cfg)
    check_nodes(cfg)


def check_keys(cfg: DictConfig) -> None:
    """A misspelt key would otherwise train with the default (stale/utils/schema.py); a key that moved names its
    new place."""
    for old in MOVED_KEYS:
        if OmegaConf.select(cfg, old) is not None:
            path, _, key = old.rpartition(".")
            raise ConfigError(unknown_key_message(path, key, set()))
    target = OmegaConf.select(cfg, "model._target_") or "stale.models.build_model"
    keys = {"model": MODEL_NODES[target][1]} if target in MODEL_NODES else {}  # the model config's fields
    if OmegaConf.select(cfg, "optim._target_"):  # the optimiser's arguments, less what the system passes it
        keys["optim"] = (target_keys(cfg.optim._target_) or set()) - set(StaleSystem.OPTIMIZER_ARGS)
    try:
        check_train_keys(cfg, keys)
    except UnknownKeyError as e:
        raise ConfigError(str(e)) from None


def check_files(cfg: DictConfig) -> None:
    """ckpt_path and init_from exist; LoRA has its frozen base and peft."""
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    if cfg.get("init_from") and not Path(cfg.init_from).exists():
        raise ConfigError(
            f"init_from={cfg.init_from!r} does not exist (a stale-train checkpoint or a stale-export folder)"
        )
    finetune = OmegaConf.to_container(cfg.finetune, resolve=True) if cfg.get("finetune") else None
    try:
        if check_base(finetune, cfg.get("init_from"), bool(cfg.model.get("pretrained"))).lora:
            require_peft()
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None


def check_trainer(cfg: DictConfig) -> None:
    """Lightning's Trainer arguments, which it does not range-check, and the final sampling's settings (it runs
    after fit: a bad value would throw the run's samples away)."""
    if cfg.trainer.max_steps is None and (cfg.get("deadline") or {}).get("max_minutes") is None:
        raise ConfigError(
            "trainer.max_steps=null lets a training deadline decide the step count, but "
            "deadline.max_minutes is null: set one of them"
        )
    steps_key = "deadline.max_steps" if cfg.trainer.max_steps is None else "trainer.max_steps"
    number(cfg, steps_key, 0, strict=True, integer=True)  # streams have no epochs
    number(cfg, "trainer.accumulate_grad_batches", 1, integer=True)
    number(cfg, "trainer.gradient_clip_val", 0, optional=True)  # 0 or null: no clipping
    if str(cfg.trainer.get("precision")) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.get('precision')!r} is not one of {PRECISIONS}")
    number(cfg, "data.batch_size", 1, integer=True)  # x accumulation x devices: the clips a budget step pays for
    number(cfg, "sample.num_videos", 1, integer=True)
    number(cfg, "sample.steps", 1, integer=True)


def check_schedule(cfg: DictConfig) -> None:
    """The schedule's own ranges (its constructor), and its warmup against the step count."""
    try:
        build(cfg.schedule).check_total(max_steps(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _strategy_target(cfg: DictConfig) -> str:
    strategy = cfg.trainer.get("strategy")
    return str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy)


def check_parallel(cfg: DictConfig) -> None:
    """parallel.sequence: an integer, with a strategy that splits clips over ranks and divides the devices (the
    model's frames and heads are checked against it in check_model)."""
    number(cfg, "parallel.sequence", 1, integer=True)
    p = cfg.parallel.sequence
    if p == 1:
        return
    target = _strategy_target(cfg)
    if target not in SEQUENCE_PARALLEL_STRATEGIES or cfg.trainer.strategy.get("sequence_parallel") != p:
        raise ConfigError(
            f"parallel.sequence={p} needs a multi-process trainer that splits clips over ranks: "
            f"trainer=ddp_cpu / fsdp_cpu (CPU processes) or trainer=ddp / fsdp (GPUs), not trainer.strategy="
            f"{target or cfg.trainer.get('strategy')!r}"
        )
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int) and (devices * nodes) % p:
        raise ConfigError(f"parallel.sequence={p} must divide trainer.devices x trainer.num_nodes = {devices * nodes}")


def check_fsdp(cfg: DictConfig) -> None:
    """FSDP2 (trainer=fsdp, fsdp_cpu) trains the plain model whole: not LoRA adapters (peft's layers), nor frozen
    tensors left out of checkpoints (finetune.freeze with init_from), which its full-state-dict loading needs; and
    not compiled (torch.compile's one-graph step stops at FSDP2's hooks)."""
    if _strategy_target(cfg) != FSDP2_STRATEGY:
        return
    if cfg.get("compile"):  # tried once: dynamo meets FSDP2's hooks inside the fullgraph training-step graph
        raise ConfigError(
            f"compile={cfg.compile} is not supported with trainer=fsdp / fsdp_cpu (FSDP2) yet: its "
            "hooks break the one-graph training step; use compile=false"
        )
    finetune = cfg.get("finetune") or {}
    if finetune.get("name") == "lora" or (finetune.get("freeze") and cfg.get("init_from")):
        what = "finetune=lora" if finetune.get("name") == "lora" else f"finetune.freeze={list(finetune.freeze)}"
        raise ConfigError(
            f"{what} is not supported with trainer=fsdp / fsdp_cpu (FSDP2) yet: use trainer=ddp / "
            "ddp_cpu (docs/parallel.md)"
        )


def check_nodes(cfg: DictConfig) -> None:
    """The vae and text_encoder nodes agree with the data and with model.cond (StaleConfig checks cond itself)."""
    if not has_autoencoder(cfg) and is_latent_data(cfg):
        raise ConfigError(
            "data=latents holds latents of an autoencoder: add vae=diffusers "
            "vae.pretrained=<the folder or hub id stale-encode used>"
        )
    if has_autoencoder(cfg) and (OmegaConf.is_missing(cfg.vae, "pretrained") or not cfg.vae.get("pretrained")):
        raise ConfigError("vae=diffusers needs vae.pretrained=<a diffusers autoencoder folder or hub id>")
    cond = cfg.model.get("cond", "label")
    try:
        name = text_encoder_kind(cfg.get("text_encoder"))
    except TextEncoderError as e:
        raise ConfigError(str(e)) from None
    if cond == "text" and name is None:
        raise ConfigError(
            "model.cond=text needs a text encoder: text_encoder=hf text_encoder.pretrained=DIR_OR_HUB_ID, "
            "or text_encoder=learned (no download)"
        )
    if cond == "label" and name is not None:
        raise ConfigError(f"text_encoder={name} conditions on captions: add model.cond=text")
    if (
        cond == "text"
        and name == "hf"
        and (OmegaConf.is_missing(cfg.text_encoder, "pretrained") or not cfg.text_encoder.get("pretrained"))
    ):
        raise ConfigError("text_encoder=hf needs text_encoder.pretrained=<a transformers folder or hub id>")


def model_patch(cfg: DictConfig) -> tuple:
    """The patch of a model node that does not list it (a pretrained backbone's comes from its config.json)."""
    try:
        return config_of(OmegaConf.to_container(cfg.model, resolve=True)).patch
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def check_clip(cfg: DictConfig, autoencoder) -> None:
    """The model's clip (pixels, or the autoencoder's latent clip) and every bucket are divisible by model.patch;
    with an autoencoder every bucket must be a clip it takes. `cfg` is the resolved config."""
    patch = list(cfg.model.get("patch") or model_patch(cfg))
    frames, size = (cfg.model.frames, cfg.model.size) if autoencoder is not None else (cfg.data.frames, cfg.data.size)
    if frames % patch[0] or size % patch[1] or size % patch[2]:
        if autoencoder is not None:
            raise ConfigError(
                f"the latent clip of {frames} x {size} x {size} (data.frames={cfg.data.frames} and "
                f"data.size={cfg.data.size} through {autoencoder.cls}) must be divisible by "
                f"model.patch={patch}: choose a smaller model.patch or a larger clip"
            )
        raise ConfigError(f"data.frames={frames} and data.size={size} must be divisible by model.patch={patch}")
    if cfg.data.get("buckets") is not None:
        check_buckets(cfg, patch, autoencoder)


def check_buckets(cfg: DictConfig, patch: list, autoencoder) -> None:
    """data.buckets: a preset or a list of pixel clips, every one of which the model's patch divides: directly in
    pixel space, and with vae=... after the autoencoder, which must take each bucket: latents encoded on the fly, or
    a stale-encode cache's buckets (resolve copied them from its info.json)."""
    buckets = cfg.data.buckets
    try:
        parsed = parse_buckets(
            OmegaConf.to_container(buckets) if OmegaConf.is_config(buckets) else buckets,
            tuple(patch) if autoencoder is None else None,
        )
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
                raise ConfigError(
                    f"data.buckets[{i}]: the bucket {b.name} is the latent clip "
                    f"{'x'.join(map(str, grids[i]))} through {autoencoder.cls}, which model.patch={patch} "
                    "does not divide"
                )
    if cfg.model.get("pos_base") is None:
        side = round(max(h * w for _, h, w in grids) ** 0.5 / patch[1])
        log.warning(
            "data.buckets with model.pos_base=null: integer positions (sin-cos or RoPE) held up far worse than "
            "resolution-scaled ones on grids not trained on (docs/buckets.md); consider model.pos_base=%d "
            "(the largest bucket's grid side)",
            side,
        )


def check_model(cfg: DictConfig, model: StaleConfig) -> None:
    """The model's StaleConfig against parallelism: at least one latent frame per sequence-parallel rank, and one
    head per rank for full attention (Ulysses; docs/parallel.md)."""
    p = cfg.parallel.sequence
    if p > 1 and not getattr(model, "sequence_parallel", True):
        raise ConfigError(
            f"parallel.sequence={p} is not supported with a pretrained backbone ({model.family}) yet: shard it "
            "with trainer=fsdp (per transformer block) and gradient checkpointing (model.grad_checkpointing=true)"
        )
    latent_frames = model.frames // model.patch[0]
    if latent_frames < p:
        raise ConfigError(
            f"parallel.sequence={p} splits each clip's {latent_frames} latent frames over {p} ranks: "
            f"use at most {latent_frames} (every rank needs a frame)"
        )
    if p > 1 and "full" in model.modes and model.heads < p:
        raise ConfigError(
            f"parallel.sequence={p} with full attention splits model.heads={model.heads} over the "
            f"ranks (Ulysses): use at most {model.heads}"
        )
