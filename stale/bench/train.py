"""Framework overhead: the Lightning training step versus a plain PyTorch loop doing the same work.

Both sides get the same model (identical initial weights) and the same pre-decoded uint8 batches in memory; the
plain side is stale.bench.step.TrainStep (a test checks that k steps of each land on the same losses and weights).
Lightning's step time is the period between the starts of consecutive batches, so everything the framework does per
step is inside it. `timing=block` times each fit and plain run as a whole; `timing=step` runs the plain step inside
Lightning's on_train_batch_start, so the two alternate step by step. The variants (lightning, no_progress_bar,
no_log, csv_logger, barebones, rich, rich_4hz, tqdm), the timings' trade-offs and `profile=true` are in
docs/bench/overhead.md.
"""

from __future__ import annotations

import contextlib
import copy
import cProfile
import io
import logging
import os
import pstats
import shutil
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch

from stale.bench import build, median, random_batches, spread, sync
from stale.bench.step import InMemory, TrainStep, make_system, resolve_precision

VARIANTS = ("lightning", "no_progress_bar", "no_log", "csv_logger", "barebones", "rich", "rich_4hz", "tqdm")


def default_progress_bar():
    """The progress bar stale-train uses, built from the packaged conf/callbacks/default.yaml."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from stale.bench import packaged_conf

    return instantiate(OmegaConf.load(packaged_conf("callbacks", "default.yaml")).progress_bar)


TARGET_OVERHEAD = 0.03  # issue 11: framework overhead <= 3%


def median_error(ratios: list) -> float:
    """Standard error of the median of per-round overheads: 1.2533 sigma / sqrt(n), with the robust sigma
    IQR / 1.349 (a normal's IQR is 1.349 sigma), so one slow round on a shared machine does not inflate it."""
    if len(ratios) < 4:
        return float("inf")
    return 1.2533 * spread(ratios) * 2 * median(ratios) / 1.349 / len(ratios) ** 0.5


@contextlib.contextmanager
def _quiet():
    """Lightning's per-Trainer info lines and the progress bar would bury the table: send them away."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stderr(null),
        contextlib.redirect_stdout(null),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


def _now(device: str) -> tuple[float, float]:
    """(wall, process CPU) seconds after synchronising the device.

    Process CPU time counts the work of every thread of this process but not the time spent waiting for
    a core, so on a shared machine it is far steadier than wall time; wall time is what a user waits for
    (and the only one that matters on a GPU). Both are reported.
    """
    sync(device)
    return time.perf_counter(), time.process_time()


def _minus(b: tuple[float, float], a: tuple[float, float], n: int = 1) -> tuple[float, float]:
    return (b[0] - a[0]) / n, (b[1] - a[1]) / n


def _block(plain: TrainStep, batches: list, start: int, end: int, profiler=None) -> tuple[float, float]:
    """Run the plain step on every batch; return the mean (wall, cpu) step time over steps [start, end)."""
    recorder = _Recorder(plain.device, None, batches, start, end, profiler)
    for i, batch in enumerate(batches):
        recorder(i)
        plain(batch)
    return recorder.block


class _Recorder:
    """Called at every Lightning batch start; records Lightning's step times (and runs plain steps).

    step mode (plain given): per batch i, t_a = now; plain step on batch i; t_b = now. The plain step
    took t_b - t_a, and Lightning's step i-1 took t_a[i] - t_b[i-1]: everything Lightning does from one
    batch start to the next, with the plain step cut out.
    block mode (plain None): only batches `start` and `end` are stamped (no device sync in between);
    also where the optional cProfile window opens and closes.
    """

    def __init__(
        self,
        device: str,
        plain: TrainStep | None,
        batches: list,
        start: int,
        end: int,
        profiler: cProfile.Profile | None = None,
    ):
        self.device, self.plain, self.batches = device, plain, batches
        self.start, self.end, self.profiler = start, end, profiler
        self.lightning: list[tuple[float, float]] = []  # step mode: Lightning step i, i >= start
        self.paired: list[tuple[float, float]] = []  # step mode: the plain step i run beside it
        self.block: tuple[float, float] | None = None  # block mode: mean step over [start, end)
        self._end = self._a = None

    def __call__(self, i: int) -> None:
        if self.plain is None:
            if i == self.end and self.profiler:
                self.profiler.disable()
            if i in (self.start, self.end):
                t = _now(self.device)
                if i == self.start:
                    self._a = t
                else:
                    self.block = _minus(t, self._a, self.end - self.start)
            if i == self.start and self.profiler:
                self.profiler.enable()
            return
        a = _now(self.device)
        if self._end is not None and self.start < i <= self.end:
            self.lightning.append(_minus(a, self._end))
        self.plain(self.batches[i])
        self._end = _now(self.device)
        if self.start <= i < self.end:
            self.paired.append(_minus(self._end, a))


def _lightning_round(system, batches, variant: str, s, recorder: _Recorder, logdir: str) -> None:
    """One Trainer.fit of `system` as `variant` (see the module docstring); s: run()'s settings."""
    import lightning as L

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            recorder(batch_idx)

    logger, callbacks, null = False, [StepTimer()], None
    if variant == "csv_logger":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(logdir or tempfile.gettempdir(), name="stale-bench")
    if variant == "lightning":  # the default run's bar: conf/callbacks/default.yaml's progress_bar node
        callbacks.append(default_progress_bar())
    if variant in ("rich", "rich_4hz"):
        from lightning.pytorch.callbacks import RichProgressBar  # Lightning's default bar (rich is a dependency)

        null = open(os.devnull, "w")  # drawn as on a terminal, into /dev/null
        console = {"force_terminal": True, "file": null, "width": 120}
        rate = {"refresh_rate": 4} if variant == "rich_4hz" else {}  # default: 100 redraws per second
        callbacks.append(RichProgressBar(console_kwargs=console, **rate))
    if variant == "tqdm":  # redraws every batch in the training thread, to stderr (redirected by _quiet)
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar())
    kwargs = dict(
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=variant in ("lightning", "rich", "rich_4hz", "tqdm"),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=s.log_every_n_steps,
    )
    if variant == "barebones":  # it switches those off itself and refuses to be told
        kwargs = dict(barebones=True)
    trainer = L.Trainer(
        accelerator="gpu" if s.device.startswith("cuda") else "cpu",
        devices=1,
        precision=s.precision,
        max_steps=len(batches),
        max_epochs=1,
        limit_val_batches=0,
        gradient_clip_val=s.gradient_clip_val or None,
        callbacks=callbacks,
        default_root_dir=logdir,
        **kwargs,
    )
    if variant == "no_log":  # the real training_step, minus its self.log calls
        system.log = system.log_dict = lambda *a, **k: None
    try:
        trainer.fit(system, train_dataloaders=InMemory(batches))
    finally:
        system.__dict__.pop("log", None)
        system.__dict__.pop("log_dict", None)
        if null is not None:
            import rich

            rich.reconfigure()  # RichProgressBar reconfigured rich's global console: give it back
            null.close()
    if trainer.global_step != len(batches):
        raise RuntimeError(f"Lightning ran {trainer.global_step} of {len(batches)} steps ({variant})")


