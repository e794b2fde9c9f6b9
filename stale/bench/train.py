"""Framework overhead: the Lightning training step versus a plain PyTorch loop doing the same work.

Both sides get the same model (identical initial weights), the same pre-decoded uint8 batches held in
memory (so no data loader is measured here), the same objective, the optimiser and LR scheduler built
by StaleSystem.configure_optimizers(), the same gradient clipping and the same precision. The step time
is the period between the starts of consecutive steps, so everything the framework does per step
(hooks, logging, progress bar, scheduler, fetching the next batch) is inside it. Rounds of every
variant are interleaved (order rotated each round) and the first `warmup` steps of every round are
dropped, so that drift of a shared machine hits all variants alike; the headline is a ratio of
medians measured in one run.

Lightning variants (each a real Trainer.fit of the real StaleSystem):
  lightning        Trainer defaults with logger=False and checkpointing off (the progress bar stays on,
                   as in stale-train; it writes to /dev/null here so the console stays readable)
  no_progress_bar  as lightning, without the progress bar
  no_log           as no_progress_bar, with StaleSystem.log/log_dict replaced by no-ops
  csv_logger       as no_progress_bar, with a CSVLogger writing every `csv_every` steps
With `profile=true` one more round of `lightning` and of the plain loop runs under cProfile, and the
time per step is split by where the Python code lives (lightning, torch, stale, C builtins).
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

import torch

from stale.bench import build, median, random_batches, spread, sync

VARIANTS = ("lightning", "no_progress_bar", "no_log", "csv_logger")
TARGET_OVERHEAD = 0.03  # issue 11: framework overhead <= 3%


def _precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16-mixed" if device.startswith("cuda") else "32-true"
    if precision in ("32", 32):
        return "32-true"
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"train.precision={precision!r}: the plain loop supports 32-true and bf16-mixed")
    return precision


def _make_system(model, lr: float):
    from stale.diffusion.objective import StaleObjective
    from stale.system.stale_system import StaleSystem

    return StaleSystem(model, StaleObjective(), lr=lr, schedule={"name": "constant", "warmup": 0})


@contextlib.contextmanager
def _quiet():
    """Lightning's per-Trainer info lines and the progress bar would bury the table: send them away."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


