"""A Hydra callback that writes a sweep's summary: one row per trial and the best trial (docs/scaling.md).

Each job records its result in its output dir (`sweep_result.json`, in `on_job_end`, on the node that ran it) and
`on_multirun_end` gathers them into sweep_summary.csv, sweep_summary.md and best_trial.yaml. The metric is the job's
return value (`stale-train` returns `val/loss`); failed or non-finite trials are listed, never chosen as best. A
sweep that stops early never reaches `on_multirun_end`: `python -m stale.utils.sweep SWEEP_DIR [--direction
maximize]` writes the summary from the result files.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RESULT_FILE = "sweep_result.json"


def _global_rank() -> int:
    """This process's rank as torchrun, SLURM (srun, submitit) or Lightning's launcher announce it."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode", default=None) == RunMode.MULTIRUN


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class SweepSummary(Callback):
    def __init__(self, metric: str = "val/loss", direction: str | None = None):
        """metric: the column name of the jobs' return value. direction: minimize | maximize; None takes
        hydra.sweeper.direction (Optuna) and else minimize."""
        if direction not in (None, "minimize", "maximize"):
            raise ValueError(f"hydra.callbacks.sweep_summary.direction={direction!r}: use minimize or maximize")
        self.metric, self.direction = metric, direction

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config) or _global_rank() != 0:
            return  # plain runs, and the other ranks of a multi-process trial
        out = Path(config.hydra.runtime.output_dir)
        ok = job_return.status == JobStatus.COMPLETED
        record = {
            "trial": int(config.hydra.job.num),
            "status": job_return.status.name,
            self.metric: _number(job_return.return_value) if ok else None,
            "overrides": list(job_return.overrides or []),
            "output_dir": str(out),
            "error": None if ok else f"{type(job_return._return_value).__name__}: {job_return._return_value}",
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT_FILE).write_text(json.dumps(record, indent=1))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        direction = self.direction or OmegaConf.select(config, "hydra.sweeper.direction", default=None)
        if isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction):
            direction = direction[0]  # multi-objective: rank by the first
        summary = write_summary(sweep_dir, self.metric, str(direction or "minimize").lower())
        if summary is not None:
            log.info("sweep summary (%d trials) in %s:\n%s", summary["trials"], sweep_dir, summary["table"])


def load_results(sweep_dir: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in Path(sweep_dir).rglob(RESULT_FILE)]
    return sorted(records, key=lambda r: r["trial"])


def write_summary(sweep_dir: Path, metric: str = "val/loss", direction: str = "minimize") -> dict | None:
    """Gather the jobs' sweep_result.json files under sweep_dir; write the table and the best trial."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction!r}: use minimize or maximize")
    sweep_dir = Path(sweep_dir)
    records = load_results(sweep_dir)
    if not records:
        log.warning("no %s under %s: no sweep summary written", RESULT_FILE, sweep_dir)
        return None

    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", metric, "status", "overrides", "output_dir"])
        for r in records:
            writer.writerow(
                [
                    r["trial"],
                    "" if r[metric] is None else repr(r[metric]),
                    r["status"],
                    " ".join(r["overrides"]),
                    r["output_dir"],
                ]
            )

    # The markdown table shows the overrides that differ between trials; the rest once, above it.
    sets = [set(r["overrides"]) for r in records]
    common = set.intersection(*sets) if len(records) > 1 else set()
    lines = [
        f"common overrides: `{' '.join(o for o in records[0]['overrides'] if o in common)}`",
        "",
        f"| trial | {metric} | status | overrides |",
        "|---:|---:|---|---|",
    ]
    for r in records:
        value = "" if r[metric] is None else f"{r[metric]:.6g}"
        varying = " ".join(o for o in r["overrides"] if o not in common)
        lines.append(f"| {r['trial']} | {value} | {r['status']} | `{varying}` |")
    scored = [r for r in records if r[metric] is not None]
    best = None
    if scored:
        pick = min if direction == "minimize" else max
        best = pick(scored, key=lambda r: r[metric])
        lines += ["", f"best ({direction} {metric}): trial {best['trial']}, {metric} = {best[metric]:.6g}"]
    table = "\n".join(lines)
    (sweep_dir / "sweep_summary.md").write_text(table + "\n")

    best_file = sweep_dir / "best_trial.yaml"
    if best is not None:
        best_file.write_text(
            yaml.safe_dump(
                {
                    "trial": best["trial"],
                    "metric": metric,
                    "direction": direction,
                    "value": best[metric],
                    "overrides": best["overrides"],
                    "output_dir": best["output_dir"],
                    "command": shlex.join(["stale-train", *best["overrides"]]),
                },
                sort_keys=False,
            )
        )
    else:
        best_file.unlink(missing_ok=True)
        log.warning("no trial of the sweep in %s returned a finite %s: no best trial", sweep_dir, metric)
    return {"trials": len(records), "best": best, "table": table}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m stale.utils.sweep",
        description="Write sweep_summary.{csv,md} and best_trial.yaml for a sweep dir.",
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="val/loss")
    parser.add_argument("--direction", default="minimize", choices=["minimize", "maximize"])
    args = parser.parse_args(argv)
    summary = write_summary(args.sweep_dir, args.metric, args.direction)
    if summary is None:
        print(f"no {RESULT_FILE} under {args.sweep_dir}")
        return 1
    print(summary["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
