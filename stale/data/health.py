"""Bad data never stops or slows a run silently: skipped samples are counted by reason and by shard (docs/data.md).

Each loader worker's `SkipCounter` (stale.data.reader) sends what it counted *inside* the next batch, so counts
arrive in order with the data, need no shared memory and are exact on resume; the main process sums them in the
DataModule's `DataHealth` (per split), and `DataHealthMonitor` sums them over ranks, logs them (data/*) and stops
training with a `DataHealthError` naming the worst shards once the skip rate passes `data.max_skip_rate`. No
handler sleeps (WebDataset's `warn_and_continue` sleeps 0.5 s per bad sample).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import torch
from lightning.pytorch.callbacks import Callback

from stale.data.reader import NO_SAMPLE, REASONS, likely_fix

log = logging.getLogger(__name__)

_IN_RATE = torch.tensor([r not in NO_SAMPLE for r in REASONS])


class DataHealthError(RuntimeError):
    """Too much of the data is bad; the message names the worst shards and the reasons."""


class DataHealth:
    """Main-process totals, per split: clips delivered and samples skipped (by reason, by shard)."""

    def __init__(self, max_skip_rate: float = 0.05, min_samples: int = 100):
        if not 0 <= max_skip_rate <= 1:
            raise ValueError(f"data.max_skip_rate={max_skip_rate} must be in [0, 1]")
        self.max_skip_rate, self.min_samples = max_skip_rate, min_samples
        self.clips: Counter = Counter()  # split -> clips delivered
        self.reasons: dict[str, Counter] = defaultdict(Counter)  # split -> reason -> count
        self.shards: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.buckets: Counter = Counter()  # bucket name -> training clips delivered (data.buckets)
        self.bucket_names: list[str] = []  # the DataModule's buckets, in order: the vector summed over ranks

    def add(self, split: str, clips: int, delta: dict | None, bucket: str | None = None) -> None:
        self.clips[split] += clips
        if bucket is not None:
            self.buckets[bucket] += clips
        if delta:
            self.reasons[split].update(delta["reasons"])
            for url, c in delta["shards"].items():
                self.shards[split][url].update(c)

    def skipped(self, split: str = "train") -> int:
        """Skipped samples (an empty shard is not a sample: see NO_SAMPLE)."""
        return sum(n for r, n in self.reasons[split].items() if r not in NO_SAMPLE)

    def vector(self, split: str = "train") -> torch.Tensor:
        """[clips, count of each REASONS entry] as one float64 tensor, to sum over ranks."""
        return torch.tensor([self.clips[split], *(self.reasons[split][r] for r in REASONS)], dtype=torch.float64)

    def bucket_vector(self) -> torch.Tensor:
        """Clips per bucket (in bucket_names order) as one float64 tensor, to sum over ranks."""
        return torch.tensor([self.buckets[n] for n in self.bucket_names], dtype=torch.float64)

    def worst_shards(self, split: str = "train", k: int = 5) -> list[tuple[str, int, dict]]:
        rows = [(url, sum(c.values()), dict(c)) for url, c in self.shards[split].items()]
        return sorted(rows, key=lambda r: (-r[1], r[0]))[:k]

    def state_dict(self) -> dict:
        return {
            "clips": dict(self.clips),
            "reasons": {s: dict(c) for s, c in self.reasons.items()},
            "shards": {s: {u: dict(c) for u, c in d.items()} for s, d in self.shards.items()},
            "buckets": dict(self.buckets),
        }

    def load_state_dict(self, state: dict) -> None:
        self.clips = Counter(state.get("clips", {}))
        self.buckets = Counter(state.get("buckets", {}))
        self.reasons = defaultdict(Counter, {s: Counter(c) for s, c in state.get("reasons", {}).items()})
        self.shards = defaultdict(lambda: defaultdict(Counter))
        for s, d in state.get("shards", {}).items():
            for u, c in d.items():
                self.shards[s][u] = Counter(c)

    def summary(self, split: str = "train") -> str:
        skipped = self.skipped(split)
        seen = skipped + self.clips[split]
        rate = skipped / seen if seen else 0.0
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.reasons[split].items()) if n) or "none"
        return f"{split}: {self.clips[split]} clips, {skipped} skipped ({rate:.2%}); by reason: {reasons}"


def rate_of(vec: torch.Tensor) -> tuple[float, int, int]:
    """(skip rate, skipped, seen) from a `DataHealth.vector()`."""
    clips, skipped = int(vec[0]), int(vec[1:][_IN_RATE].sum())
    seen = clips + skipped
    return (skipped / seen if seen else 0.0), skipped, seen


def advice(counts: dict, label_key: str | None = "label") -> str:
    """The likely fix of each reason in the skip rate, commonest first: a skip can be the config's (too_short: the
    clip asks for more frames than the data holds) as much as the shards' (corrupt_video)."""
    ranked = sorted(((n, r) for r, n in counts.items() if n and r not in NO_SAMPLE), key=lambda x: (-x[0], x[1]))
    return " ".join(f"{r}: {likely_fix(r, 'data.', label_key)}." for _, r in ranked)


