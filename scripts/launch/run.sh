#!/usr/bin/env bash
# Run the ckpt_wrapper demo under torchrun (python -m torch.distributed.run, so no torchrun on PATH
# is needed). Arguments are passed to `python -m ckpt_wrapper demo`.
#
# Usage:
#   scripts/launch/run.sh                                   # 2 ranks on this machine, default model
#   NPROC=1 scripts/launch/run.sh --steps 10                # 1 rank, 10 steps
#   PYTHON=.venv/bin/python scripts/launch/run.sh --n-layer 8 --d-model 256
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch/run.sh   # on node 0; NODE_RANK=1 on node 1
#
# Environment (defaults): NPROC (2) ranks per node, NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500), PYTHON ($VIRTUAL_ENV/bin/python in an active venv, else python3),
# OMP_NUM_THREADS (1).
# Single process without torchrun: python -m ckpt_wrapper demo
set -euo pipefail

NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"; else PYTHON=python3; fi
fi
# Ranks share the cores: one OpenMP thread each avoids oversubscription (and torchrun's warning).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Importable from a checkout even when the package is not installed.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m ckpt_wrapper demo "$@"
