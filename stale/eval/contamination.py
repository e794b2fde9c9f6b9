"""Train-test contamination: fingerprint every clip of two shard sets, find near-duplicate pairs, clean the test set.

The paper leaves "train-test contamination" as future work; this is the tool that lets a user show there is none
(docs/evaluation.md): fingerprint_shards (dHash of a few evenly spaced frames per clip, stale.eval.fingerprint),
find_pairs (median matched-frame Hamming distance <= threshold, XOR + popcount in cache-sized tiles;
docs/bench/contamination.md), clean_test_shards (the flagged test shards rewritten without those clips).

Prefilter: with K frames per clip, "median <= threshold" needs need = ceil(K/2) frames within the threshold, so at
least one of any K - need + 1 frames is within it; the search scans only those and checks the exact median on the
few pairs that pass.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from stale.data.reader import SHARD_REASONS, Skip, SkipCounter, check_sample, expand_shards, read_shard, sample_name
from stale.data.video_io import VideoDecodeError, decode_mp4
from stale.eval.fingerprint import DEFAULT_FRAMES, DEFAULT_THRESHOLD, clip_fingerprint, hamming

log = logging.getLogger(__name__)


# --- fingerprints of shards --------------------------------------------------------------------------


@dataclass
class Fingerprints:
    """One row per clip: its frame hashes, key and shard."""

    hashes: np.ndarray  # (N, K) uint64
    keys: list[str]
    shards: list[str]
    errors: list[str] = field(default_factory=list)  # skipped clips and shards, "[reason] shard:key: why"

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def concat(cls, parts: list["Fingerprints"], frames: int) -> "Fingerprints":
        hashes = [p.hashes for p in parts if len(p)]
        return cls(
            np.concatenate(hashes) if hashes else np.zeros((0, frames), np.uint64),
            [k for p in parts for k in p.keys],
            [s for p in parts for s in p.shards],
            [e for p in parts for e in p.errors],
        )


def fingerprint_shard(url: str, frames: int = DEFAULT_FRAMES) -> Fingerprints:
    """Fingerprint every clip of one shard, read by stale.data.reader (labels are not needed, not read).

    Bad samples and shards are skipped by the readers' rule and listed as "[reason] detail", not fatal.
    """
    hashes, keys, errors = [], [], []
    counter = SkipCounter("contamination", log_first=0)  # listed in the report instead
    for sample in read_shard(url, counter):
        name = sample_name(sample)
        try:
            check_sample(sample, label_key=None)
            try:
                video = decode_mp4(sample["mp4"], name=name)
            except VideoDecodeError as e:
                raise Skip("corrupt_video", str(e)) from None
        except Skip as e:
            counter.skip(e.reason, url)
            errors.append(f"[{e.reason}] {e}")
            continue
        hashes.append(clip_fingerprint(video, frames))
        keys.append(sample["__key__"])
    for reason in counter.take()["reasons"]:
        if reason in SHARD_REASONS:
            errors.append(f"[{reason}] {url}")
    arr = np.stack(hashes) if hashes else np.zeros((0, frames), np.uint64)
    return Fingerprints(arr, keys, [url] * len(keys), errors)


def fingerprint_shards(
    urls: list[str], frames: int = DEFAULT_FRAMES, workers: int = 0, progress: bool = True, desc: str = "fingerprint"
) -> Fingerprints:
    """Fingerprint every clip of every shard; `workers` > 1 decodes shards in parallel processes."""
    bar = tqdm(total=len(urls), desc=desc, unit="shard", disable=not progress)
    parts = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for part in pool.map(fingerprint_shard, urls, [frames] * len(urls)):
                parts.append(part)
                bar.update()
    else:
        for url in urls:
            parts.append(fingerprint_shard(url, frames))
            bar.update()
    bar.close()
    fp = Fingerprints.concat(parts, frames)
    for err in fp.errors:
        log.warning("skipped clip: %s", err)
    return fp


# --- the pair search ---------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Near-duplicate pairs: row i of the query set matches row j of the base set."""

    i: np.ndarray  # (P,) int64 query rows
    j: np.ndarray  # (P,) int64 base rows
    distance: np.ndarray  # (P,) float: median matched-frame Hamming distance
    frame_distances: np.ndarray  # (P, K) uint8

    def __len__(self) -> int:
        return len(self.i)


