#!/usr/bin/env python
"""Ablation of the Stale objective on the embedded synthetic dataset, at one fixed compute budget.

    .venv/bin/python experiments/ablation.py                      # the table in docs/ablation.md (~10-15 min, 2 CPU cores)
    .venv/bin/python experiments/ablation.py --steps 2000 --samples 256 --threads 0    # a bigger budget

One factor at a time from the default recipe (uniform prior, DoG off, hinge on): Gaussian prior, DoG on
(`diffusion.dog_weight`), hinge off (`diffusion.hinge_weight=0`). Every variant is one `stale-train`
subprocess with the same steps, batch, model, learning-rate schedule and seed, and is then scored by
stale.eval.evaluate against the held-out test split: Fréchet DoG distance (FDD), validation loss, label
agreement of the hinge head, and the share of samples that stale-contamination flags as near-duplicates
of a training clip. Baseline rows: real vs real (training clips against the test split), the untrained
model, and nearest-training-clip copies (a perfect memoriser).

Writes docs/ablation.md, docs/ablation.png and, per run, <runs>/<name>/ (the stale-train run dir) with
eval.json. Torch runs single-threaded in every process by default (--threads 1): on a shared machine
two spinning OpenMP threads per process made a training step ~10x slower than one thread.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

# name, overrides on top of the common budget, what the row changes
VARIANTS = [
    ("default", [], "uniform prior, DoG off, hinge on"),
    ("gaussian", ["diffusion.prior=gaussian"], "Gaussian prior N(0, I)"),
    ("dog", ["diffusion.dog_weight={dog_weight}"], "DoG band-pass loss on"),
    ("no_hinge", ["diffusion.hinge_weight=0"], "hinge head off"),
    ("no_qk_norm", ["model.qk_norm=false"], "QK-norm off (architecture: attention on raw queries and keys)"),
]
PRIOR_VAR = {"uniform": 1.0 / 3.0, "gaussian": 1.0}  # per-coordinate variance of the prior z
# An mp4 round trip moves a 16 x 16 synthetic clip by <= 5 grey levels RMS; distinct clips are >= 16 apart
# (measured on 128 clips against the 2048 training clips): 8 separates copies from new clips.
PIXEL_COPY_RMSE = 8.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per variant (the compute budget; default: the default run's trainer.max_steps)",
    )
    p.add_argument("--batch", type=int, default=None, help="clips per training batch (default: data.batch_size)")
    p.add_argument("--warmup", type=int, default=None, help="learning-rate warmup steps (default: schedule.warmup)")
    p.add_argument("--samples", type=int, default=64, help="generated clips per variant (and per baseline row)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: sample.steps)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at the same time (one process each)")
    p.add_argument("--dog-weight", type=float, default=1.0, help="lambda_dog of the DoG-on row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0 = torch's default)")
    p.add_argument(
        "--only", nargs="*", default=None, help="run only these variants (names: %s)" % [v[0] for v in VARIANTS]
    )
    p.add_argument("--runs", type=Path, default=REPO / "outputs" / "ablation", help="where the runs go")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "ablation.md")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite --out from <runs>/ablation.json (a finished run) without training",
    )
    args = p.parse_args(argv)
    cfg = default_config()
    for name, key in (
        ("steps", "trainer.max_steps"),
        ("batch", "data.batch_size"),
        ("warmup", "schedule.warmup"),
        ("sample_steps", "sample.steps"),
    ):
        if getattr(args, name) is None:
            setattr(args, name, int(OmegaConf.select(cfg, key)))
    return args


def default_config(overrides: list[str] = ()):
    """stale-train's packaged config (the default recipe), composed as the command would compose it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("stale.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def env_for(args) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def common_overrides(args) -> list[str]:
    """The fixed budget every variant shares."""
    s = args.steps
    return [
        f"trainer.max_steps={s}",
        f"trainer.val_check_interval={s}",
        "trainer.limit_val_batches=1.0",
        f"callbacks.model_checkpoint.every_n_train_steps={s}",
        f"data.batch_size={args.batch}",
        f"schedule.warmup={args.warmup}",
        f"sample.num_videos={args.samples}",
        f"sample.steps={args.sample_steps}",
        f"seed={args.seed}",
        "logger=csv",
        "trainer.log_every_n_steps=10",
    ]