class _InMemory:
    """The pre-decoded batches as one iterable (a bare list would be read as a list of dataloaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _now(device: str) -> tuple[float, float]:
    """(wall, process CPU) seconds after synchronising the device.

    Process CPU time counts the work of every thread of this process but not the time spent waiting for
    a core, so on a shared machine it is far steadier than wall time; wall time is what a user waits for
    (and the only one that matters on a GPU). Both are reported.
    """
    sync(device)
    return time.perf_counter(), time.process_time()


class _PlainLoop:
    """What Trainer.fit does per step, written out: to device, autocast forward, backward, clip, step."""

    def __init__(self, system, device: str, precision: str, clip: float, max_steps: int):
        self.system, self.device, self.clip = system, device, clip
        self.amp = precision == "bf16-mixed"
        self.dev_type = "cuda" if device.startswith("cuda") else "cpu"
        self.opt, self.sched = _plain_optimizer(system, device, max_steps)

    def step(self, batch) -> None:
        from stale.system.stale_system import to_unit_range

        model, objective = self.system.model, self.system.objective
        model.train()
        video, label = batch
        video, label = video.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True)
        with torch.autocast(self.dev_type, dtype=torch.bfloat16, enabled=self.amp):
            loss = objective(model, to_unit_range(video), label, self.system.null_label)["loss"]
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)


class _Recorder:
    """Step periods of one Lightning fit, with a plain step run inside each on_train_batch_start.

    Per batch i: t_a = now; plain step on batch i; t_b = now. The plain step took t_b - t_a, and
    Lightning's step i-1 took t_a[i] - t_b[i-1]: everything Lightning does from one batch start to the
    next, with the plain step cut out. The two loops alternate step by step, so load changes on a shared
    machine reach both alike. With plain=None only Lightning's periods are recorded (profiling).
    """

    def __init__(self, device: str, plain: "_PlainLoop | None", batches: list,
                 profile_window: tuple[int, int] | None = None):
        self.device, self.plain, self.batches, self.window = device, plain, batches, profile_window
        self.lightning: list[tuple[float, float]] = []  # (wall, cpu) seconds per step
        self.paired: list[tuple[float, float]] = []  # the plain step run next to each
        self._end = None
        self.profiler = cProfile.Profile() if profile_window else None

    def __call__(self, i: int) -> None:
        if self.profiler and i == self.window[1]:
            self.profiler.disable()
        a = _now(self.device)
        if self._end is not None:
            self.lightning.append((a[0] - self._end[0], a[1] - self._end[1]))
        self._end = a
        if self.plain is not None:
            self.plain.step(self.batches[i])
            self._end = _now(self.device)
            self.paired.append((self._end[0] - a[0], self._end[1] - a[1]))
        if self.profiler and i == self.window[0]:
            self.profiler.enable()


def _profile_plain(plain: _PlainLoop, batches: list, warmup: int, steps: int) -> cProfile.Profile:
    prof = cProfile.Profile()
    for i, batch in enumerate(batches[: warmup + steps]):
        if i == warmup:
            prof.enable()
        plain.step(batch)
    prof.disable()
    return prof

def _lightning_round(system, batches, variant: str, device: str, precision: str, clip: float,
                     stamps: "_Recorder", csv_every: int, logdir: str) -> None:
    import lightning as L

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stamps(batch_idx)

    logger = False
    if variant == "csv_logger":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(logdir, name="bench")
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, precision=precision,
        max_steps=len(batches), max_epochs=1, logger=logger, enable_checkpointing=False,
        enable_progress_bar=variant == "lightning", enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, log_every_n_steps=csv_every, gradient_clip_val=clip or None,
        callbacks=[StepTimer()], default_root_dir=logdir,
    )
    if variant == "no_log":  # the real training_step, minus its self.log calls
        system.log = system.log_dict = lambda *a, **k: None
    try:
        trainer.fit(system, train_dataloaders=_InMemory(batches))
    finally:
        system.__dict__.pop("log", None)
        system.__dict__.pop("log_dict", None)
    if trainer.global_step != len(batches):
        raise RuntimeError(f"Lightning ran {trainer.global_step} of {len(batches)} steps ({variant})")


def _plain_optimizer(system, device: str, max_steps: int):
    """The optimiser and scheduler of StaleSystem.configure_optimizers (it reads trainer.max_steps)."""
    import lightning as L

    system.trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                               max_steps=max_steps, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    try:
        conf = system.configure_optimizers()
    finally:
        system.trainer = None
    if isinstance(conf, torch.optim.Optimizer):
        return conf, None
    sched = conf.get("lr_scheduler")
    return conf["optimizer"], (sched["scheduler"] if isinstance(sched, dict) else sched)


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
    return {"self_ms_per_step": per_step,
            "top_lightning_self_ms_per_step": [{"fn": name, "self_ms": round(1e3 * tt / steps, 3),
                                                "cum_ms": round(1e3 * ct / steps, 3)}
                                               for tt, ct, name in light[:top]]}


def _stats(lightning: list, plain: list, name: str) -> dict:
    """Row of one Lightning variant against the plain steps that ran beside it."""
    lw, lc = [w for w, _ in lightning], [c for _, c in lightning]
    pw, pc = [w for w, _ in plain], [c for _, c in plain]
    pairs = [l / p for l, p in zip(lw, pw[1:]) if p > 0]  # Lightning step i-1 with the plain step after it
    return {"loop": name, "steps": len(lw), "median_ms": round(1e3 * median(lw), 3),
            "plain_median_ms": round(1e3 * median(pw), 3), "overhead": round(median(lw) / median(pw) - 1, 4),
            "overhead_paired": round(median(pairs) - 1, 4) if pairs else float("nan"),
            "overhead_cpu": round(median(lc) / median(pc) - 1, 4),
            "overhead_mean": round(sum(lw) / sum(pw[: len(lw)]) - 1, 4) if lw else float("nan"),
            "noise": round(spread(lw), 4)}


def _measure(model: str, overrides: dict, frames: int, size: int, batch_size: int, steps: int, warmup: int,
             rounds: int, pool: int, precision: str, clip: float, lr: float, variants: list, csv_every: int,
             profile: bool, profile_top: int, device: str, seed: int) -> tuple[list, dict, int]:
    torch.manual_seed(seed)
    base = build(model, frames, size, **overrides)
    n_params = sum(p.numel() for p in base.parameters())
    pool_batches = random_batches(pool, batch_size, frames, size, seed=seed)
    n = warmup + steps + 1  # +1: a Lightning step's period ends at the next step's start
    batches = [pool_batches[i % pool] for i in range(n)]  # references: no extra memory

    systems = {name: _make_system(copy.deepcopy(base), lr).to(device) for name in ["plain", *variants]}
    rec = {name: ([], []) for name in variants}  # variant -> (Lightning periods, paired plain periods)
    logdir = tempfile.mkdtemp(prefix="stale-bench-train-")
    profiles = {}
    with _quiet():
        plain = _PlainLoop(systems.pop("plain"), device, precision, clip, max_steps=n * (rounds + 1))
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate the order
            for name in order:
                recorder = _Recorder(device, plain, batches)
                _lightning_round(systems[name], batches, name, device, precision, clip, recorder, csv_every, logdir)
                rec[name][0].extend(recorder.lightning[warmup:])
                rec[name][1].extend(recorder.paired[warmup:])
        if profile:
            profiles["plain"] = _profile_split(_profile_plain(plain, batches, warmup, steps), steps, profile_top)
            recorder = _Recorder(device, None, batches, profile_window=(warmup, warmup + steps))
            _lightning_round(systems[variants[0]], batches, variants[0], device, precision, clip, recorder,
                             csv_every, logdir)
            profiles[variants[0]] = _profile_split(recorder.profiler, steps, profile_top)
    shutil.rmtree(logdir, ignore_errors=True)

    rows = [_stats(*rec[name], name) for name in variants]
    all_plain = [w for name in variants for w, _ in rec[name][1]]
    rows.insert(0, {"loop": "plain", "steps": len(all_plain), "median_ms": round(1e3 * median(all_plain), 3),
                    "noise": round(spread(all_plain), 4)})
    return rows, profiles, n_params


def run(model: str = "tiny", frames: int = 8, size: int = 16, batch_size: int = 16, steps: int = 20,
        warmup: int = 5, rounds: int = 3, pool: int = 4, precision: str = "auto", gradient_clip_val: float = 1.0,
        lr: float = 1e-3, variants=VARIANTS, csv_every: int = 1, profile: bool = True, profile_top: int = 15,
        micro: dict | None = None, device: str = "cpu", seed: int = 0) -> dict:
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
    precision = _precision(str(precision), device)
    common = dict(steps=steps, warmup=warmup, rounds=rounds, pool=pool, precision=precision, clip=gradient_clip_val,
                  lr=lr, variants=variants, csv_every=csv_every, profile_top=profile_top, device=device, seed=seed)
    rows, profiles, n_params = _measure(model, {}, frames, size, batch_size, profile=profile, **common)
    head = rows[1]
    summary = {"framework_overhead": head["overhead"], "framework_overhead_cpu": head["overhead_cpu"],
               "compared": f"{head['loop']} vs plain", "target": TARGET_OVERHEAD,
               "meets_target": head["overhead"] <= TARGET_OVERHEAD,
               "extra_ms_per_step": round(head["median_ms"] - head["plain_median_ms"], 3)}
    setup = {"model": model, "parameters": n_params, "clip": [frames, size, size], "batch_size": batch_size,
             "precision": precision, "gradient_clip_val": gradient_clip_val, "rounds": rounds,
             "steps_per_round": steps, "warmup": warmup, "device": device, "torch_threads": torch.get_num_threads()}
    if micro:
        m = dict(micro)
        m_frames, m_size, m_batch = m.pop("frames", 2), m.pop("size", 8), m.pop("batch_size", 1)
        m_rows, _, m_params = _measure(model, m, m_frames, m_size, m_batch, profile=False, **common)
        for r in m_rows:
            r["loop"] = f"{r['loop']} (micro)"
            if "overhead" in r:
                r["extra_ms"] = round(r["median_ms"] - r["plain_median_ms"], 3)
        rows += m_rows
        summary["micro_extra_ms_per_step"] = m_rows[1]["extra_ms"]
        setup["micro"] = {**micro, "parameters": m_params}
    out = {"rows": rows, "summary": summary, "setup": setup,
           "notes": ["same model weights, in-memory batches, optimiser and scheduler (StaleSystem.configure_optimizers),"
                     " clipping and precision on both sides; the plain step runs inside Lightning's "
                     "on_train_batch_start, so the two alternate step by step",
                     "overhead = median(Lightning step) / median(plain step beside it) - 1 (wall); overhead_cpu: "
                     "the same with process CPU time (steadier on a shared machine); overhead_paired: median of "
                     f"per-step ratios; overhead_mean catches periodic costs; noise: half IQR / median. {rounds} "
                     f"rounds x {steps} steps per variant, order rotated, first {warmup} steps of each fit dropped"]}
    if micro:
        out["notes"].append("(micro) rows: a model so small that the step is mostly framework; extra_ms is "
                            "Lightning's fixed cost per step, to set against any step time")
    if profiles:
        out["profile"] = profiles
        out["notes"].append("profile: cProfile self time per step by code location, plain vs "
                            f"{variants[0]}; cProfile slows Python code, so compare the groups between the "
                            "two loops rather than reading absolute ms")
    return out
