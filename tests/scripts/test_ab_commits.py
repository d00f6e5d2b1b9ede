"""scripts/ab_commits.py: both sides run alternately (A B, B A, ...) from an export of their
commit, each row parsed (tokens/s as the mean of the progress lines after the first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_sides_alternate_and_each_runs_its_own_export():
    # each run imports hstu (from the export), prints two progress lines and the metrics
    cmd = ("{python} -c \"import hstu, os; "
           "assert '/tmp_data/ab/' in hstu.__file__, hstu.__file__; "
           "print('step 1/2 loss 1 tokens/s 5,000'); "
           "print('step 2/2 loss 1 tokens/s ' + os.environ['RATE']); "
           "print('[hstu] final retrieval metrics: HR@10=0.5')\"")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ab_commits.py"), "HEAD", "HEAD", "--rounds", "3",
         "--cmd", cmd, "--env-a", "RATE=1,000", "--env-b", "RATE=3,000"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("A ", "B "))
            and len(line.split()) > 4 and line.split()[3].isdigit()]
    # A B, B A, A B; the first progress line is left out of the mean
    assert [(r[0], r[3]) for r in rows] == [("A", "1"), ("B", "1"), ("B", "2"), ("A", "2"),
                                           ("A", "3"), ("B", "3")], proc.stdout
    assert {r[0]: r[4] for r in rows} == {"A": "1,000", "B": "3,000"}, proc.stdout
    assert "B/A: tokens/s x3.000" in proc.stdout and "metrics identical" in proc.stdout
