"""Every private Lightning name stale uses (docs/training.md, "Private Lightning internals"), touched on real
Lightning objects: a Lightning upgrade that renames or removes one fails here, by name, not deep in a run."""

import inspect

import lightning as L
import torch
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy


def test_fit_time_internals(tmp_path):
    model, ema = BoringModel(), EMAWeightAveraging(use_buffers=False)
    assert model._trainer is None  # stale_system.py: "is a trainer attached?" (self.trainer raises when not)
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[ema],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    # preemption.py: the cluster environment, also under a single-device strategy (which has no such property)
    assert isinstance(trainer._accelerator_connector.cluster_environment, ClusterEnvironment)
    trainer.fit(model)
    assert model._trainer is trainer
    # sampling.py: the EMA copy of the LightningModule that sampling during training uses
    assert isinstance(ema._average_model, torch.optim.swa_utils.AveragedModel)
    assert type(ema._average_model.module) is BoringModel
    # ema.py under FSDP2: the step of the last update, which WeightAveraging's state_dict saves
    assert ema._latest_update_step == 2 and ema.state_dict() == {"latest_update_step": 2}
    # stale_system.py on_load_checkpoint: the logging-step counter in the checkpoint's loop state
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    loop = torch.load(tmp_path / "x.ckpt", weights_only=True)["loops"]["fit_loop"]["epoch_loop.state_dict"]
    assert loop["_batches_that_stepped"] == 2


def test_launcher_internals():
    """stale/parallel/strategies.py: HydraSubprocessLauncher subclasses Lightning's private subprocess launcher."""
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _basic_subprocess_cmd,
        _SubprocessScriptLauncher,
    )

    for name in ("_call_children_scripts", "_check_can_spawn_children", "launch"):
        assert callable(getattr(_SubprocessScriptLauncher, name)), name
    assert _ChildProcessObserver(main_pid=0, child_processes=[])._child_processes == []
    assert callable(_set_num_threads_if_needed) and isinstance(_basic_subprocess_cmd(), list)
    from lightning.fabric.plugins.environments import LightningEnvironment

    strategy = DDPStrategy(
        accelerator=L.pytorch.accelerators.CPUAccelerator(),
        cluster_environment=LightningEnvironment(),
        parallel_devices=[torch.device("cpu")] * 2,
    )
    strategy._configure_launcher()  # what _HydraLaunch overrides; it reads and replaces _launcher
    assert type(strategy._launcher) is _SubprocessScriptLauncher


def test_dataloader_teardown_protocol():
    """stale/data/loader.py exposes `_iterator`: Lightning's teardown stops workers through it."""
    from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator

    src = inspect.getsource(_shutdown_workers_and_reset_iterator)
    assert "_iterator" in src
    assert torch.utils.data.DataLoader(list(range(4)))._iterator is None