def _profile_split(profiler: cProfile.Profile, steps: int, top: int) -> dict:
    """Per-step self time (ms) grouped by where the code lives, and the top Lightning functions."""
    st = pstats.Stats(profiler, stream=io.StringIO())
    groups: dict[str, float] = {}
    light: list[tuple[float, float, str]] = []
    for (file, line, fn), (_, ncalls, tt, ct, _) in st.stats.items():
        f = file.replace("\\", "/")
        if "/lightning/" in f or "/lightning_utilities/" in f or "/torchmetrics/" in f:
            g = "lightning"
            light.append((tt, ct, f"{f.split('site-packages/')[-1]}:{line}({fn}) x{ncalls // max(steps, 1)}"))
        elif "/torch/" in f:
            g = "torch_python"
        elif "/stale/" in f:
            g = "stale"
        elif file == "~":
            g = "c_builtins"  # kernels, autograd's run_backward, tensor methods: the real work
        else:
            g = "other_python"
        groups[g] = groups.get(g, 0.0) + tt
    light.sort(reverse=True)
    per_step = {k: round(1e3 * v / steps, 3) for k, v in sorted(groups.items())}
    per_step["total"] = round(sum(per_step.values()), 3)
    return {
        "self_ms_per_step": per_step,
        "top_lightning_self_ms_per_step": [
            {"fn": name, "self_ms": round(1e3 * tt / steps, 3), "cum_ms": round(1e3 * ct / steps, 3)}
            for tt, ct, name in light[:top]
        ],
    }


