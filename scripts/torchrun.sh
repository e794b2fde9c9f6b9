#!/usr/bin/env bash
# stale-train under torchrun: NPROC processes per node, on one node or several. torchrun starts every rank
# (Lightning sees RANK/WORLD_SIZE and launches nothing itself); all ranks write into one run dir, RUN_DIR.
#
#   one machine, 4 GPUs:  scripts/torchrun.sh 4 trainer=ddp model=s
#   2 nodes x 8 GPUs:     on each node, with the same RUN_DIR on a shared file system:
#                         NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address> RUN_DIR=/shared/runs/r1 \
#                             scripts/torchrun.sh 8 trainer=ddp model=b
#   CPU, 2 processes:     scripts/torchrun.sh 2 trainer=ddp_cpu debug=smoke   (what tests/test_ddp.py runs)
#
# Every rank runs Hydra: the fixed hydra.run.dir keeps them in one folder (the default dir has a timestamp,
# which two processes can resolve to different seconds), and hydra.job.name gives each rank its own log file.
set -euo pipefail
NPROC=${1:?usage: scripts/torchrun.sh NPROC_PER_NODE [stale-train overrides ...]}
shift
NNODES=${NNODES:-1}
RUN_DIR=${RUN_DIR:-outputs/train/torchrun-$(date +%Y-%m-%d_%H-%M-%S)}

if [ "$NNODES" -eq 1 ]; then
  where=(--standalone)  # a free local port, no rendezvous server to run
else
  where=(--nnodes="$NNODES" --node-rank="${NODE_RANK:?set NODE_RANK}" --master-addr="${MASTER_ADDR:?set MASTER_ADDR}"
         --master-port="${MASTER_PORT:-29500}")
fi

exec torchrun "${where[@]}" --nproc-per-node="$NPROC" -m stale.cli.train \
  trainer.devices="$NPROC" trainer.num_nodes="$NNODES" "hydra.run.dir=$RUN_DIR" \
  'hydra.job.name=train_rank${oc.env:RANK,0}' "$@"