def health_error(
    vec: torch.Tensor,
    worst: list[tuple[str, int, dict]],
    max_rate: float,
    split: str = "train",
    label_key: str | None = "label",
) -> str:
    rate, skipped, seen = rate_of(vec)
    counts = {r: int(n) for r, n in zip(REASONS, vec[1:].tolist()) if n}
    reasons = ", ".join(f"{r}={n}" for r, n in counts.items())
    lines = [f"{u}: {n} skipped ({', '.join(f'{r}={c}' for r, c in sorted(rs.items()))})" for u, n, rs in worst]
    return (
        f"{split} data: {skipped} of {seen} samples skipped ({rate:.2%}), above data.max_skip_rate="
        f"{max_rate:g}. By reason: {reasons}. Worst shards:\n  "
        + "\n  ".join(lines)
        + f"\nLikely fix: {advice(counts, label_key)} Or raise data.max_skip_rate."
    )


def _datamodule_health(trainer) -> DataHealth | None:
    dm = getattr(trainer, "datamodule", None)
    return getattr(dm, "health", None)


def _label_key(trainer) -> str | None:
    """data.label_key, which the advice for missing labels names (a data module of the caller's may have none)."""
    return getattr(trainer.datamodule, "hparams", {}).get("label_key", "label")


class DataHealthMonitor(Callback):
    """Logs the loader's skip counts and stops training when the skip rate passes data.max_skip_rate.

    The counts are summed over ranks before the check, so every rank sees the same rate and stops at the
    same step (no rank is left waiting in a collective). The threshold and the minimum number of samples
    before it applies are the DataModule's (data.max_skip_rate, data.skip_rate_min_samples).
    """

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = every_n_steps  # None: the trainer's log_every_n_steps

    def _reduce(self, trainer, vec: torch.Tensor) -> torch.Tensor:
        if trainer.world_size > 1:
            vec = trainer.strategy.reduce(vec.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        return vec

    def _metrics(self, vec: torch.Tensor, split: str) -> dict:
        rate, skipped, _ = rate_of(vec)
        out = {
            f"data/{split}_clips": float(vec[0]),
            f"data/{split}_skipped": float(skipped),
            f"data/{split}_skip_rate": rate,
        }
        if split == "train":
            out.update({f"data/skipped_{r}": float(n) for r, n in zip(REASONS, vec[1:].tolist()) if n})
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        health = _datamodule_health(trainer)
        if health is None:
            return
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every:
            return
        vec = self._reduce(trainer, health.vector("train"))
        pl_module.log_dict(self._metrics(vec, "train"), on_step=True, on_epoch=False, logger=True)
        if health.bucket_names:  # clips each bucket received, all ranks
            per = self._reduce(trainer, health.bucket_vector())
            pl_module.log_dict(
                {f"data/bucket_{n}": float(c) for n, c in zip(health.bucket_names, per.tolist())},
                on_step=True,
                on_epoch=False,
                logger=True,
            )
        rate, skipped, seen = rate_of(vec)
        if seen >= health.min_samples and rate > health.max_skip_rate:
            worst = health.worst_shards("train")
            if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                gathered = [None] * trainer.world_size
                torch.distributed.all_gather_object(gathered, worst)
                merged: dict[str, tuple[int, Counter]] = {}
                for rows in gathered:
                    for url, n, rs in rows:
                        m = merged.setdefault(url, (0, Counter()))
                        merged[url] = (m[0] + n, m[1] + Counter(rs))
                worst = sorted(((u, n, dict(c)) for u, (n, c) in merged.items()), key=lambda r: -r[1])[:5]
            raise DataHealthError(health_error(vec, worst, health.max_skip_rate, label_key=_label_key(trainer)))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        health = _datamodule_health(trainer)
        if health is None or trainer.sanity_checking:
            return
        vec = self._reduce(trainer, health.vector("val"))
        if vec.sum() > 0 and trainer.is_global_zero:  # already summed over ranks: straight to the loggers
            for logger in trainer.loggers:
                # the step Lightning logs val/loss at: the last optimiser step taken, counted from 0
                logger.log_metrics(self._metrics(vec, "val"), step=max(trainer.global_step - 1, 0))

    def on_train_end(self, trainer, pl_module) -> None:
        health = _datamodule_health(trainer)
        if health is not None and trainer.is_global_zero:
            log.info("data health (rank 0) %s", health.summary("train"))
            if health.skipped("train"):  # below data.max_skip_rate, yet data the run did not train on
                log.warning(
                    "train data skipped on rank 0; likely fix: %s", advice(health.reasons["train"], _label_key(trainer))
                )
            if health.bucket_names:
                log.info(
                    "clips per bucket (rank 0): %s", ", ".join(f"{n}={health.buckets[n]}" for n in health.bucket_names)
                )
            if health.clips["val"] or health.skipped("val"):
                log.info("data health (rank 0) %s", health.summary("val"))
