#!/usr/bin/env bash
# The README's test command: the default suite on CPU (every test not marked slow).
# GPU tests are marked and skip with their reason on CPU hosts.
#   scripts/test.sh              the default suite (what `make test` runs)
#   scripts/test.sh --slow       the slow tier only: long end-to-end variants (CI runs both)
#   scripts/test.sh --extended   the extended tier: more points of slow tests' matrices (not in CI)
#   scripts/test.sh --all        every tier in one run
# Further arguments go to pytest. Test files run in 2 worker processes (pytest-xdist, one
# file per worker at a time: module fixtures run once); HSTU_TEST_WORKERS=0 runs them in this
# process, HSTU_TEST_WORKERS=N in N workers.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(-m "not slow and not extended")
case "${1:-}" in
  --slow) tier=(-m "slow and not extended"); shift ;;
  --extended) tier=(-m extended); shift ;;
  --all) tier=(); shift ;;
esac
workers=(-n "${HSTU_TEST_WORKERS:-2}" --dist loadfile)
exec .venv/bin/python -m pytest -q --timeout 900 --durations=15 "${workers[@]}" "${tier[@]}" "$@" tests
