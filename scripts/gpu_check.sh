#!/usr/bin/env bash
# One-command GPU check (issue 21): everything stale measures on a GPU, nothing downloaded.
#   bash scripts/gpu_check.sh [OUT_DIR]      (default OUT_DIR: gpu_check/ under the current directory)
# Needs stale installed (make install, or pip install -e .). Writes JSON per part into OUT_DIR and prints
# the tables; BENCHMARKS.md's GPU rows are copied from them with the device named.
# Parts, each a stale-bench section (conf/bench.yaml) or a stale.bench function:
#   1. MFU and tokens/s for S, B, L: bf16 autocast, torch.compile, flash SDPA, 16-frame clips (sections=gpu)
#   2. MFU of B at batch 8 (16x64x64; the default batch of 4 may starve the GPU)
#   3. where B's step time goes: top CUDA kernels and the attention / matmul / other shares
#   4. framework overhead: Lightning's step against the plain loop, on the GPU (sections=train)
#   5. peak memory per clip for tiny..L, with and without gradient checkpointing (sections=memory)
# On a machine without CUDA it says what it would measure and exits 0.
set -euo pipefail
out="${1:-gpu_check}"
py="${PYTHON:-python3}"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  echo "gpu_check: no CUDA device here; nothing measured."
  exit 0
fi
mkdir -p "$out"
bench() { "$py" -m stale.cli.bench "$@"; }
"$py" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(), 'torch', torch.__version__)"
bench sections=gpu out="$out/gpu.json" 2>&1 | tee "$out/gpu.txt"
bench sections=gpu out="$out/gpu_b_batch.json" gpu.sizes=[b] gpu.resolutions=[64] gpu.batch_size=8 2>&1 | tee "$out/gpu_b_batch.txt"
"$py" - "$out/profile_b.json" <<'PY' 2>&1 | tee "$out/profile_b.txt"
import json, sys
from stale.bench.gpu import profile_kernels
r = profile_kernels("b", resolution=64, batch_size=4)
json.dump(r, open(sys.argv[1], "w"), indent=1)
print("B step (profiled) ms", r["step_ms_profiled"], "shares", r["shares"])
for row in r["top"]:
    print(f'{row["share"]:7.2%} {row["calls"]:6d}  {row["kernel"]}')
PY
bench sections=train out="$out/train.json" "train.variants=[lightning,no_progress_bar,barebones]" train.rounds=3 2>&1 | tail -40 | tee "$out/train.txt"
bench sections=memory out="$out/memory.json" "memory.sizes=[tiny,s,b,l]" memory.size=64 memory.frames=16 2>&1 | tee "$out/memory.txt"
echo "gpu_check: done, results in $out"
