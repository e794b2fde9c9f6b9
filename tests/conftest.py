"""Shared test set-up: an isolated data cache, W&B offline, CPU only."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import helpers
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


@pytest.fixture
def compose_train():
    """compose_train(*overrides) -> the stale-train config as Hydra's compose API builds it from the packaged
    conf/ (what `stale-train OVERRIDES...` runs, without starting an app): helpers.compose_train, which functions
    outside a test import from there."""
    return helpers.compose_train


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> dict:
    """Real mp4 WebDataset shards of synthetic clips: 4 train shards and 2 validation shards (one per rank);
    {folder, overrides} (the overrides that train on them). The DDP and sweep tests' data."""
    from stale.data.synthetic import SyntheticSpec, ensure_synthetic, split_pattern

    spec = SyntheticSpec(counts={"train": 32, "val": 16, "test": 8}, per_shard=8)
    folder = ensure_synthetic(tmp_path_factory.mktemp("ddp-shards"), spec)
    return {"folder": folder, "overrides": ["data=shards", f"data.shards='{split_pattern(folder, 'train')}'",
                                            f"data.val_shards='{split_pattern(folder, 'val')}'"]}


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
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def _become_command(out, err, argv: list[str], cwd, env) -> None:
    """In the forked child: the state a fresh `argv` process would start from (see run_cli)."""
    import __main__
    import atexit
    import gc
    import logging
    import random

    from hydra.core.global_hydra import GlobalHydra

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
        warnings.formatwarning(message, category, filename, lineno, line))
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
