"""DDP and FSDP strategies that keep one Hydra output dir per run, also inside a Hydra multirun.

Lightning's subprocess launcher re-runs `sys.argv`, so under `stale-train -m a=1,2` every child rank would start
the whole sweep again (Lightning-AI/pytorch-lightning#11300, #18175). The launcher below starts each child as a
single run of exactly this job (`hydra_child_command`; docs/scaling.md), and when the trial's fit ends it reaps the
children, destroys the process group and restores the launch's environment variables, so the next trial of the
sweep launches afresh. Processes started by torchrun or SLURM are not launched here: for those, pass the same
`hydra.run.dir` to every rank (see scripts/).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import (
    _basic_subprocess_cmd,
    _SubprocessScriptLauncher,
)
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import OptimStateKeyType

from stale.parallel.fsdp import gathered_copy, is_sharded
from stale.parallel.mesh import SequenceParallelMixin

# Hydra overrides that describe the sweep, not the job: a child is a plain run of one job.
log = logging.getLogger(__name__)

_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_SWEEP_ONLY = (
    "hydra.mode",
    "hydra.run.",
    "hydra.sweep.",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.job.name",
    "hydra.output_subdir",
)


def hydra_child_command(local_rank: int) -> tuple[list[str], str]:
    """The command line and cwd that rerun the current Hydra job (run or multirun job) as one plain run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:  # a script or console entry point (`stale-train`)
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:  # `python -m stale.cli.train`
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hc.overrides.task)  # this job's overrides, sweep values already chosen
    command += [o for o in hc.overrides.hydra if not o.lstrip("~+").startswith(_SWEEP_ONLY)]
    out = str(hc.runtime.output_dir).replace("'", "\\'")  # a quoted Hydra value
    command += [
        "hydra.mode=RUN",
        f"hydra.run.dir='{out}'",
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
    ]
    return command, get_original_cwd()


class HydraSubprocessLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with `hydra_child_command` for the other local ranks, and a `finish`
    that leaves the launching process as it found it, so that the next trial of a sweep can launch again."""

    child_exit_timeout_s = 300.0

    def launch(self, function, *args, trainer=None, **kwargs):  # as Lightning's, keeping the watchdog thread
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        self._observer = None
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            # Lightning's watchdog: kills this process if a child dies during fit
            self._observer = _ChildProcessObserver(main_pid=os.getpid(), child_processes=self.procs)
            self._observer.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:  # as Lightning's, except for the Hydra command
        self._check_can_spawn_children()
        self.procs = []
        self._env_before = {k: os.environ.get(k) for k in _LAUNCH_ENV}
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        from hydra.core.hydra_config import HydraConfig

        for local_rank in range(1, self.num_processes):
            env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            command: Sequence[str]
            cwd = None
            if HydraConfig.initialized():
                command, cwd = hydra_child_command(local_rank)
            else:
                command = _basic_subprocess_cmd()
            log.info("starting rank %d: %s", local_rank, shlex.join(command))
            self.procs.append(subprocess.Popen(command, env=env, cwd=cwd))

    def finish(self, completed: bool) -> None:
        """On the launching rank, when fit ends: reap the children (after a completed fit let them exit; after
        a failure they may wait on this rank forever, so stop them), then drop the process group and restore
        the environment."""
        if not self.procs:
            return  # a child rank, or nothing was launched
        if self._observer is not None:
            self._observer._child_processes = []  # reaped here from now on: a child we stop must not kill us
        for proc in self.procs:
            if completed:
                try:
                    proc.wait(timeout=self.child_exit_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "rank process %d still running %.0f s after fit: stopping it",
                        proc.pid,
                        self.child_exit_timeout_s,
                    )
            if proc.poll() is None:
                proc.kill()
            if proc.wait() != 0 and completed:
                log.warning("rank process %d exited with code %d after fit", proc.pid, proc.returncode)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in self._env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.procs = []


class _HydraLaunch:
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = HydraSubprocessLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def teardown(self) -> None:
        trainer = getattr(self.lightning_module, "_trainer", None)
        completed = trainer is not None and trainer.state.status != TrainerStatus.INTERRUPTED
        super().teardown()
        if isinstance(self._launcher, HydraSubprocessLauncher):
            self._launcher.finish(completed)


class HydraDDPStrategy(SequenceParallelMixin, _HydraLaunch, DDPStrategy):
    """`DDPStrategy` (same arguments) whose locally launched ranks share the Hydra job's output dir, plus
    `sequence_parallel` (parallel.sequence: ranks per clip, stale/parallel/mesh.py)."""


class HydraFSDP2Strategy(SequenceParallelMixin, _HydraLaunch, ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` for FSDP2 (`StaleSystem.configure_model` shards: stale/parallel/fsdp.py),
    with `sequence_parallel` and the Hydra launch of the other strategies. Differences from Lightning's:

    - data: every rank, or every sequence-parallel group, reads its own clips (DDP's split). Lightning's own mesh
      (data_parallel x tensor_parallel, by default nodes x devices) is left unused: FSDP2 shards over all ranks;
    - checkpoints: one full file by default (`save_distributed_checkpoint=False`), as stale-export reads it; resume
      loads the raw weights (`current_model_state` when the EMA moved them there) and the optimiser state;
    - after a completed fit, rank 0's model is a plain module with the final weights (the EMA's, copied in by
      StaleEMA at train end), gathered while the processes are still connected, so that stale-train samples and
      reports with it on one device as after DDP.
    """

    def __init__(self, *args, save_distributed_checkpoint: bool = False, **kwargs):
        super().__init__(*args, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.mesh is None:  # no sequence parallelism: every rank its own clips
            return {"num_replicas": self.world_size, "rank": self.global_rank}
        return super().distributed_sampler_kwargs

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():  # a distributed (DCP) checkpoint: Lightning's reader
            return super().load_checkpoint(path, weights_only=weights_only)
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        model_state = checkpoint.get("current_model_state", checkpoint["state_dict"])  # raw weights, not the EMA
        options = StateDictOptions(full_state_dict=True, strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, dict(model_state), options=options)  # a copy: torch fills it with shards
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            # saved keyed by parameter index (ModelParallelStrategy.optimizer_state); torch's reader wants names
            state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
            set_optimizer_state_dict(self.model, optimizer, state, options=options)
        return checkpoint

    def teardown(self) -> None:
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        if (
            trainer is not None
            and trainer.state.status != TrainerStatus.INTERRUPTED  # as _HydraLaunch.teardown
            and trainer.state.fn == TrainerFn.FITTING
            and is_sharded(module.model)
        ):
            plain = gathered_copy(module.model)  # every rank, while the process group is up
            if plain is not None:
                module.model = plain
        super().teardown()
