"""Sweeps: an Optuna search run through submitit (the SLURM launcher's machinery, on this machine),
the summary table and best trial, and the SLURM launcher config."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import LITE_RUN, REPO, run_cli
from stale.utils.sweep import RESULT_FILE, write_summary


def group_override(group: str, option: str) -> str:
    """`hparams_search=optuna` once conf/train.yaml lists `hparams_search: null` in its defaults; `+...` before."""
    listed = re.search(rf"^\s*-\s*{group}\s*:", (REPO / "conf" / "train.yaml").read_text(), re.M)
    return f"{group}={option}" if listed else f"+{group}={option}"


@pytest.mark.timeout(400)
def test_optuna_search_through_submitit(tiny_shards, tmp_path):
    """2 Optuna trials, each a submitit job in its own process: each writes its result, the sweep the summary."""
    sweep = tmp_path / "sweep"
    run_cli(
        "stale-train",
        group_override("hparams_search", "optuna"),
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",  # one batch of 2: submitit runs both trials at once
        "hydra/launcher=submitit_local",
        *LITE_RUN,
        *tiny_shards["overrides"],
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=380,
    )
    optuna_best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1"] and all(r["status"] == "COMPLETED" for r in rows)
    for r in rows:  # the searched parameters are each trial's overrides, its output dir its own
        assert all(f"{k}=" in r["overrides"] for k in ("optim.lr", "optim.weight_decay", "diffusion.time_mean"))
        assert r["output_dir"] == str(sweep / r["trial"]) and (sweep / r["trial"] / "samples").is_dir()
    best = yaml.safe_load((sweep / "best_trial.yaml").read_text())
    assert best["value"] == pytest.approx(min(float(r["val/loss"]) for r in rows))
    assert best["value"] == pytest.approx(optuna_best["best_value"])  # our pick is Optuna's pick
    for key, value in optuna_best["best_params"].items():
        assert f"{key}={value}" in best["overrides"]
    assert (sweep / "sweep_summary.md").read_text().count("| COMPLETED |") == 2


def _record(sweep: Path, trial: int, value, status="COMPLETED", extra=()):
    out = sweep / str(trial)
    out.mkdir(parents=True)
    overrides = ["debug=smoke", f"optim.lr={trial}e-3", *extra]
    (out / RESULT_FILE).write_text(
        json.dumps(
            {
                "trial": trial,
                "status": status,
                "val/loss": value,
                "overrides": overrides,
                "output_dir": str(out),
                "error": None,
            }
        )
    )


def test_summary_table_and_best(tmp_path):
    """Failed and non-finite trials are listed, never best; only the varying overrides go in the table."""
    for trial, value, status in [
        (0, 0.5, "COMPLETED"),
        (1, None, "FAILED"),
        (2, 0.25, "COMPLETED"),
        (10, 0.75, "COMPLETED"),
    ]:
        _record(tmp_path, trial, value, status)
    summary = write_summary(tmp_path, "val/loss", "minimize")
    assert summary["trials"] == 4 and summary["best"]["trial"] == 2
    rows = list(csv.DictReader(open(tmp_path / "sweep_summary.csv")))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "10"]  # numeric order, not 0, 1, 10, 2
    assert rows[1]["val/loss"] == "" and rows[1]["status"] == "FAILED"
    table = (tmp_path / "sweep_summary.md").read_text()
    assert "common overrides: `debug=smoke`" in table and "| 2 | 0.25 | COMPLETED | `optim.lr=2e-3` |" in table
    best = yaml.safe_load((tmp_path / "best_trial.yaml").read_text())
    assert best["value"] == 0.25 and best["command"] == "stale-train debug=smoke optim.lr=2e-3"

    assert write_summary(tmp_path, "val/loss", "maximize")["best"]["trial"] == 10
    with pytest.raises(ValueError, match="direction='lowest'"):
        write_summary(tmp_path, "val/loss", "lowest")


def test_summary_command_for_an_interrupted_sweep(tmp_path):
    """`python -m stale.utils.sweep DIR`: the summary of whatever trials finished."""
    _record(tmp_path, 0, 0.5)
    _record(tmp_path, 1, 0.4)
    proc = subprocess.run(
        [sys.executable, "-m", "stale.utils.sweep", str(tmp_path), "--direction", "maximize"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "best (maximize val/loss): trial 0" in proc.stdout
    assert yaml.safe_load((tmp_path / "best_trial.yaml").read_text())["trial"] == 0
    proc = subprocess.run(
        [sys.executable, "-m", "stale.utils.sweep", str(tmp_path / "none")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "no sweep_result.json" in proc.stdout


def test_no_finite_trial_means_no_best(tmp_path):
    _record(tmp_path, 0, None, "FAILED")
    (tmp_path / "best_trial.yaml").write_text("stale: true\n")  # from an earlier sweep into the same dir
    assert write_summary(tmp_path)["best"] is None and not (tmp_path / "best_trial.yaml").exists()
    assert write_summary(tmp_path / "empty") is None


def test_slurm_launcher_and_search_configs():
    """hydra/launcher=slurm is the submitit SLURM launcher with our defaults; the search minimises val/loss."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("stale.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                group_override("hparams_search", "optuna"),
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
    built = instantiate(launcher)  # builds; submitting needs a cluster
    assert type(built).__name__ == "SlurmLauncher" and built._EXECUTOR == "slurm" and built.params["nodes"] == 1
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.callbacks.sweep_summary._target_ == "stale.utils.sweep.SweepSummary"
    assert set(cfg.hydra.sweeper.params) == {"optim.lr", "optim.weight_decay", "diffusion.time_mean"}


def test_slurm_script_is_valid_bash():
    script = REPO / "scripts" / "slurm_train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --signal=SIGUSR1@" in text and "hydra.run.dir=${RUN_DIR}" in text
