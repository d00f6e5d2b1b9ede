#!/usr/bin/env bash
# The README's first command: a short retrieval run on the embedded synthetic default,
# on every GPU present or on 2 CPU processes. Extra arguments go to the entry point.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=2
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=$(nvidia-smi -L | wc -l)
fi
# torchrun sets one OpenMP thread per worker when it starts several and OMP_NUM_THREADS is
# unset, with a 4-line banner saying so; set the same value here (a user's own value is kept),
# so the threads are as before and the banner is not printed.
if [ "$NPROC" -gt 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" \
  pretrain_gr_retrieval.py --gin-config-file configs/default_retrieval.gin "$@"
