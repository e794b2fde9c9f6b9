"""stale-encode: mp4 shards -> latent shards (WebDataset), one sample per clip, resumable (docs/latent.md).

    stale-encode input='shards/train-{000000..000009}.tar' out=LAT vae.pretrained=VAE frames=9 size=64

Each input shard is read with the training reader and the validation clip rule (centre start and crop, no flip)
and becomes `<stem>-NNN.tar` in `out`. A sample is

    <key>.latent.npy   the posterior moments: mean and log-variance stacked on channels, (2C, T', H', W')
    <key>.json         {"label", "source": "<shard>:<key>", "clip": {"frames", "size"}, "latent_shape"[, "bucket"]}
    <key>.txt          the caption, when the source sample had one

An input shard's files are written under out/.partial/ and moved into `out` when it is done; `progress.jsonl`
records each finished one (outputs, counts and the per-channel sums of the statistics), so a killed run restarts
at the first unfinished input shard and measures what an uninterrupted one does; `info.json` is rewritten after
each. With `buckets=` each clip goes to the largest bucket it fits (no keep draws: a cache stores each clip once).
Reading a cache (data=latents) is stale/data/latent_cache.py, below the model in the layering.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shlex
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from stale.data import buckets as bucketing
from stale.data.captions import sample_caption
from stale.data.latent_cache import EMPTY_TEXT, FORMAT, FORMAT_VERSION, INFO, MEMBER, TEXT_MEMBERS, CacheError
from stale.data.reader import Skip, SkipCounter, decode_sample, expand_shards, read_shard, sample_name
from stale.data.video_io import ClipSpec
from stale.diffusion import flow
from stale.latent.autoencoder import Autoencoder, load_autoencoder

log = logging.getLogger("stale")

PROGRESS, PARTIAL = "progress.jsonl", ".partial"
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


# --- writing a cache (stale-encode) -------------------------------------------------------------------


def _sums(moments: torch.Tensor) -> dict:
    """Per-channel sums over a batch: count, sum of means, sum of (mean^2 + var) (the second moment of a draw)."""
    mean, logvar = moments.double().chunk(2, dim=1)
    dims = (0, 2, 3, 4)
    return {
        "n": mean[:, 0].numel(),
        "s1": mean.sum(dims).tolist(),
        "s2": (mean.pow(2) + logvar.exp()).sum(dims).tolist(),
    }


def _stats(records: list[dict], ae: Autoencoder | None = None) -> dict | None:
    n = sum(r["sums"]["n"] for r in records if r.get("sums"))
    if not n:
        return None
    s1 = np.sum([r["sums"]["s1"] for r in records if r.get("sums")], axis=0)
    s2 = np.sum([r["sums"]["s2"] for r in records if r.get("sums")], axis=0)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    out = {"mean": mean.tolist(), "std": std.tolist(), "values_per_channel": int(n)}
    if ae is not None and ae.normalization == "vae":  # how close the autoencoder's own constants bring it to 1
        out["std_after_vae_normalization"] = (std * ae.scale.double().numpy()).tolist()
    return out


def _settings(
    ae: Autoencoder,
    frames: int,
    size: int,
    fps,
    frame_stride: int,
    latent_dtype: str,
    label_key,
    text=None,
    missing_caption: str = "skip",
    assigner: bucketing.Assigner | None = None,
) -> dict:
    vae = {k: ae.source.get(k) for k in ("pretrained", "subfolder", "dtype", "sha256")}
    out = {
        "vae": {**vae, "class": ae.cls},
        "frames": frames,
        "size": size,
        "fps": fps,
        "frame_stride": frame_stride,
        "latent_dtype": latent_dtype,
        "label_key": label_key,
    }
    if assigner is not None:  # only with buckets: a cache without them keeps exactly the keys it always had
        out["buckets"] = [list(dataclasses.astuple(b)) for b in assigner.buckets]
        out["bucket_max_crop"], out["bucket_max_upscale"] = assigner.max_crop, assigner.max_upscale
    if text is not None:
        out["text_encoder"] = {
            k: text.source.get(k) for k in ("name", "pretrained", "subfolder", "dtype", "max_length", "sha256", "class")
        }
        out["missing_caption"] = missing_caption
    return out


def _write_info(
    out: Path, settings: dict, ae: Autoencoder, records: list[dict], latent_shapes: dict[str, list] | None = None
) -> dict:
    """latent_shapes: with buckets, each bucket's (C, T', H', W'), by name."""
    skipped = Counter()
    for r in records:
        skipped.update(r["skipped"])
    per_bucket = {}
    if latent_shapes is not None:
        per_bucket = {
            "per_bucket": {
                name: {"latent_shape": shape, "clips": sum(r.get("buckets", {}).get(name, 0) for r in records)}
                for name, shape in latent_shapes.items()
            }
        }
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **settings,
        "latent_shape": list(ae.latent_shape(settings["frames"], settings["size"])),
        **per_bucket,
        "members": {
            MEMBER: "posterior moments (mean, log-variance) on channels: (2C, T', H', W')",
            "json": "label, source, clip, latent_shape" + (", bucket" if per_bucket else ""),
            "txt": "caption, when the source had one",
            **(
                {
                    TEXT_MEMBERS[0]: "caption embedding (L, D)",
                    TEXT_MEMBERS[1]: "caption mask (L,)",
                    EMPTY_TEXT: "the empty caption's text (1, L, D) and mask (1, L), once",
                }
                if "text_encoder" in settings
                else {}
            ),
        },
        "clips": sum(r["clips"] for r in records),
        "skipped": dict(skipped),
        "shards": sorted(f for r in records for f in r["outputs"]),
        "inputs_done": len(records),
        "stats": _stats(records, ae),
    }
    tmp = out / (INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / INFO)
    return info


def _read_progress(out: Path) -> list[dict]:
    path = out / PROGRESS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that shard is done again
            break
    return records


def encode_shards(
    input,
    out: str | Path,
    vae: dict,
    frames: int,
    size: int,
    batch_size: int = 8,
    fps: float | None = None,
    frame_stride: int = 1,
    label_key: str | None = "label",
    num_classes: int | None = None,
    latent_dtype: str = "float32",
    maxcount: int = 1000,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
    text_encoder: dict | None = None,
    missing_caption: str = "skip",
    buckets=None,
    bucket_max_crop: float = 0.25,
    bucket_max_upscale: float = 1.0,
) -> dict:
    """Encode every clip of the `input` mp4 shards into latent shards in `out` (see the module docstring).
    text_encoder (a conf/text_encoder node, hf): also each clip's caption embedding and mask, and the empty
    caption's once; a clip without a caption is skipped or given the empty caption (missing_caption).
    buckets (a preset name or a list, as data.buckets): each clip at the shape of the largest bucket it fits."""
    if latent_dtype not in STORE_DTYPES:
        raise CacheError(f"latent_dtype={latent_dtype!r} is not one of {tuple(STORE_DTYPES)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CacheError(f"batch_size={batch_size!r} must be an integer >= 1")
    assigner, latent_shapes = None, None
    if buckets is not None:  # a bad list or rule stops before the autoencoder loads
        bucketing.check_rule(bucket_max_crop, bucket_max_upscale, prefix="")
        assigner = bucketing.Assigner(
            bucketing.parse_buckets(buckets, key="buckets"), frame_stride, bucket_max_crop, bucket_max_upscale
        )
    # the cache holds raw moments: an autoencoder without constants (or vae.normalization=data) needs the data's
    # statistics only to train, and they are measured here, over every clip encoded (info.json's stats)
    ae = load_autoencoder(
        **{k: v for k, v in vae.items() if k not in ("_target_", "name")}, device=device, measure_stats=True
    )
    ae.check_clip(frames, size, keys=("frames", "size"))  # before reading anything
    if assigner is not None:  # every bucket checked against the autoencoder before reading anything
        latent_shapes = {
            b.name: [ae.channels, *ae.latent_grid(b.frames, b.height, b.width, key=f"buckets[{i}]")]
            for i, b in enumerate(assigner.buckets)
        }
        if any(b.keep_prob < 1 for b in assigner.buckets):
            log.warning(
                "buckets: keep_prob is a training-time draw and does not apply to a cache: each clip is "
                "encoded once, in the largest bucket it fits"
            )
    text = None
    from stale.text.encoders import load_text_encoder, text_encoder_kind

    kind = text_encoder_kind(text_encoder)
    if kind is not None:
        from stale.data.captions import MISSING

        if kind != "hf":
            raise CacheError(
                f"text_encoder={kind}: only a pretrained encoder (text_encoder=hf) is cached; the "
                "learned encoder trains with the model and reads the captions (.txt) itself"
            )
        if missing_caption not in MISSING:
            raise CacheError(f"missing_caption={missing_caption!r} is not one of {MISSING}")
        text = load_text_encoder(text_encoder, device=device)
    urls = expand_shards(input, "input")
    stems = [Path(u).name.removesuffix(".tar") for u in urls]
    if len(set(stems)) < len(stems):
        raise CacheError(f"input={input!r}: two shards share a file name; encode each folder into its own out=")
    out = Path(out)
    settings = _settings(ae, frames, size, fps, frame_stride, latent_dtype, label_key, text, missing_caption, assigner)
    records = _read_progress(out)
    if (out / INFO).is_file():
        old = json.loads((out / INFO).read_text())
        changed = sorted(k for k in {*settings, "buckets"} if old.get(k) != settings.get(k))  # buckets: set or not
        if changed:
            if not overwrite:
                raise CacheError(
                    f"out={out} holds a cache made with other settings ({', '.join(changed)}): choose "
                    "another out= or pass overwrite=true to start over"
                )
            records = []
    if overwrite:  # start over: remove what the earlier run wrote (and nothing else in the folder)
        for r in _read_progress(out):
            for name in r["outputs"]:
                (out / name).unlink(missing_ok=True)
        for name in (PROGRESS, INFO):
            (out / name).unlink(missing_ok=True)
        records = []
    (out / PARTIAL).mkdir(parents=True, exist_ok=True)
    if text is not None:  # the empty caption's encoding, once: caption dropout and guidance read it from here
        from safetensors.torch import save_file

        empty, empty_mask = text.empty()
        save_file(
            {"text": empty.float().cpu().contiguous(), "mask": empty_mask.to(torch.uint8).cpu().contiguous()},
            str(out / EMPTY_TEXT),
        )
    done = {r["input"] for r in records}
    ids = [u if "://" in u or u.startswith("pipe:") else str(Path(u).resolve()) for u in urls]  # cwd-independent
    spec = ClipSpec(frames, size, frame_stride, fps, "center", "center", False)
    specs = bucketing.bucket_specs(spec, assigner.buckets) if assigner is not None else None  # as the loader cuts
    store = STORE_DTYPES[latent_dtype]
    from tqdm import tqdm

    bar = tqdm(total=None, unit="clip", desc="stale-encode", disable=not progress)
    for url, ident, stem in zip(urls, ids, stems):
        if ident in done:
            continue
        for leftover in (out / PARTIAL).glob(f"{stem}-*.tar"):
            leftover.unlink()
        written: list[str] = []
        writer = wds.ShardWriter(
            str(out / PARTIAL / f"{stem}-%03d.tar"), maxcount=maxcount, verbose=0, post=written.append
        )
        counter = SkipCounter("encode")
        sums: list[dict] = []
        # one list per bucket (None: no buckets), so that each autoencoder call sees clips of one shape
        waiting: dict[int | None, list[tuple[np.ndarray, int, dict, str | None]]] = {}
        per_bucket: Counter = Counter()
        clips, max_label = 0, None

        def flush(k):
            nonlocal clips, max_label
            pending = waiting.get(k)
            if not pending:
                return
            clip = (
                {"frames": frames, "size": size}
                if k is None
                else {"frames": specs[k].frames, "height": specs[k].height, "width": specs[k].width}
            )
            pixels = torch.from_numpy(np.stack([p[0] for p in pending])).permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W)
            moments = ae.encode(flow.to_unit_range(pixels)).cpu()
            sums.append(_sums(moments))
            if text is not None:
                emb, mask = text.encode([p[3] for p in pending])
                emb, mask = emb.cpu().numpy().astype(store), mask.cpu().numpy()
            for j, (m, (_, label, sample, _)) in enumerate(zip(moments, pending)):
                meta = {"label": label, "source": sample_name(sample), "clip": clip, "latent_shape": list(m.shape)}
                if k is not None:
                    meta["bucket"] = assigner.buckets[k].name
                row = {"__key__": sample["__key__"], MEMBER: m.numpy().astype(store), "json": meta}
                if "txt" in sample:
                    row["txt"] = sample["txt"]
                if text is not None:
                    row[TEXT_MEMBERS[0]], row[TEXT_MEMBERS[1]] = emb[j], mask[j]
                writer.write(row)
            clips += len(pending)
            max_label = max([p[1] for p in pending] + ([] if max_label is None else [max_label]))
            if k is not None:
                per_bucket[assigner.buckets[k].name] += len(pending)
            bar.update(len(pending))
            pending.clear()

        for sample in read_shard(url, counter):
            try:
                caption = None if text is None else sample_caption(sample, missing_caption, counter)
                k = (
                    None
                    if assigner is None
                    else assigner.place(sample, random.Random(0), label_key, num_classes, largest=True)
                )
                clip, label = decode_sample(
                    sample, spec if k is None else specs[k], random.Random(0), label_key, num_classes
                )
            except Skip as e:
                counter.skip(e.reason, url, e)
                continue
            waiting.setdefault(k, []).append((clip, label, sample, caption))
            if len(waiting[k]) == batch_size:
                flush(k)
        for k in list(waiting):
            flush(k)
        writer.close()
        outputs = []
        for f in written:  # ShardWriter opens a first file even for an input shard with no clip: drop empty ones
            f = Path(f)
            if clips == 0:
                f.unlink(missing_ok=True)
                continue
            f.replace(out / f.name)
            outputs.append(f.name)
        skipped = counter.take()["reasons"]
        total = (
            {
                "n": sum(s["n"] for s in sums),
                "s1": np.sum([s["s1"] for s in sums], axis=0).tolist(),
                "s2": np.sum([s["s2"] for s in sums], axis=0).tolist(),
            }
            if sums
            else None
        )
        record = {
            "input": ident,
            "outputs": outputs,
            "clips": clips,
            "skipped": skipped,
            "sums": total,
            "max_label": max_label,
        }
        if assigner is not None:
            record["buckets"] = dict(per_bucket)
        with open(out / PROGRESS, "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        _write_info(out, settings, ae, records, latent_shapes)
    bar.close()
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    info = _write_info(out, settings, ae, records, latent_shapes)
    if not info["clips"]:
        raise CacheError(f"input={input!r}: no clip decoded (skipped by reason: {info['skipped']})")
    labels = [r["max_label"] for r in records if r.get("max_label") is not None]
    classes = num_classes or (max(labels) + 1 if labels else None)
    return {"info": info, "out": out, "command": train_command(out, vae, ae, text, classes)}


def train_command(out: Path, vae: dict, ae: Autoencoder, text=None, num_classes: int | None = None) -> str:
    """The stale-train command that trains on the cache in `out`, from the settings it was encoded with: the
    autoencoder as loaded (its resolved folder, subfolder and dtype, which its weights hash depends on) and as asked
    (vae.normalization, vae.shift/scale), the classes (num_classes, else the largest label encoded + 1) and the text
    encoder. Each override is shell-quoted, so that the line can be pasted as printed."""
    parts = ["data=latents", f"data.shards=[{out}]"]
    if num_classes is not None:
        parts.append(f"data.num_classes={num_classes}")
    parts += ["vae=diffusers", f"vae.pretrained={ae.source['pretrained']}"]
    asked = {
        "subfolder": ae.source["subfolder"],
        "dtype": ae.source["dtype"],
        "normalization": vae.get("normalization") or "auto",
        "shift": vae.get("shift"),
        "scale": vae.get("scale"),
    }
    parts += [f"vae.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in asked.items() if v is not None]
    if text is not None:
        parts += ["model.cond=text", "text_encoder=hf"]
        keys = ("pretrained", "subfolder", "tokenizer_subfolder", "max_length", "dtype")
        parts += [f"text_encoder.{k}={text.source[k]}" for k in keys if text.source.get(k) is not None]
    return " ".join(["stale-train", *map(shlex.quote, parts)])
