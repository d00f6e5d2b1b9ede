"""The one-line error under torchrun: whichever worker fails first prints it, once per node,
after the launcher has exited (torchrun often stops the other workers before they reach
their own error)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# a stand-in launcher: starts workers with torchrun's environment, waits for them, then
# exits (the workers' line must come after everything the launcher printed)
LAUNCHER = r"""
import os, subprocess, sys
run_id, ranks = sys.argv[1], sys.argv[2:]
worker = "import sys; sys.path.insert(0, %r); from hstu.console import fail; sys.exit(fail('bad ' + sys.argv[1]))" % sys.argv[0]
procs = []
for r in ranks:
    env = dict(os.environ, TORCHELASTIC_RUN_ID=run_id, LOCAL_RANK=r, RANK=r)
    procs.append(subprocess.Popen([sys.executable, "-c", worker, r], env=env))
codes = [p.wait() for p in procs]
print("launcher report " + " ".join(map(str, codes)), file=sys.stderr, flush=True)
"""


def _launch(*ranks: str) -> list[str]:
    run = subprocess.run(
        [sys.executable, "-c", LAUNCHER.replace("sys.argv[0]", repr(str(ROOT))), uuid.uuid4().hex, *ranks],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    return run.stderr.strip().splitlines()


def test_a_failing_worker_other_than_local_rank_0_still_prints_the_line_last():
    lines = _launch("1")
    assert lines == ["launcher report 2", "error: bad 1"]


def test_two_failing_workers_print_one_line():
    lines = _launch("0", "1")
    assert lines[0] == "launcher report 2 2"
    assert len(lines) == 2 and lines[1] in ("error: bad 0", "error: bad 1"), lines
