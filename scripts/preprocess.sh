#!/usr/bin/env bash
# Preprocess datasets into tmp_data/<name>/ (see docs/data.md).
#
#   bash scripts/preprocess.sh synthetic                       # needs nothing
#   bash scripts/preprocess.sh ml-1m ~/Downloads/ml-1m.zip      # local archive or folder
#   bash scripts/preprocess.sh ml-20m                           # downloads the official archive
#   bash scripts/preprocess.sh custom -- --gin-param 'CustomDataArgs.path="log.csv"'
#   bash scripts/preprocess.sh all                              # every dataset whose archive sits in raw_data/
#
# Extra arguments after `--` go to python -m hstu.data.preprocess (e.g. --force, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python

name="${1:?usage: scripts/preprocess.sh NAME [RAW_PATH] [-- extra args]}"
shift
raw=()
if [ $# -gt 0 ] && [ "$1" != "--" ]; then raw=(--raw "$1"); shift; fi
[ "${1:-}" = "--" ] && shift

if [ "$name" = "all" ]; then
  declare -A archives=(
    [ml-1m]=ml-1m.zip [ml-20m]=ml-20m.zip [ml-100k]=ml-100k.zip
    [kuairand-pure]=KuaiRand-Pure.tar.gz [kuairand-1k]=KuaiRand-1K.tar.gz [kuairand-27k]=KuaiRand-27K.tar.gz
  )
  "$PY" -m hstu.data.preprocess --dataset synthetic "$@"
  for ds in "${!archives[@]}"; do
    if [ -e "raw_data/${archives[$ds]}" ]; then
      "$PY" -m hstu.data.preprocess --dataset "$ds" --raw "raw_data/${archives[$ds]}" "$@"
    else
      echo "skip $ds: raw_data/${archives[$ds]} not found"
    fi
  done
  exit 0
fi
exec "$PY" -m hstu.data.preprocess --dataset "$name" "${raw[@]}" "$@"
