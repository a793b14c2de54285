#!/usr/bin/env bash
# Run the ckpt_wrapper demo (default), the training example or the training driver under torchrun
# (python -m torch.distributed.run, so no torchrun on PATH is needed). Remaining arguments go to the entry point.
#
# Usage:
#   scripts/launch/run.sh                                   # the demo: 2 ranks on this machine, default model
#   NPROC=1 scripts/launch/run.sh --steps 10                # demo, 1 rank, 10 steps
#   PYTHON=.venv/bin/python scripts/launch/run.sh --n-layer 8 --d-model 256
#   scripts/launch/run.sh train --steps 50 --checkpoint-dir ckpt   # scripts/launch/train.py (or ENTRY=train)
#   scripts/launch/run.sh driver --parallel fsdp1 --ac offload     # scripts/launch/train_driver.py
#   scripts/launch/run.sh driver --checkpoint-dir ckpt --stop-after 20   # then again without --stop-after
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch/run.sh train   # on node 0; NODE_RANK=1 on node 1
#
# Entry point: the first argument `demo`, `train`, `driver` or `parity` picks it (default: ENTRY, else demo):
#   demo    python -m ckpt_wrapper demo          (train with FSDP2 + checkpointing, check gradients)
#   train   scripts/launch/train.py              (the short training example: FSDP2, checkpointing, DCP)
#   driver  scripts/launch/train_driver.py       (every mode: parallelisms, --ac modes, bitwise DCP resume)
#   parity  python -m ckpt_wrapper parity        (prove parity on your own model)
#
# Environment (defaults): ENTRY (demo), NPROC (2) ranks per node, NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON ($VIRTUAL_ENV/bin/python in an active venv, else
# python3), OMP_NUM_THREADS (1), DRY_RUN (set to 1: print the command instead of running it).
# Single process without torchrun: python -m ckpt_wrapper demo, or python scripts/launch/train.py
set -euo pipefail

ENTRY=${ENTRY:-demo}
case "${1:-}" in
    demo|train|driver|parity) ENTRY=$1; shift ;;
esac
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

case "$ENTRY" in
    demo|parity) target=(-m ckpt_wrapper "$ENTRY") ;;
    train) target=("$repo_root/scripts/launch/train.py") ;;
    driver) target=("$repo_root/scripts/launch/train_driver.py") ;;
    *) echo "run.sh: ENTRY must be demo, train, driver or parity; found '$ENTRY'. Pass one as the first argument" >&2
       exit 2 ;;
esac

command=("$PYTHON" -m torch.distributed.run
    --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
    "${target[@]}" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
exec "${command[@]}"