# --- checks and training -----------------------------------------------------------------------------


def last_metric(run: Path, key: str) -> float | None:
    path = run / "logs" / "metrics.csv"
    if not path.exists():
        return None
    value = None
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get(key):
                value = float(row[key])
    return value


def train(name: str, overrides: list[str], args) -> dict:
    run = args.runs / name
    cmd = [
        str(Path(sys.executable).parent / "stale-train"),
        *common_overrides(args),
        *overrides,
        f"hydra.run.dir={run}",
    ]
    print(f"[ablation] {name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_for(args), cwd=REPO)
    seconds = time.perf_counter() - t0
    (args.runs / f"{name}.log").write_text(proc.stdout + "\n" + proc.stderr)
    result = {"run": run, "seconds": seconds, "ok": proc.returncode == 0, "cmd": shlex.join(cmd[1:])}
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        hint = next(
            (ln for ln in reversed(lines) if "Error" in ln or "override" in ln.lower()), lines[-1] if lines else ""
        )
        result["error"] = f"stale-train exited {proc.returncode}: {hint.strip()[:300]}"
        print(f"[ablation] {name} FAILED: {result['error']} (log: {args.runs / f'{name}.log'})", flush=True)
        return result
    result["val_loss"] = last_metric(run, "val/loss")
    print(f"[ablation] {name}: {seconds:.0f} s, val/loss {result['val_loss']}", flush=True)
    return result


# --- scoring -----------------------------------------------------------------------------------------


class Scorer:
    """Evaluates sample folders against the test split; knows the data and the training fingerprints."""

    def __init__(self, args):
        from stale.data.reader import expand_shards
        from stale.data.synthetic import SyntheticSpec, ensure_synthetic, split_pattern
        from stale.data.synthetic_module import default_cache_root
        from stale.eval.contamination import fingerprint_shards
        from stale.eval.evaluate import load_real_clips

        self.args = args
        data = default_config().data  # the same data stale-train uses (style, sizes and counts of conf/data)
        self.frames, self.size = int(data.frames), int(data.size)
        spec = SyntheticSpec(
            frames=self.frames,
            size=self.size,
            num_classes=int(data.num_classes),
            style=data.style,
            counts={"train": data.train_clips, "val": data.val_clips, "test": data.test_clips},
        )
        self.folder = ensure_synthetic(data.root or default_cache_root(), spec)
        self.train_pattern, self.test_pattern = split_pattern(self.folder, "train"), split_pattern(self.folder, "test")
        self.val_pattern = split_pattern(self.folder, "val")
        print(f"[ablation] data: {self.folder}", flush=True)
        self.train_clips, self.train_labels, _ = load_real_clips(self.train_pattern, self.frames, self.size)
        self.test_clips, self.test_labels, _ = load_real_clips(self.test_pattern, self.frames, self.size)
        val, self.val_labels, _ = load_real_clips(self.val_pattern, self.frames, self.size)
        self.val_clips = val
        self.val_x2 = float(((val.astype(np.float64) / 127.5 - 1) ** 2).mean())  # E[x^2] on the validation split
        self.train_fp = fingerprint_shards(expand_shards(self.train_pattern), progress=False)
        self.train_flat = self.train_clips.reshape(len(self.train_clips), -1).astype(np.float32)
        self.train_sq = (self.train_flat**2).sum(1)

    def trivial_loss(self, prior: str) -> float:
        """Validation loss of v = 0, in expectation over z: a reference comparable across priors (a velocity model
        starts there: its output layer is zero-initialised; an x-prediction model starts at x1_hat = 0 instead)."""
        return self.val_x2 + PRIOR_VAR[prior]

    def val_loss(self, system, batch_size: int) -> float:
        """StaleSystem.validation_step's number without a Trainer (stale.system.stale_system.validation_losses
        over the validation split in batches), averaged over batches as Lightning averages val/loss."""
        import torch

        from stale.system.stale_system import validation_losses

        losses, sizes = [], []
        with torch.no_grad():
            for i, start in enumerate(range(0, len(self.val_clips), batch_size)):
                video = torch.from_numpy(self.val_clips[start : start + batch_size]).permute(0, 4, 1, 2, 3)
                label = torch.as_tensor(self.val_labels[start : start + batch_size], dtype=torch.long)
                per_t = validation_losses(system.model, system.objective.prior, video, label, i, system.val_times)
                losses.append(torch.stack(per_t).mean().item())
                sizes.append(len(video))
        return float(np.average(losses, weights=sizes))

    def near_duplicate_share(self, clips: np.ndarray) -> float:
        """Share of clips that stale-contamination's dHash rule (threshold 8) pairs with a training clip."""
        from stale.eval.contamination import find_pairs
        from stale.eval.fingerprint import clip_fingerprint

        fps = np.stack([clip_fingerprint(c) for c in clips])
        pairs = find_pairs(fps, self.train_fp.hashes, threshold=8)
        return len(set(pairs.i.tolist())) / len(clips)

    def pixel_copy_share(self, clips: np.ndarray, max_rmse: float = PIXEL_COPY_RMSE) -> float:
        """Share of clips within `max_rmse` grey levels (RMS over all pixels) of their nearest training clip."""
        q = clips.reshape(len(clips), -1).astype(np.float32)
        d2 = (q**2).sum(1)[:, None] - 2 * q @ self.train_flat.T + self.train_sq[None]
        rmse = np.sqrt(np.maximum(d2.min(axis=1), 0) / q.shape[1])
        return float((rmse <= max_rmse).mean())

    def score_folder(self, folder: Path, ckpt: Path | None) -> dict:
        from stale.eval.evaluate import evaluate, load_sample_clips

        labels = "auto" if (folder / "labels.json").exists() else "cycle"  # stale-train's order: i mod K
        report = evaluate(
            folder, self.test_pattern, ckpt=ckpt, labels=labels, out=folder.parent / "eval.json", seed=self.args.seed
        )
        gen, _ = load_sample_clips(folder)
        la = report.get("label_agreement", {})
        return {
            "dir": folder.parent.name,
            "predicted_classes": sorted(set(la.get("predicted", {}).values())),
            "fdd": report["fdd"]["value"],
            "n_gen": report["fdd"]["generated_clips"],
            "n_real": report["fdd"]["real_clips"],
            "agreement": la.get("agreement"),
            "real_accuracy": la.get("real_accuracy"),
            "near_dup": self.near_duplicate_share(gen),
            "pixel_copy": self.pixel_copy_share(gen),
        }


def untrained_samples(args, scorer: Scorer, folder: Path) -> Path:
    """Samples and a checkpoint of the default recipe's model before any step (same seed, same code path)."""
    import torch

    from stale.data.media import save_videos
    from stale.train import build_system

    cfg = default_config([*common_overrides(args), f"paths.output_dir={folder.parent}"])
    torch.manual_seed(cfg.seed)
    system = build_system(cfg)
    k = system.model.config.num_classes
    videos = system.sample(torch.arange(args.samples) % k, steps=args.sample_steps, seed=cfg.sample.seed)
    save_videos(videos, folder)
    ckpt = folder.parent / "untrained.ckpt"
    state = system.state_dict()  # stale-train's layout; the EMA of weights that never moved is the weights
    torch.save({"state_dict": state, "current_model_state": state, "hyper_parameters": dict(system.hparams)}, ckpt)
    return ckpt, scorer.val_loss(system.eval(), int(cfg.data.get("val_batch_size") or cfg.data.batch_size))


def real_rows(args, scorer: Scorer, default_ckpt: Path | None) -> list[dict]:
    """Real vs real and nearest-training-clip copies, scored like samples (written as mp4 like samples are)."""
    import torch

    from stale.data.media import save_videos, write_labels
    from stale.eval.evaluate import fdd

    n, rows = args.samples, []
    tr = scorer.train_clips
    # real vs real on three disjoint slices of the training split: the spread is the FDD's own noise
    values = [fdd(tr[i * n : (i + 1) * n], scorer.test_clips) for i in range(3) if (i + 1) * n <= len(tr)]
    folder = args.runs / "real_vs_real" / "samples"
    save_videos(torch.from_numpy(tr[:n]).permute(0, 4, 1, 2, 3), folder)
    write_labels(folder, {f"sample_{i:03d}.mp4": int(y) for i, y in enumerate(scorer.train_labels[:n])})
    s = scorer.score_folder(folder, default_ckpt)
    s["fdd_spread"] = (float(np.mean(values)), float(np.std(values)), len(values))
    rows.append({"name": "real vs real", "what": f"{n} training clips (mp4 round trip) vs the test split", **s})

    # nearest training clip (pixel L2) for each of the first n test clips: a model that memorised the data
    test = scorer.test_clips[:n].reshape(min(n, len(scorer.test_clips)), -1).astype(np.float32)
    train = tr.reshape(len(tr), -1).astype(np.float32)
    d2 = (test**2).sum(1)[:, None] - 2 * test @ train.T + (train**2).sum(1)[None]
    nearest = d2.argmin(axis=1)
    folder = args.runs / "nearest_copies" / "samples"
    save_videos(torch.from_numpy(tr[nearest]).permute(0, 4, 1, 2, 3), folder)
    write_labels(folder, {f"sample_{i:03d}.mp4": int(y) for i, y in enumerate(scorer.test_labels[:n])})
    rows.append(
        {
            "name": "nearest-training-clip copies",
            "what": f"for each of {len(nearest)} test clips, its nearest training clip (pixel L2)",
            **scorer.score_folder(folder, default_ckpt),
        }
    )
    return rows


# --- the report --------------------------------------------------------------------------------------


def fmt(v, spec=".3f", none="—"):
    return none if v is None else format(v, spec)


def write_report(meta: dict, rows: list[dict], notes: list[str], out: Path) -> None:
    args = argparse.Namespace(**meta["args"])
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Ablation: prior, DoG and hinge at one fixed compute budget",
        "",
        "Made by:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"{meta['date']}, git {meta['commit']}. Budget per trained row: {args.steps} steps x {args.batch} clips "
        f"of the embedded synthetic dataset ({meta.get('data', '8 frames, 16 x 16')}), model `tiny` ({meta['params']}"
        f"{meta.get('model_extra', '')}), arctan schedule with {args.warmup} warmup steps, seed {args.seed}, torch "
        f"threads {args.threads or 'default'}. Samples: {args.samples} clips per row, {args.sample_steps} "
        f"{meta.get('sampler', 'Euler')} steps{meta.get('guidance_note', '')}, labels cycling through the classes. "
        f"Wall time {meta['minutes']:.1f} min in all on a 2-core CPU, {getattr(args, 'jobs', 1)} variant(s) training "
        "at once (timings are not comparable across rows). Every trained row is the default recipe of `stale-train` "
        "with one change, and one seed decides every row.",
        "",
        "| row | what | FDD (lower is better) | val loss | val loss / loss of v = 0 | label agreement | copies of train (pixel) | near-dup of train (dHash) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | {r['what']} | not run: {r['error']} | | | | | |")
            continue
        fdd_cell = fmt(r.get("fdd"), ".1f")
        if r.get("fdd_spread"):
            m, s, k = r["fdd_spread"]
            fdd_cell += f" (3 slices: {m:.1f} ± {s:.1f})"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(
            f"| {r['name']} | {r['what']}{note} | {fdd_cell} | {fmt(r.get('val_loss'), '.4f')} | "
            f"{fmt(r.get('val_rel'), '.3f')} | {fmt(r.get('agreement'), '.2f')} | {fmt(r.get('pixel_copy'), '.0%')} | "
            f"{fmt(r.get('near_dup'), '.0%')} |"
        )
    lines += ["", "![FDD per row](ablation.png)", "", "## Reading the table", ""]
    lines += [f"- {t}" for t in notes]
    lines += [
        "",
        "Columns:",
        "",
        "- **FDD**: Fréchet DoG distance (docs/evaluation.md) of the row's clips against the "
        f"{rows[0].get('n_real', '?')} clips of the test split. It depends on both set sizes: every row uses "
        f"{args.samples} clips. The spread over three disjoint slices of real training clips is the noise floor.",
        "- **val loss**: `val/loss` of the run (velocity MSE at t in {0.1, 0.3, 0.5, 0.7, 0.9}, fixed noise, all "
        "validation clips). Not comparable across priors: the target u = x - z has per-coordinate variance "
        "E[x^2] + 1/3 under the uniform prior and E[x^2] + 1 under the Gaussian one.",
        "- **val loss / loss of v = 0**: the val loss divided by E[x^2] + Var(z), the loss of predicting v = 0 "
        "(where a velocity model starts: its output layer is zero-initialised). Comparable across priors. "
        "The untrained row's val loss is measured with the same protocol (an x-prediction model starts at "
        "x1_hat = 0, not at v = 0).",
        "- **label agreement**: share of samples whose hinge-head prediction (model(x, t=1, null label)) is the "
        "requested class; chance is 0.25. Baseline rows are classified by the default row's head. "
        "'hinge off' shows the head untrained: chance, as it should be.",
        f"- **copies of train (pixel)**: share of the row's clips within {PIXEL_COPY_RMSE:g} grey levels RMS of "
        "their nearest training clip (the whole training split). FDD cannot see memorisation; this column can.",
        "- **near-dup of train (dHash)**: the same question asked with stale-contamination's rule (64-bit dHash "
        "of 5 frames, median Hamming distance <= 8). At 16 x 16 pixels dHash is at its resolution limit: an mp4 "
        "round trip alone moves a clip by a median of about 12 bits (docs/bench/contamination.md), so it misses "
        "most copies here. It is built for real video sizes, where the tests show it working.",
        "",
    ]
    out.write_text("\n".join(lines))
    plot(rows, out.with_suffix(".png"))
    print(f"[ablation] wrote {out} and {out.with_suffix('.png')}", flush=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if r.get("fdd") is not None]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(ok) + 1.2))
    colours = ["#888888" if r.get("baseline") else "#3a6fb0" for r in ok]
    ax.barh([r["name"] for r in ok][::-1], [r["fdd"] for r in ok][::-1], color=colours[::-1])
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short axis
    ax.set_xlabel("Fréchet DoG distance to the test split (log scale, lower is better)")
    for i, r in enumerate(ok[::-1]):
        ax.text(r["fdd"], i, f" {r['fdd']:.0f}", va="center", fontsize=8)
    ax.set_title("Ablation at a fixed budget (grey: baselines)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        render(json.loads((args.runs / "ablation.json").read_text()), args.out)
        return 0
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.runs.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(args)
    rows = []
    wanted = [v for v in VARIANTS if args.only is None or v[0] in args.only]

    trained, todo = {}, []
    for name, overrides, what in wanted:
        overrides = [o.format(dog_weight=args.dog_weight) for o in overrides]
        row = {"name": name, "what": what}
        rows.append(row)
        todo.append((row, name, overrides))
    # --jobs N trains N variants at once (one stale-train process each, args.threads threads each)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda job: train(job[1], job[2], args), todo))
    for (row, name, overrides), result in zip(todo, results):
        if not result["ok"]:
            row["error"] = result["error"]
            continue
        prior = "gaussian" if "diffusion.prior=gaussian" in overrides else "uniform"
        row.update(scorer.score_folder(result["run"] / "samples", result["run"] / "checkpoints" / "last.ckpt"))
        row["val_loss"] = result["val_loss"]
        row["val_rel"] = result["val_loss"] / scorer.trivial_loss(prior) if result["val_loss"] is not None else None
        row["seconds"] = result["seconds"]
        trained[name] = result

    print("[ablation] baselines", flush=True)
    default_ckpt = trained["default"]["run"] / "checkpoints" / "last.ckpt" if "default" in trained else None
    baselines = real_rows(args, scorer, default_ckpt)
    folder = args.runs / "untrained" / "samples"
    ckpt, untrained_loss = untrained_samples(args, scorer, folder)
    untrained = {
        "name": "untrained model",
        "what": "default recipe before any step (same code path, no update)",
        **scorer.score_folder(folder, ckpt),
        "val_loss": untrained_loss,
        "val_rel": untrained_loss / scorer.trivial_loss("uniform"),
    }
    for r in (*baselines, untrained):
        r["baseline"] = True
        if r["name"] != "untrained model":
            r["note"] = "labels: default row's head" if default_ckpt else "no default run: no head"
    rows = [*rows, baselines[0], untrained, baselines[1]]

    import torch

    from stale.utils.provenance import git_state

    params = "?"
    if default_ckpt:
        sd = torch.load(default_ckpt, map_location="cpu", weights_only=True)["state_dict"]
        params = f"{sum(v.numel() for k, v in sd.items() if k != 'model.joy_token') / 1e6:.2f}M parameters"
    git = git_state()
    argv_str = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {
        "command": f".venv/bin/python experiments/ablation.py {argv_str}".strip(),
        "date": datetime.date.today().isoformat(),
        "commit": f"{(git['commit'] or 'unknown')[:10]}{' (dirty)' if git['dirty'] else ''}",
        "params": params,
        "minutes": (time.perf_counter() - t_start) / 60,
        **recipe_meta(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    results = {"meta": meta, "rows": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows]}
    (args.runs / "ablation.json").write_text(json.dumps(results, indent=1))
    render(results, args.out)
    return 0


def recipe_meta() -> dict:
    """The default recipe's data, model and sampler, as the report's header describes them."""
    cfg = default_config()
    d, m, smp = cfg.data, cfg.model, cfg.sample
    extra = f", {m.prediction}-prediction" if m.get("prediction", "velocity") != "velocity" else ""
    return {
        "data": f"{d.frames} frames, {d.size} x {d.size}, style {d.get('style', 'varied')}",
        "model_extra": f", patch {list(m.patch)}{extra}",
        "sampler": str(smp.sampler).capitalize(),
        "guidance_note": f" with classifier-free guidance {smp.guidance:g}" if smp.guidance != 1 else "",
    }


def notes_for(rows: list[dict]) -> list[str]:
    """What the table says, computed from it (so a rerun cannot leave stale prose behind)."""
    by = {r["name"]: r for r in rows}
    notes = []
    u, g = by.get("default", {}), by.get("gaussian", {})
    floor = by.get("real vs real", {}).get("fdd_spread")
    if u.get("fdd") and g.get("fdd"):
        spread = floor[1] if floor else 0.0
        gap = abs(u["fdd"] - g["fdd"])
        fdd_win = "uniform" if u["fdd"] < g["fdd"] else "Gaussian"
        fdd_says = (
            f"the {fdd_win} prior by {gap:.0f}, more than the real-vs-real spread of ± {spread:.0f}"
            if gap > spread
            else f"no winner: the gap of {gap:.0f} is inside the real-vs-real spread of ± {spread:.0f}"
        )
        if u.get("val_rel") is not None and g.get("val_rel") is not None:
            loss_win = "uniform" if u["val_rel"] < g["val_rel"] else "Gaussian"
            loss_says = (
                f"; on val loss / loss of v = 0 the {loss_win} prior ({fmt(u['val_rel'])} uniform vs "
                f"{fmt(g['val_rel'])} Gaussian)"
            )
        else:
            loss_says = ""
        notes.append(
            f"**Prior.** FDD {u['fdd']:.0f} uniform vs {g['fdd']:.0f} Gaussian: {fdd_says}{loss_says}. "
            "One seed each: a rerun with other seeds is the way to firm this up."
        )
    trained = [r for r in rows if not r.get("baseline") and r.get("fdd")]
    unt, real = by.get("untrained model", {}), by.get("real vs real", {})
    if trained and unt.get("fdd") and real.get("fdd"):
        best = min(trained, key=lambda r: r["fdd"])
        notes.append(
            f"Sample quality: the best trained row ({best['name']}, FDD {best['fdd']:.0f}) has covered "
            f"{(unt['fdd'] - best['fdd']) / (unt['fdd'] - real['fdd']):.0%} of the way from prior noise "
            f"(untrained, {unt['fdd']:.0f}) to real clips ({real['fdd']:.0f}). Look at the contact sheets "
            "in the run folders (`<runs>/<row>/samples/contact_sheet.png`) before reading more into FDD: "
            "this budget ranks recipes at the default run's length; it does not show what they converge to."
        )
    for r in rows:
        if r.get("error"):
            notes.append(f"Row '{r['name']}' not run: {r['error']}. Rerun the script when that is fixed.")
    single = [r for r in rows if len(r.get("predicted_classes") or []) == 1]
    if single:
        names = ", ".join(f"{r['name']} (class {r['predicted_classes'][0]})" for r in single)
        notes.append(
            f"The hinge head predicts one class for every clip in: {names}; there label agreement is "
            "chance. An untrained head must: with adaLN-Zero every block starts as the identity, so the joy "
            "token's final state does not depend on the input; with the hinge loss off, nothing trains it."
        )
    agree = [
        r
        for r in rows
        if not r.get("baseline") and r.get("agreement") is not None and len(r.get("predicted_classes") or []) > 1
    ]
    if agree:
        notes.append(
            "Label agreement of the trained heads: "
            + ", ".join(f"{r['name']} {r['agreement']:.2f}" for r in agree)
            + " (chance 0.25)."
        )
    nh, d = by.get("no_hinge", {}), by.get("default", {})
    if nh.get("fdd") and d.get("fdd"):
        spread = floor[1] if floor else 0.0
        better = "lower" if nh["fdd"] < d["fdd"] else "higher"
        beyond = "beyond" if abs(nh["fdd"] - d["fdd"]) > spread else "within"
        notes.append(
            f"Hinge off: FDD {nh['fdd']:.0f} vs {d['fdd']:.0f} with it on ({better}, {beyond} the real-vs-real "
            f"spread), val loss / loss of v = 0 {fmt(nh.get('val_rel'))} vs {fmt(d.get('val_rel'))}. The hinge "
            "branch also costs a forward and backward pass on a quarter of each batch."
        )
    copies = by.get("nearest-training-clip copies", {})
    if copies.get("fdd") and real.get("fdd"):
        notes.append(
            f"Real vs real ({real['fdd']:.0f}) and the nearest-training-clip copies ({copies['fdd']:.0f}) "
            "sit together at the floor of FDD although the copies are pure memorisation: only the copies "
            "column tells them apart from a model that generalises."
        )
    return notes


def render(results: dict, out: Path) -> None:
    write_report(results["meta"], results["rows"], notes_for(results["rows"]), out)


if __name__ == "__main__":
    sys.exit(main())
