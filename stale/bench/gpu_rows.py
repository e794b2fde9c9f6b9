"""BENCHMARKS.md rows from a `scripts/gpu_check.sh` output folder.

  python -m stale.bench.gpu_rows OUT_DIR                      print the markdown
  python -m stale.bench.gpu_rows OUT_DIR --write BENCHMARKS.md   replace the block between the markers

The block sits between `<!-- gpu_check:begin -->` and `<!-- gpu_check:end -->`; everything else in the file
is left as it is. Every part gpu_check knows gets a line: its numbers, or "not measured" when its JSON is
missing (the part was not run, or ran past the time limit), so the rows never pass off an old run as new.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
GPU_PARTS = (("b", "gpu_b.json"), ("l", "gpu_l.json"), ("b128", "gpu_b128.json"), ("s", "gpu_s.json"))
NOT_MEASURED = "not measured"


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _device(folder: Path) -> str:
    for _, name in GPU_PARTS:
        doc = _load(folder, name)
        if doc:
            m = doc["machine"]
            return f"{m.get('device_name', '?')} (torch {m['torch']}, Lightning {m['lightning']}, {m['cpu_count']} CPU cores)"
    text = folder / "device.txt"
    return text.read_text().strip() if text.is_file() else "unknown device"


def _num(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "n/a"


def _mfu_rows(folder: Path) -> list[str]:
    out = [
        "| part | size | clip x batch | step | tokens/s | TFLOP/s | MFU | peak memory | compile (warm-up) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for part, name in GPU_PARTS:
        doc = _load(folder, name)
        rows = doc["sections"]["gpu"]["rows"] if doc else []
        if not rows or not isinstance(rows[0].get("mfu"), float):
            why = rows[0].get("mfu") if rows else "no result (not run, or stopped by the time limit)"
            out.append(f"| {part} | | | | | | {NOT_MEASURED}: {why} | | |")
            continue
        for r in rows:
            clip = "x".join(str(v) for v in r["clip"])
            out.append(
                f"| {part} | {r['size'].upper()} ({r['parameters'] / 1e6:.1f} M) | {clip} x {r['batch_size']} | "
                f"{r['step_ms']:.1f} ms | {r['tokens_per_s'] / 1e3:.0f} k | {r['tflops_per_s']:.0f} | "
                f"**{r['mfu']:.1%}** | {_num(r.get('peak_mem_gib'), '{:.1f} GiB')} | "
                f"{_num(r.get('warmup_s'), '{:.0f} s')} |"
            )
    return out


def _profile_lines(folder: Path) -> list[str]:
    doc = _load(folder, "profile_b.json")
    if not doc:
        return [f"- Where B's step goes: {NOT_MEASURED}."]
    shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(doc["shares"].items(), key=lambda kv: -kv[1]))
    top = "; ".join(f"{t['share']:.1%} {t['kernel'][:60]}" for t in doc["top"][:3])
    clip = "x".join(str(v) for v in doc["clip"])
    return [
        f"- Where B's step goes ({clip}, batch {doc['batch_size']}, {doc['step_ms_profiled']:.0f} ms a profiled "
        f"step): {shares}. Top kernels: {top}."
    ]


def _longest_lines(folder: Path) -> list[str]:
    doc = _load(folder, "longest.json")
    if not doc:
        return [f"- Longest clip B trains: {NOT_MEASURED}."]
    lines = []
    for r in doc["rows"]:
        if r.get("longest_frames") is None:
            lines.append(
                f"- Longest clip B trains (checkpointing {r['grad_checkpointing']}): {r.get('note', NOT_MEASURED)}."
            )
            continue
        peaks = [t["peak_gib"] for t in r["tries"] if t["fits"] and t["frames"] == r["longest_frames"]]
        lines.append(
            f"- Longest clip {r['size'].upper()} trains, batch {r['batch_size']}, "
            f"{r['resolution']}x{r['resolution']}, checkpointing {str(r['grad_checkpointing']).lower()}: "
            f"**{r['longest_frames']} frames** ({r['tokens_per_clip']:,} tokens"
            + (f", {peaks[0]} GiB peak" if peaks else "")
            + ")."
        )
    return lines


def _section_line(folder: Path, name: str, label: str) -> str:
    doc = _load(folder, name)
    if not doc:
        return f"- {label}: {NOT_MEASURED}."
    (section,) = doc["sections"].values()
    return f"- {label}: see {name} (summary {json.dumps(section.get('summary', {}))})."


def _train_line(folder: Path) -> str:
    doc = _load(folder, "train.json")
    if not doc:
        return f"- Framework overhead on the GPU (train section): {NOT_MEASURED}."
    t = doc["sections"]["train"]
    s, setup = t["summary"], t.get("setup", {})
    clip = "x".join(str(v) for v in setup.get("clip", []))
    lit = t.get("profile", {}).get("lightning", {}).get("self_ms_per_step", {}).get("lightning")
    return (
        f"- Framework overhead on the GPU (train section, {setup.get('model', '?')} {clip} x "
        f"{setup.get('batch_size', '?')}, {setup.get('precision', '?')}): Lightning against the plain loop "
        f"**{s['framework_overhead']:+.1%}** +- {_num(s.get('framework_overhead_error'), '{:.1%}')} "
        f"({s.get('rounds', '?')} rounds), {_num(s.get('extra_ms_per_step'), '{:.1f}')} ms a step more "
        f"(micro model {_num(s.get('micro_extra_ms_per_step'), '{:.1f}')} ms); Lightning's own Python "
        f"{_num(lit, '{:.1f}')} ms a step under cProfile. Rows: train.json."
    )


def _memory_line(folder: Path) -> str:
    doc = _load(folder, "memory.json")
    if not doc:
        return f"- Peak memory per clip (memory section): {NOT_MEASURED}."
    rows = doc["sections"]["memory"]["rows"]
    per = {}
    for r in rows:
        per.setdefault(r["size"], {})[r["grad_checkpointing"]] = r["per_clip_mib"]
    clip = "x".join(str(v) for v in rows[0]["clip"]) if rows else "?"
    parts = "; ".join(
        f"{k.upper()} {v.get(False, float('nan')) / 1024:.2f} GiB, checkpointed "
        f"{v.get(True, float('nan')) / 1024:.2f} GiB"
        for k, v in per.items()
    )
    return f"- Activation memory per {clip} clip (memory section, peak(B2) - peak(B1)): {parts}."


def _data_line(folder: Path) -> str:
    doc = _load(folder, "data.json")
    if not doc:
        return f"- Data wait at 256 px (data section): {NOT_MEASURED}."
    rows = doc["sections"]["data"]["rows"]
    parts = "; ".join(
        f"{r['workers']} workers {r['loader_clips_per_s_per_worker'] * max(1, r['workers']):.0f} "
        f"clips/s ({r['ratio']:.2f} of raw decode per worker)"
        for r in rows
    )
    return f"- Data at {rows[0]['clip'] if rows else '?'} (data section, the real loader): {parts}."


def _fsdp_line(folder: Path) -> str:
    doc = _load(folder, "fsdp.json")
    if not doc:
        return f"- FSDP2 on the GPU (trainer=fsdp): {NOT_MEASURED}."
    one, fsdp, resumed = (doc.get(k) or {} for k in ("one", "fsdp", "resumed"))
    if not fsdp:
        return "- FSDP2 on the GPU (trainer=fsdp): **failed** (no metrics; see fsdp.fsdp.log)."
    common = sorted(set(one) & set(fsdp), key=int)
    rel = max((abs(fsdp[k] - one[k]) / abs(one[k]) for k in common), default=float("nan"))
    again = sorted(set(resumed) & set(fsdp), key=int)
    rel_r = max((abs(resumed[k] - fsdp[k]) / abs(fsdp[k]) for k in again), default=float("nan"))
    return (
        f"- FSDP2 on the GPU (trainer=fsdp, smoke run, {len(fsdp)} steps): train/loss against trainer=gpu "
        f"within {rel:.2%} at every step ({len(common)} compared); resumed from step {again[0] if again else '?'}: "
        f"{len(again)} steps within {rel_r:.2e} of the straight run; stale-export wrote "
        f"{', '.join(doc.get('export') or ['nothing'])}."
    )


def render(folder: str | Path) -> str:
    folder = Path(folder)
    lines = [
        BEGIN,
        f"Device: {_device(folder)}. Rows written by `python -m stale.bench.gpu_rows` from "
        "`scripts/gpu_check.sh`'s output.",
        "",
    ]
    lines += _mfu_rows(folder) + [""]
    lines += _profile_lines(folder) + _longest_lines(folder)
    lines += [
        _train_line(folder),
        _data_line(folder),
        _memory_line(folder),
        _fsdp_line(folder),
        _section_line(folder, "parallel.json", "Sequence parallelism simulated on one GPU"),
        END,
    ]
    return "\n".join(lines)


def write(folder: str | Path, target: str | Path) -> None:
    """Replace the marked block of `target` (or append one) with the rows of `folder`."""
    target = Path(target)
    text = target.read_text()
    block = render(folder)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif BEGIN in text or END in text:
        raise ValueError(f"{target} has only one of the markers {BEGIN} / {END}; fix it by hand")
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    target.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--write", metavar="MARKDOWN", help="replace the gpu_check block of this file")
    a = p.parse_args(argv)
    if a.write:
        write(a.folder, a.write)
        print(f"gpu_rows: wrote the gpu_check block of {a.write}")
    else:
        print(render(a.folder))


if __name__ == "__main__":
    main()
