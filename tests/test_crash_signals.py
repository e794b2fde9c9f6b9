"""Crashes and signals, injected for real into `stale-train` subprocesses."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import run_cli

EXE = str(Path(sys.executable).parent / "stale-train")
LONG_RUN = [
    "debug=smoke",
    "logger=csv",
    "trainer.max_steps=100000",
    "sample_every_n_steps=0",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "trainer.val_check_interval=1000",
]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [EXE, *LONG_RUN, f"hydra.run.dir={out}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path.name} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.2)
    time.sleep(0.5)  # let the rename land


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_checkpoint_and_resume_continues(tmp_path, sig):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for(out / "checkpoints" / "step0000004.ckpt", proc)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:]
    assert f"stopped by {sig.name}" in stdout
    last = out / "checkpoints" / "last.ckpt"
    stopped_at = _step(last)
    assert stopped_at >= 4
    assert not (out / "samples" / "contact_sheet.png").exists()  # a preempted run does not sample

    resumed = tmp_path / "resumed"
    run_cli(
        "stale-train",
        "debug=smoke",
        "logger=csv",
        f"hydra.run.dir={resumed}",
        f"ckpt_path={last}",
        f"trainer.max_steps={stopped_at + 2}",
        "sample_every_n_steps=0",
        timeout=180,
    )
    assert _step(resumed / "checkpoints" / "last.ckpt") == stopped_at + 2


def test_kill_9_during_training_leaves_loadable_checkpoints(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "callbacks.model_checkpoint.every_n_train_steps=1")
    _wait_for(out / "checkpoints" / "step0000006.ckpt", proc)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: whatever is on disk is what a crash leaves
    proc.wait(timeout=30)
    ckpts = sorted((out / "checkpoints").glob("step*.ckpt"))
    assert len(ckpts) >= 6
    for ckpt in ckpts:  # every checkpoint that exists under its final name is complete
        torch.load(ckpt, map_location="cpu", weights_only=True)
    newest = max(ckpts, key=_step)
    resumed = tmp_path / "resumed"
    run_cli(
        "stale-train",
        "debug=smoke",
        "logger=csv",
        f"hydra.run.dir={resumed}",
        f"ckpt_path={newest}",
        f"trainer.max_steps={_step(newest) + 1}",
        "sample_every_n_steps=0",
        timeout=180,
    )
    assert _step(resumed / "checkpoints" / "last.ckpt") == _step(newest) + 1


def test_kill_9_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    """The process SIGKILLs itself after half of the bytes of a new last.ckpt are written."""
    out = tmp_path / "run"
    run_cli("stale-train", "debug=smoke", "logger=csv", f"hydra.run.dir={out}", "sample_every_n_steps=0")
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    script = textwrap.dedent(f"""
        import builtins, io, os, signal, torch
        from stale.system.checkpoint_io import SafeCheckpointIO
        class DyingFile(io.FileIO):  # the checkpoint's file: half of the bytes, then SIGKILL
            def write(self, data):
                super().write(bytes(data)[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        real_open = builtins.open
        def dying_open(file, mode="r", *args, **kwargs):
            if str(file).endswith(".tmp") and "w" in mode:
                return DyingFile(file, "w")
            return real_open(file, mode, *args, **kwargs)
        builtins.open = dying_open
        ckpt = torch.load({str(last)!r}, map_location="cpu", weights_only=True)
        ckpt["global_step"] = 999
        SafeCheckpointIO().save_checkpoint(ckpt, {str(last)!r})  # what Trainer.save_checkpoint calls
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert last.read_bytes() == before  # the half-written bytes went to a temporary file, not last.ckpt
    assert _step(last) == 6


def test_disk_full_during_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC: the checkpoint folder is a tmpfs with room for one checkpoint, not two.

    With Lightning's own writer this run succeeded by destroying the previous checkpoint: its temporary
    file sits in /tmp and the cross-filesystem move truncates last.ckpt before copying (see checkpoint_io)."""
    out, disk = tmp_path / "run", tmp_path / "small-disk"
    disk.mkdir()
    first = tmp_path / "first"
    run_cli("stale-train", "debug=smoke", "logger=csv", f"hydra.run.dir={first}", "sample_every_n_steps=0")
    size = (first / "checkpoints" / "last.ckpt").stat().st_size
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mount.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        (disk / "last.ckpt").write_bytes((first / "checkpoints" / "last.ckpt").read_bytes())
        good = (disk / "last.ckpt").read_bytes()
        proc = run_cli(
            "stale-train",
            "debug=smoke",
            "logger=csv",
            f"hydra.run.dir={out}",
            "sample_every_n_steps=0",
            f"callbacks.model_checkpoint.dirpath={disk}",
            f"callbacks.final_checkpoint.dirpath={disk}",
            "callbacks.model_checkpoint.every_n_train_steps=1000",
            check=False,
            timeout=180,
        )
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "could not write checkpoint" in text and str(disk / "last.ckpt") in text and "intact" in text
        assert (disk / "last.ckpt").read_bytes() == good  # the previous checkpoint survived, byte for byte
        assert sorted(p.name for p in disk.iterdir()) == ["last.ckpt"]  # no half-written temporary left
        torch.load(disk / "last.ckpt", map_location="cpu", weights_only=True)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