def _row(name: str, lightning: list, plain: list, pairs: list) -> dict:
    """One Lightning variant against the plain steps (or runs) beside it; times are (wall, cpu) tuples."""
    lw, lc = [w for w, _ in lightning], [c for _, c in lightning]
    pw, pc = [w for w, _ in plain], [c for _, c in plain]
    return {
        "loop": name,
        "samples": len(lw),
        "median_ms": round(1e3 * median(lw), 3),
        "plain_median_ms": round(1e3 * median(pw), 3),
        "overhead": round(median(lw) / median(pw) - 1, 4),
        "overhead_paired": round(median(pairs) - 1, 4),
        "overhead_cpu": round(median(lc) / median(pc) - 1, 4),
        "overhead_mean": round(sum(lw) / sum(pw) - 1, 4),
        "overhead_error": round(median_error(pairs), 4) if len(pairs) >= 4 else None,  # None: too few rounds
        "extra_ms": round(1e3 * (median(lw) - median(pw)), 3),
        "noise": round(spread(lw), 4),
    }


def _measure(s: SimpleNamespace, overrides: dict) -> tuple[list, dict, int, str]:
    """Rows (plain first, then each variant), cProfile splits, parameter count and why the rounds stopped."""
    torch.manual_seed(s.seed)
    base = build(s.model, s.frames, s.size, **overrides)
    n_params = sum(p.numel() for p in base.parameters())
    pool_batches = random_batches(s.pool, s.batch_size, s.frames, s.size, seed=s.seed)
    n = s.warmup + s.steps + 1  # +1: a Lightning step's period ends at the next batch's start
    batches = [pool_batches[i % s.pool] for i in range(n)]  # references: no extra memory
    start, end, variants = s.warmup, s.warmup + s.steps, s.variants

    systems = {name: make_system(copy.deepcopy(base), s.lr).to(s.device) for name in ["plain", *variants]}
    lit = {name: [] for name in variants}  # Lightning (wall, cpu) samples
    pla = {name: [] for name in variants}  # plain samples measured beside them, one for one

    def pairs(name: str) -> list[float]:  # per-sample wall ratios
        return [lw / pw for (lw, _), (pw, _) in zip(lit[name], pla[name])]

    logdir = tempfile.mkdtemp(prefix="stale-bench-train-")
    profiles = {}
    began, stopped = time.perf_counter(), "max_rounds"
    with _quiet():
        plain = TrainStep(
            systems.pop("plain"), s.device, s.precision, s.gradient_clip_val, steps=n * (s.rounds * 2 + 2)
        )
        for r in range(max(s.rounds, s.max_rounds)):  # at least `rounds`; more until the headline is precise
            if r >= s.rounds and median_error(pairs(variants[0])) <= TARGET_OVERHEAD:
                stopped = "target error reached"
                break
            if r >= s.rounds and s.max_seconds is not None and time.perf_counter() - began > s.max_seconds:
                stopped = "max_seconds"  # the section's time budget: stale-bench has 5 minutes in all
                break
            for name in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotate the order
                if s.timing == "step":
                    rec = _Recorder(s.device, plain, batches, start, end)
                    _lightning_round(systems[name], batches, name, s, rec, logdir)
                    lit[name] += rec.lightning
                    pla[name] += rec.paired
                else:
                    pla[name].append(_block(plain, batches, start, end))
                    rec = _Recorder(s.device, None, batches, start, end)
                    _lightning_round(systems[name], batches, name, s, rec, logdir)
                    lit[name].append(rec.block)
        if s.profile:
            prof = cProfile.Profile()
            _block(plain, batches, start, end, profiler=prof)
            profiles["plain"] = _profile_split(prof, s.steps, s.profile_top)
            prof = cProfile.Profile()
            rec = _Recorder(s.device, None, batches, start, end, profiler=prof)
            _lightning_round(systems[variants[0]], batches, variants[0], s, rec, logdir)
            profiles[variants[0]] = _profile_split(prof, s.steps, s.profile_top)
    shutil.rmtree(logdir, ignore_errors=True)

    all_plain = [w for name in variants for w, _ in pla[name]]
    head = {
        "loop": "plain",
        "samples": len(all_plain),
        "median_ms": round(1e3 * median(all_plain), 3),
        "noise": round(spread(all_plain), 4),
    }
    return [head, *(_row(name, lit[name], pla[name], pairs(name)) for name in variants)], profiles, n_params, stopped


