"""The config schema: a misspelt key stops before training with the key, every allowed key and the nearest one."""

from importlib.resources import files

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from helpers import compose_train, run_cli
from stale.data.synthetic_module import SyntheticDataModule
from stale.train import ConfigError, check_config
from stale.utils.schema import _signature_keys


def _check(overrides):
    check_config(compose_train(*overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (files("stale.conf") / group).iterdir() if p.name.endswith(".yaml"))


# options that pass the key schema and then stop at the next check, which needs files they name
NEEDS_FILES = {
    ("data", "latents"): "data=latents holds latents",
    ("vae", "diffusers"): "needs vae.pretrained",
    ("model", "diffusers"): "model.cond=text needs a text encoder",
    ("backbone", "wan"): "Missing mandatory value: pipeline",
    ("backbone", "ltx"): "Missing mandatory value: pipeline",
}


@pytest.mark.parametrize(
    "group",
    ["model", "data", "trainer", "schedule", "logger", "diffusion", "debug", "hparams_search", "vae", "backbone"],
)
def test_every_shipped_config_passes_the_schema(group):
    for option in _options(group):
        extra = ["data.shards=/nowhere/train.tar"] if option in ("shards", "video2dataset") else []
        if (group, option) in NEEDS_FILES:  # the key schema is checked first: a later message means it passed
            with pytest.raises(ConfigError, match=NEEDS_FILES[group, option]):
                _check([f"{group}={option}", *extra])
            continue
        _check([f"{group}={option}", *extra])  # raises on any key the schema does not know


@pytest.mark.parametrize(
    "override, key, allowed, nearest",
    [
        ("+seeed=1", "seeed", "the root accepts budget, callbacks, ckpt_path", "seed"),
        (
            "+optim.lrr=0.1",
            "optim.lrr",
            "optim accepts amsgrad, betas, capturable, differentiable, eps, foreach, lr, maximize, weight_decay",
            "optim.lr",
        ),
        (
            "+diffusion.priorr=gaussian",
            "diffusion.priorr",
            "diffusion accepts caption_dropout, context_frames, context_prob, dog_bands",
            "diffusion.prior",
        ),
        ("+model.dimm=96", "model.dimm", "model accepts adaln, cond, depth, dim,", "model.dim"),
        ("+data.batchsize=4", "data.batchsize", "data accepts batch_size,", "data.batch_size"),
        (
            "+schedule.min_ration=0.2",
            "schedule.min_ration",
            "schedule accepts min_ratio, sharpness, warmup",
            "schedule.min_ratio",
        ),
        ("+trainer.max_stepz=3", "trainer.max_stepz", "trainer accepts accelerator,", "trainer.max_steps"),
        ("+sample.stepss=3", "sample.stepss", "sample accepts classifier_guidance, guidance,", "sample.steps"),
        (
            "+callbacks.samples.step=1",
            "callbacks.samples.step",
            "callbacks.samples accepts every_n_steps,",
            "callbacks.samples.steps",
        ),
    ],
)
def test_a_typo_names_the_key_the_allowed_keys_and_the_nearest(override, key, allowed, nearest):
    with pytest.raises(ConfigError) as err:
        _check([override])
    msg = str(err.value)
    assert f"unknown config key {key}:" in msg and allowed in msg and f"did you mean {nearest}?" in msg


def test_valid_additions_pass():
    _check(["model.dim=96", "+trainer.max_time=00:01:00:00"])  # StaleConfig field, Trainer argument


def test_signature_keys_follow_stale_kwargs_and_known_third_party_ones():
    keys = _signature_keys(SyntheticDataModule)  # **loader_kwargs go to VideoDataModule
    assert {"train_clips", "batch_size", "shuffle_buffer"} <= keys
    ddp = _signature_keys(DDPStrategy)  # its **kwargs go to DistributedDataParallel
    assert {"process_group_backend", "find_unused_parameters", "gradient_as_bucket_view"} <= ddp
    assert "module" not in ddp  # DDPStrategy passes the module itself
    assert _signature_keys(TensorBoardLogger) is None  # **kwargs to tensorboard's SummaryWriter, not followed: open


@pytest.mark.parametrize(
    "overrides, key, nearest",
    [
        (["logger=wandb", "+logger.wandb.projct=x"], "logger.wandb.projct", "logger.wandb.project"),  # -> wandb.init
        (
            ["trainer=ddp_cpu", "+trainer.strategy.find_unused_parameter=true"],
            "trainer.strategy.find_unused_parameter",
            "trainer.strategy.find_unused_parameters",
        ),  # -> DistributedDataParallel
        (["+callbacks.throughput.window=5"], "callbacks.throughput.window", "callbacks.throughput.window_size"),
    ],
)
def test_typos_in_keyword_arguments_lightning_passes_on_are_refused(overrides, key, nearest):
    """WandbLogger, DDPStrategy and ThroughputMonitor take **kwargs: a typo there used to pass the check and fail
    (or be ignored) once training had started."""
    with pytest.raises(ConfigError, match=rf"unknown config key {key}: .*did you mean {nearest}\?"):
        _check(overrides)
    _check(
        [
            "logger=wandb",
            "+logger.wandb.tags=[a]",
            "trainer=ddp_cpu",
            "+trainer.strategy.gradient_as_bucket_view=true",
            "callbacks.throughput.window_size=5",
        ]
    )  # the real ones pass


def test_cli_typo_without_plus_lists_the_allowed_keys(tmp_path):
    """Hydra refuses `optim.lrr=...` naming only the key (and suggests `+`); stale adds the allowed keys."""
    proc = run_cli("stale-train", "optim.lrr=0.1", f"hydra.run.dir={tmp_path}/run", check=False, timeout=120)
    assert proc.returncode != 0
    assert "Could not override 'optim.lrr'" in proc.stderr
    assert "unknown config key optim.lrr: optim accepts betas, lr, weight_decay; did you mean optim.lr?" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_typo_in_a_flat_app_is_refused(tmp_path):
    proc = run_cli("stale-eval", f"samples={tmp_path}", "real=x.tar", "+batchh=3", check=False, timeout=120)
    assert proc.returncode != 0
    assert "unknown config key batchh: the root accepts" in proc.stderr and "did you mean batch?" in proc.stderr


@pytest.mark.parametrize("size", ["debug", "tiny", "s", "b", "l", "xl"])
def test_width_depth_and_heads_are_keys_of_every_model_size(size):
    """`init_from=... model.depth=5` as docs/finetune.md writes it: dim, depth and heads are keys of the model node
    (null = the size's), so they are set without `+`; a key that is not a StaleConfig field still is refused."""
    from stale.models import SIZES, model_config

    cfg = compose_train(f"model={size}", "model.depth=5")
    node = {k: v for k, v in cfg.model.items() if k != "_target_"}
    node.update(frames=8, size=16, num_classes=4)
    config = model_config(**node)
    assert (config.depth, config.dim, config.heads) == (5, SIZES[size]["dim"], SIZES[size]["heads"])
    with pytest.raises(Exception, match="depthh"):
        compose_train(f"model={size}", "model.depthh=5")
