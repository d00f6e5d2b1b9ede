#!/usr/bin/env bash
# Creates (or reuses) the project-local virtual environment .venv with the pinned
# dependency set of docs/install.md. Idempotent: a second run only checks a stamp file.
# fbgemm-gpu (CUDA) is chosen when an NVIDIA driver is present, fbgemm-gpu-cpu otherwise;
# torchrec is installed with --no-deps because it would otherwise pull the CUDA fbgemm-gpu,
# which does not load on a host without a GPU driver.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${HSTU_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  FBGEMM_PKG="fbgemm-gpu==$FBGEMM_VERSION"
  ACCEL=cuda
else
  FBGEMM_PKG="fbgemm-gpu-cpu==$FBGEMM_VERSION"
  ACCEL=cpu
fi

# The stamp records what was installed; if setup.py or this script changed, reinstall.
STAMP="$VENV/.hstu-install-stamp"
WANT="$ACCEL $(cat setup.py scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

echo "[install] creating environment in $VENV ($ACCEL host)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() {
  # pip warns about every unused local index folder and about torchrec's fbgemm-gpu
  # requirement (deliberately left out on CPU hosts): show only the other lines.
  local log rc=0
  log=$(mktemp)
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
  # (and setuptools' editable-install banner, which warns about the hstu/ folder itself)
  grep -v -E "Location 'file:|dependency resolver does not|requires fbgemm-gpu, which is not installed|BuildBackendWarning|Editable installation|^ *!!|^ *\*+$|Please be careful|name as your package|with strategy, WheelFile|^ *$" "$log" || true
  rm -f "$log"
  return $rc
}
pip_install --upgrade pip wheel setuptools >/dev/null
# torch first: with it in place, later ranges it satisfies install nothing more.
pip_install "torch==$TORCH_VERSION"
pip_install "$FBGEMM_PKG"
pip_install --no-deps "torchrec==$TORCHREC_VERSION"
# torchrec's own needs, minus fbgemm-gpu
pip_install "tensordict" "torchmetrics==1.0.3" "pyre-extensions" "tqdm" "iopath"
pip_install -e ".[dev]"
"$VENV/bin/python" -c "import hstu, torch, torchrec, megatron.core, gin, fbgemm_gpu" 2>/dev/null \
  || { echo "[install] import check failed:"; "$VENV/bin/python" -c "import hstu, torch, torchrec, megatron.core, gin, fbgemm_gpu"; exit 1; }
echo "$WANT" > "$STAMP"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, torchrec; print("torch", torch.__version__, "torchrec", torchrec.__version__)' 2>/dev/null)"