def run(
    model: str = "tiny",
    frames: int = 8,
    size: int = 16,
    batch_size: int = 16,
    steps: int = 12,
    warmup: int = 2,
    rounds: int = 3,
    max_rounds: int = 12,
    pool: int = 4,
    precision: str = "auto",
    gradient_clip_val: float = 1.0,
    lr: float = 1e-3,
    variants=VARIANTS[:5],
    log_every_n_steps: int = 10,
    timing: str = "block",
    profile: bool = True,
    profile_top: int = 15,
    micro: dict | None = None,
    device: str = "cpu",
    seed: int = 0,
    max_seconds: float | None = None,
) -> dict:
    """Framework overhead of each Lightning variant against a plain loop; see the module docstring.

    micro: optional model overrides (e.g. {dim: 32, depth: 2, heads: 2, frames: 2, size: 8, batch_size: 1})
    for a second measurement whose step is so cheap that Lightning's fixed cost per step shows in ms.
    """
    variants = list(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"train.variants={variants}: unknown {bad}; known: {list(VARIANTS)}")
    if steps < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"train: steps={steps} and rounds={rounds} must be >= 1, warmup={warmup} >= 0")
    if timing not in ("step", "block"):
        raise ValueError(f"train.timing={timing!r} is not one of step, block")
    precision = resolve_precision(precision, device, "train.precision")
    s = SimpleNamespace(**{k: v for k, v in locals().items() if k != "micro"})  # the settings every fit shares
    rows, profiles, n_params, stopped = _measure(s, {})
    head = rows[1]
    summary = {
        "framework_overhead": head["overhead_paired"],
        "framework_overhead_error": head["overhead_error"],
        "rounds": head["samples"],
        "stopped": stopped,
        "framework_overhead_cpu": head["overhead_cpu"],
        "compared": f"{head['loop']} vs plain",
        "target": TARGET_OVERHEAD,
        "meets_target": head["overhead_paired"] <= TARGET_OVERHEAD,
        "extra_ms_per_step": head["extra_ms"],
    }
    setup = {
        "model": model,
        "parameters": n_params,
        "clip": [frames, size, size],
        "batch_size": batch_size,
        "precision": precision,
        "gradient_clip_val": gradient_clip_val,
        "timing": timing,
        "rounds": rounds,
        "steps_per_fit": steps,
        "warmup": warmup,
        "log_every_n_steps": log_every_n_steps,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    if micro:
        m = dict(micro)
        m_frames, m_size, m_batch = m.pop("frames", 2), m.pop("size", 8), m.pop("batch_size", 1)
        # Lightning's fixed ms per step, for reading beside any step time: `rounds` rounds, no error target
        m_s = SimpleNamespace(**{**vars(s), "frames": m_frames, "size": m_size, "batch_size": m_batch})
        m_s.profile, m_s.max_rounds, m_s.max_seconds = False, rounds, None
        m_rows, _, m_params, _ = _measure(m_s, m)
        for r in m_rows:
            r["loop"] = f"{r['loop']} (micro)"
        rows += m_rows
        summary["micro_extra_ms_per_step"] = m_rows[1]["extra_ms"]
        setup["micro"] = {**micro, "parameters": m_params}
    unit = "step" if timing == "step" else f"fit of {steps} steps"
    out = {
        "rows": rows,
        "summary": summary,
        "setup": setup,
        "notes": [
            f"timing={timing}: one sample per {unit}; same weights, in-memory batches, optimiser and "
            "scheduler (StaleSystem.configure_optimizers), clipping and precision on both sides",
            "framework_overhead (the headline) = overhead_paired: median of per-round ratios of "
            "Lightning to the plain run beside it, - 1; overhead_error: the standard error of that median "
            f"(rounds run on from {rounds} until it is <= the {TARGET_OVERHEAD:.0%} target, at most {max_rounds} "
            f"rounds or max_seconds={max_seconds}; `stopped` says which ended it); "
            "meets_target: overhead <= target (read it with the error beside it). "
            "overhead = median(Lightning) / median(plain beside it) - 1 (wall); overhead_cpu: the same "
            "with process CPU time (steadier on a shared machine); overhead_paired: median of "
            "per-sample ratios; overhead_mean: ratio of sums (catches periodic costs such as logging "
            f"every {log_every_n_steps} steps); extra_ms: difference of medians; noise: half IQR / "
            f"median. {rounds} rounds x {steps} steps per variant, first {warmup} of each fit dropped",
        ],
    }
    if micro:
        out["notes"].append(
            "(micro) rows: a model so small that the step is mostly framework; extra_ms is "
            "Lightning's fixed cost per step, to set against any step time"
        )
    if profiles:
        out["profile"] = profiles
        out["notes"].append(
            "profile: cProfile self time per step by code location, plain vs "
            f"{variants[0]}; cProfile slows Python code, so compare the groups between the "
            "two loops rather than reading absolute ms"
        )
    return out
