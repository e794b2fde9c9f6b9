"""Shared test set-up: an isolated data cache, W&B offline, CPU only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Every test writes its data cache and W&B files under pytest's tmp dir, never in $HOME or the repo."""
    os.environ["STALE_CACHE"] = str(tmp_path_factory.mktemp("stale-cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # One torch thread per process: tests start several processes (CLI runs, DDP ranks, loader workers) on a
    # 2-core machine, and oversubscribed OpenMP threads ran a step up to 30x slower there.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield


def run_cli(*args: str, timeout: int = 300, check: bool = True, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run a stale console command (`stale-train ...`) in a subprocess, as a user would."""
    exe = Path(sys.executable).parent / args[0]
    proc = subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc
