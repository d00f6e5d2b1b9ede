#!/usr/bin/env bash
# The README's test command (also what CI runs): the whole default suite on CPU.
# GPU tests are marked and skip with their reason on CPU hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q --timeout 900 "$@" tests
