"""Benchmark of the contamination pair search: n_train x n_test random fingerprints plus planted near-duplicates.

    python -m stale.bench.contamination [n_train] [n_test]

Random 64-bit hashes are almost never within Hamming distance 8 of each other (P ~ 3e-10 per frame pair),
so the only pairs to find are the planted ones: copies of training fingerprints with up to `threshold`
bits flipped in a majority of frames and the other frames replaced. All of them must be found, and nothing
else. Decoding is not timed here: it depends on the codec and the clip size (see docs/bench/contamination.md).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from stale.eval.contamination import find_pairs
from stale.eval.fingerprint import DEFAULT_FRAMES, DEFAULT_THRESHOLD


def planted_fingerprints(
    n_train: int,
    n_test: int,
    frames: int = DEFAULT_FRAMES,
    planted: int = 25,
    threshold: int = DEFAULT_THRESHOLD,
    seed: int = 0,
):
    """Random train/test fingerprints; `planted` test rows are near-copies of train rows. Returns (train, test, truth)."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 2**64, size=(n_train, frames), dtype=np.uint64)
    test = rng.integers(0, 2**64, size=(n_test, frames), dtype=np.uint64)
    need = (frames + 1) // 2  # the median rule needs this many matching frames
    rows = rng.choice(n_test, size=planted, replace=False)
    cols = rng.choice(n_train, size=planted, replace=False)
    for qi, bi in zip(rows, cols):
        # a majority of frames: copies with up to `threshold` bits flipped; the other frames stay random,
        # so only the median rule (not an "every frame" rule) can find the pair
        for f in rng.choice(frames, size=need, replace=False):
            test[qi, f] = train[bi, f]
            for bit in rng.choice(64, size=rng.integers(0, threshold + 1), replace=False):
                test[qi, f] ^= np.uint64(1) << np.uint64(bit)
    return train, test, set(zip(rows.tolist(), cols.tolist()))


def run(
    n_train: int = 100_000,
    n_test: int = 10_000,
    frames: int = DEFAULT_FRAMES,
    threshold: int = DEFAULT_THRESHOLD,
    planted: int = 25,
    repeats: int = 1,
) -> dict:
    """Time find_pairs(test, train) and check that exactly the planted pairs come back."""
    train, test, truth = planted_fingerprints(n_train, n_test, frames, planted, threshold)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        pairs = find_pairs(test, train, threshold=threshold)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU time of this process: less sensitive to a shared machine
    found = {(int(i), int(j)) for i, j in zip(pairs.i, pairs.j)}
    best = min(times)
    return {
        "n_train": n_train,
        "n_test": n_test,
        "frames": frames,
        "threshold": threshold,
        "pairs_compared": n_train * n_test,
        "seconds": round(best, 3),
        "seconds_all": [round(t, 3) for t in times],
        "cpu_seconds": round(min(cpu), 3),
        "clip_pairs_per_second": round(n_train * n_test / best),
        "ns_per_clip_pair": round(best / (n_train * n_test) * 1e9, 3),
        "planted": len(truth),
        "planted_found": len(found & truth),
        "false_pairs": len(found - truth),
        "numpy": np.__version__,
        "popcount": "np.bitwise_count" if hasattr(np, "bitwise_count") else "byte table",
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
    }


def synthetic_roundtrip(n: int = 200, size: int = 16, seed: int = 0) -> dict:
    """How far an mp4 round trip moves a synthetic clip's fingerprint, against the nearest *other* clip.

    Clips come from the embedded dataset's generator, stored as mp4 the way the shards store them (A), then
    decoded and encoded once more (B, a "copy"). Returns percentiles of the median matched-frame distance of
    A to B (should be <= threshold) and of A to its nearest other clip (should be > threshold).
    """
    from stale.data.synthetic import SyntheticSpec, make_clip
    from stale.data.video_io import decode_mp4, encode_mp4
    from stale.eval.fingerprint import clip_fingerprint, hamming

    rng = np.random.default_rng(seed)
    spec = SyntheticSpec(size=size)
    stored = [decode_mp4(encode_mp4(make_clip(rng, spec, int(rng.integers(4))))) for _ in range(n)]
    a = np.stack([clip_fingerprint(c) for c in stored])
    b = np.stack([clip_fingerprint(decode_mp4(encode_mp4(c))) for c in stored])
    self_d = np.median(hamming(a, b), axis=1)
    others = np.median(hamming(a[:, None], a[None]), axis=2)
    np.fill_diagonal(others, 64)
    q = [0, 10, 50, 90, 100]
    return {
        "size": size,
        "clips": n,
        "percentiles": q,
        "copy_distance": np.percentile(self_d, q).tolist(),
        "nearest_other": np.percentile(others.min(1), q).tolist(),
        "copies_found_at_8": float((self_d <= 8).mean()),
        "others_flagged_at_8": float((others.min(1) <= 8).mean()),
    }


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(run(*args), indent=1))
    for size in (16, 64):
        print(json.dumps(synthetic_roundtrip(size=size)))
