"""Safe loading: checkpoints only through torch.load(weights_only=True), exports only allow-listed classes.

A checkpoint carrying a pickle whose __reduce__ runs code must be refused with a message naming the file,
and the code must not run; a config.json naming a class outside the allow-list must be refused before
anything is built. (The real stale-train checkpoint loading with weights_only=True is in test_export.py.)
"""

import json

import pytest
import torch

from stale.checkpoint import (
    CheckpointError,
    DisallowedTargetError,
    UnsafeCheckpointError,
    load_checkpoint,
    read_checkpoint,
)
from stale.export import export_checkpoint, save_pretrained
from stale.models import build_model
from stale.pipeline import StalePipeline

MODEL_NODE = {
    "_target_": "stale.models.build_model",
    "name": "tiny",
    "dim": 32,
    "depth": 2,
    "heads": 2,
    "frames": 4,
    "size": 8,
    "num_classes": 3,
}


class Payload:
    """Unpickling this runs `code` (pickle calls exec(code)): the classic malicious-checkpoint payload."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def checkpoint_dict(**extra) -> dict:
    """The layout stale-train writes (EMA in state_dict, raw in current_model_state, run_config in hparams)."""
    kwargs = {k: v for k, v in MODEL_NODE.items() if k != "_target_"}
    state = {f"model.{k}": v for k, v in build_model(**kwargs).state_dict().items()}
    return {
        "state_dict": state,
        "current_model_state": state,
        "global_step": 0,
        "epoch": 0,
        "hyper_parameters": {"run_config": {"model": dict(MODEL_NODE), "sample": {"steps": 2}}},
        **extra,
    }


@pytest.fixture
def evil_ckpt(tmp_path):
    marker = tmp_path / "payload-ran"
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('pwned')"
    path = tmp_path / "evil.ckpt"
    ckpt = checkpoint_dict()
    ckpt["hyper_parameters"]["evil"] = Payload(code)  # hidden deep inside an otherwise valid checkpoint
    torch.save(ckpt, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize(
    "load",
    [
        load_checkpoint,
        read_checkpoint,
        lambda p: StalePipeline.from_checkpoint(p),
        lambda p: export_checkpoint(p, p.parent / "export"),
    ],
    ids=["load_checkpoint", "read_checkpoint", "from_checkpoint", "export_checkpoint"],
)
def test_malicious_checkpoint_is_refused_and_never_runs(evil_ckpt, load):
    path, marker = evil_ckpt
    with pytest.raises(UnsafeCheckpointError) as err:
        load(path)
    message = str(err.value)
    assert str(path) in message and "global `exec`" in message and "refused" in message
    assert "weights_only=False" not in message  # we do not advise the unsafe way out
    assert not marker.exists(), "the payload ran"
    assert not (path.parent / "export").exists()


def test_payload_is_live(evil_ckpt):
    """Control: the same file, unpickled the unsafe way, does run the payload. So the test above can fail."""
    path, marker = evil_ckpt
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_plain_checkpoint_loads(tmp_path):
    torch.save(checkpoint_dict(), tmp_path / "ok.ckpt")
    ckpt = read_checkpoint(tmp_path / "ok.ckpt", weights="raw")
    assert ckpt.run_config["model"]["dim"] == 32 and "patch_embed.weight" in ckpt.state_dict
    assert ckpt.build_model().config.dim == 32


def test_unreadable_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.ckpt is not a readable PyTorch checkpoint") as err:
        load_checkpoint(tmp_path / "junk.ckpt")
    assert not isinstance(err.value, UnsafeCheckpointError)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="foreign.ckpt has no hyper_parameters.run_config.model"):
        read_checkpoint(tmp_path / "foreign.ckpt")
    no_ema = checkpoint_dict()
    del no_ema["current_model_state"]
    torch.save(no_ema, tmp_path / "no_ema.ckpt")
    with pytest.raises(CheckpointError, match="no_ema.ckpt has no EMA weights"):
        read_checkpoint(tmp_path / "no_ema.ckpt", weights="ema")
    assert read_checkpoint(tmp_path / "no_ema.ckpt", weights="raw").weights == "raw"


@pytest.fixture
def export_dir(tmp_path):
    kwargs = {k: v for k, v in MODEL_NODE.items() if k != "_target_"}
    save_pretrained(build_model(**kwargs), tmp_path / "export", diffusion={"prior": "uniform"})
    return tmp_path / "export"


@pytest.mark.parametrize("where", ["model", "diffusion", "extra"])
def test_config_naming_a_class_outside_the_allow_list_is_refused(export_dir, tmp_path, where):
    victim = tmp_path / "made-by-the-config"  # os.makedirs(name=...) would create it if it were ever called
    cfg_path = export_dir / "config.json"
    config = json.loads(cfg_path.read_text())
    evil = {"_target_": "os.makedirs", "name": str(victim)}
    if where == "extra":
        config["sample"]["callback"] = evil  # a node StalePipeline does not even build
    else:
        config[where] = {**evil, **{k: v for k, v in config[where].items() if k != "_target_"}}
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(DisallowedTargetError) as err:
        StalePipeline.from_pretrained(export_dir)
    message = str(err.value)
    assert str(cfg_path) in message and "'os.makedirs' is not an allowed stale class" in message
    assert "stale.models.build_model" in message  # says what is allowed
    assert not victim.exists()


def test_checkpoint_run_config_is_allow_listed_too(tmp_path):
    """A checkpoint's run_config is data as well: it is never given to hydra.utils.instantiate."""
    victim = tmp_path / "made-by-the-checkpoint"
    ckpt = checkpoint_dict()
    ckpt["hyper_parameters"]["run_config"]["model"] = {**MODEL_NODE, "_target_": "os.makedirs", "name": str(victim)}
    torch.save(ckpt, tmp_path / "odd.ckpt")
    with pytest.raises(DisallowedTargetError, match="odd.ckpt: run_config.model: _target_='os.makedirs'"):
        read_checkpoint(tmp_path / "odd.ckpt").build_model()
    assert not victim.exists()


def test_omegaconf_objects_in_a_checkpoint_are_refused_with_the_fix(tmp_path):
    """What stale-train's checkpoint holds when data.shards is a list and the data module receives Hydra's
    ListConfig: save_hyperparameters() stores it, and weights_only loading refuses the whole file."""
    from omegaconf import OmegaConf

    ckpt = checkpoint_dict(datamodule_hyper_parameters={"shards": OmegaConf.create(["a.tar", "b.tar"])})
    torch.save(ckpt, tmp_path / "listconfig.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="omegaconf.listconfig.ListConfig") as err:
        read_checkpoint(tmp_path / "listconfig.ckpt")
    assert "store plain Python containers" in str(err.value)