def find_pairs(
    query: np.ndarray,
    base: np.ndarray | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    block: int = 32,
    tile: int = 16384,
    progress: bool = False,
    desc: str = "pairs",
) -> Pairs:
    """All (i, j) with median_k hamming(query[i, k], base[j, k]) <= threshold.

    query (Nq, K) and base (Nb, K) uint64. base=None searches within `query`, each unordered pair once
    (i < j). Work is done in (block x tile) tiles so the temporaries stay in cache.
    """
    within = base is None
    base = query if within else base
    if query.ndim != 2 or base.ndim != 2 or query.shape[1] != base.shape[1]:
        raise ValueError(f"fingerprints must be (N, K) with the same K, got {query.shape} and {base.shape}")
    nq, k = query.shape
    nb = base.shape[0]
    empty = Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, k), np.uint8))
    if nq == 0 or nb == 0:
        return empty
    need = (k + 1) // 2  # frames within the threshold that a median <= threshold requires
    scan = k - need + 1  # pigeonhole: one of any `scan` frames must be within the threshold
    query = np.ascontiguousarray(query, dtype=np.uint64)
    base_t = np.ascontiguousarray(base.T, dtype=np.uint64)  # (K, Nb): one contiguous row per frame
    x = np.empty((block, tile), np.uint64)  # XOR buffer
    d = np.empty((block, tile), np.uint8)  # popcount buffer
    dmin = np.empty((block, tile), np.uint8)  # smallest distance over the scanned frames
    cand_i, cand_j = [], []
    bar = tqdm(total=nq, desc=desc, unit="clip", disable=not progress, unit_scale=True)
    for i0 in range(0, nq, block):
        i1 = min(i0 + block, nq)
        b = i1 - i0
        q = query[i0:i1]
        for j0 in range(i0 + 1 if within else 0, nb, tile):  # within a set: only j > i0 (i < j masked below)
            j1 = min(j0 + tile, nb)
            w = j1 - j0
            xb, db, mb = x[:b, :w], d[:b, :w], dmin[:b, :w]
            for f in range(scan):
                np.bitwise_xor(q[:, f, None], base_t[f, None, j0:j1], out=xb)
                if f == 0:
                    _popcount_into(xb, mb)
                else:
                    _popcount_into(xb, db)
                    np.minimum(mb, db, out=mb)
            ii, jj = np.nonzero(mb <= threshold)
            if len(ii):
                ii, jj = ii + i0, jj + j0
                if within:
                    keep = jj > ii
                    ii, jj = ii[keep], jj[keep]
                cand_i.append(ii)
                cand_j.append(jj)
        bar.update(b)
    bar.close()
    if not cand_i:
        return empty
    ci, cj = np.concatenate(cand_i), np.concatenate(cand_j)
    fd = hamming(query[ci], base[cj])  # (P, K) exact distances of the candidates
    med = np.median(fd, axis=1)
    keep = med <= threshold
    order = np.lexsort((cj[keep], ci[keep]))
    return Pairs(ci[keep][order], cj[keep][order], med[keep][order], fd[keep][order])


def _popcount_into(x: np.ndarray, out: np.ndarray) -> None:
    if hasattr(np, "bitwise_count"):
        np.bitwise_count(x, out=out)
    else:  # NumPy < 2: byte table
        out[...] = hamming(x, np.uint64(0))


# --- cleaning the test shards ------------------------------------------------------------------------

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's key rule: the name up to the first dot


def rewrite_shard_without(src: str, dst: str, drop: set[str]) -> tuple[int, int]:
    """Copy tar `src` to `dst` member by member (bytes untouched), leaving out samples whose key is in `drop`.

    Returns (samples kept, samples dropped).
    """
    kept, dropped = set(), set()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{dst}.tmp"
    with tarfile.open(src, "r") as tin, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tout:
        for member in tin:
            m = _KEY_RE.match(member.name)
            key = m.group(1) if m else member.name
            if key in drop:
                dropped.add(key)
                continue
            kept.add(key)
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
    os.replace(tmp, dst)
    return len(kept), len(dropped)


def clean_test_shards(
    test: Fingerprints, drop_rows: np.ndarray, clean_dir: str | Path, write_shards: bool = True
) -> dict:
    """The test set without the flagged clips.

    write_shards=True: every test shard holding a flagged clip is rewritten into clean_dir without it;
    the other shards are listed by their original path. write_shards=False: shards holding a flagged clip
    are left out of the list entirely (coarser: their clean clips go too, but nothing is written).
    """
    drop_by_shard: dict[str, set[str]] = {}
    for r in np.unique(drop_rows):
        drop_by_shard.setdefault(test.shards[r], set()).add(test.keys[r])
    all_shards = list(dict.fromkeys(test.shards))  # in order, once each
    listed, rewritten = [], []
    for shard in all_shards:
        drop = drop_by_shard.get(shard)
        if not drop:
            listed.append(os.path.abspath(shard))
        elif write_shards:
            dst = str(Path(clean_dir).resolve() / Path(shard).name)
            if os.path.abspath(dst) == os.path.abspath(shard):
                raise ValueError(f"clean_dir would overwrite the original shard {shard}; choose another clean_dir")
            kept, dropped = rewrite_shard_without(shard, dst, drop)
            if kept:
                listed.append(dst)
            else:  # every clip was a duplicate: no emptied tar left behind (loaders reject empty shards)
                Path(dst).unlink()
                dst = None
            rewritten.append({"source": shard, "shard": dst, "kept": kept, "dropped": dropped})
    n_drop = int(len(np.unique(drop_rows)))
    removed_clips = n_drop if write_shards else sum(test.shards.count(s) for s in drop_by_shard)
    return {
        "mode": "rewritten shards" if write_shards else "shard filter",
        "shards": listed,
        "rewritten": rewritten,
        "clips_removed": removed_clips,
        "clips_kept": len(test) - removed_clips,
    }


# --- the whole check ---------------------------------------------------------------------------------


def _pair_rows(pairs: Pairs, a: Fingerprints, b: Fingerprints, name_a: str, name_b: str) -> list[dict]:
    return [
        {
            f"{name_a}_key": a.keys[i],
            f"{name_a}_shard": a.shards[i],
            f"{name_b}_key": b.keys[j],
            f"{name_b}_shard": b.shards[j],
            "distance": float(dist),
            "frame_distances": fd.tolist(),
        }
        for i, j, dist, fd in zip(pairs.i, pairs.j, pairs.distance, pairs.frame_distances)
    ]


def check_contamination(
    train,
    test,
    out: str | Path,
    threshold: float = DEFAULT_THRESHOLD,
    frames: int = DEFAULT_FRAMES,
    within: bool = True,
    dedupe_test: bool = True,
    write_shards: bool = True,
    clean_dir: str | Path | None = None,
    workers: int = 0,
    block: int = 32,
    tile: int = 16384,
    progress: bool = True,
) -> dict:
    """Fingerprint both sets, find pairs across and within them, write the JSON report and the clean test set.

    Writes `out` (JSON), `<out stem>.clean-test.txt` (the clean test shards, one path per line) and, when
    write_shards, the rewritten shards in `clean_dir` (default `<out stem>-clean/`). Returns the report.
    """
    if threshold < 0 or threshold > 64:
        raise ValueError(f"threshold={threshold} must be in [0, 64] (Hamming distance of 64-bit hashes)")
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    clean_dir = Path(clean_dir) if clean_dir else Path(f"{stem}-clean")
    list_file = Path(f"{stem}.clean-test.txt")
    seconds = {}
    t0 = time.perf_counter()
    train_urls, test_urls = expand_shards(train, "train"), expand_shards(test, "test")
    overlap = sorted(set(map(os.path.abspath, train_urls)) & set(map(os.path.abspath, test_urls)))
    if overlap:
        raise ValueError(f"the same shard is in train and test: {overlap[:3]}")
    fp_train = fingerprint_shards(train_urls, frames, workers, progress, desc="fingerprint train")
    fp_test = fingerprint_shards(test_urls, frames, workers, progress, desc="fingerprint test")
    seconds["fingerprint"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    kw = dict(threshold=threshold, block=block, tile=tile, progress=progress)
    cross = find_pairs(fp_test.hashes, fp_train.hashes, desc="test x train", **kw)
    in_train = find_pairs(fp_train.hashes, desc="train x train", **kw) if within else None
    in_test = find_pairs(fp_test.hashes, desc="test x test", **kw) if within else None
    seconds["search"] = time.perf_counter() - t0

    drop = set(cross.i.tolist())  # test clips that are near-duplicates of a training clip
    if dedupe_test and in_test is not None:
        drop |= set(in_test.j.tolist())  # of each within-test pair keep the earlier clip, drop the later
    clean = clean_test_shards(fp_test, np.array(sorted(drop), dtype=np.int64), clean_dir, write_shards)
    list_file.parent.mkdir(parents=True, exist_ok=True)
    list_file.write_text("".join(f"{s}\n" for s in clean["shards"]))
    clean["list"] = str(list_file.resolve())

    report = {
        "method": {
            "hash": "dHash 9x8 grey, 64 bits",
            "frames_per_clip": frames,
            "threshold": threshold,
            "rule": "median Hamming distance of matched frames <= threshold",
        },
        "train": {
            "pattern": str(train),
            "shards": len(train_urls),
            "clips": len(fp_train),
            "unreadable": fp_train.errors,
        },
        "test": {"pattern": str(test), "shards": len(test_urls), "clips": len(fp_test), "unreadable": fp_test.errors},
        "counts": {
            "train_test": len(cross),
            "within_train": len(in_train) if in_train is not None else None,
            "within_test": len(in_test) if in_test is not None else None,
            "contaminated_test_clips": len(set(cross.i.tolist())),
        },
        "pairs": {
            "train_test": _pair_rows(cross, fp_test, fp_train, "test", "train"),
            "within_train": _pair_rows(in_train, fp_train, fp_train, "a", "b") if in_train is not None else None,
            "within_test": _pair_rows(in_test, fp_test, fp_test, "a", "b") if in_test is not None else None,
        },
        "clean_test": clean,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report
