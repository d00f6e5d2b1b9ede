"""CPU placement (hstu.training.cpu_placement): each local rank on its own slice of cores, and
the data thread at a low priority (it fills the training thread's waits)."""

import os
import subprocess
import sys

import pytest

from hstu.training.cpu_placement import rank_cores

linux_only = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU affinity and per-thread niceness are Linux features"
)


def test_rank_cores_split_the_cores_evenly_and_disjointly():
    assert rank_cores([3, 1, 2, 0], 0, 2) == [0, 1]
    assert rank_cores([3, 1, 2, 0], 1, 2) == [2, 3]
    assert rank_cores([0, 1, 2, 3, 4], 1, 2) == [2, 3]  # the remainder (core 4) unused
    assert rank_cores([0, 1], 0, 1) == [0, 1]
    assert rank_cores([5], 0, 2) is None  # fewer cores than ranks: not pinned
    with pytest.raises(ValueError, match="local rank 2"):
        rank_cores([0, 1], 2, 2)


_PROBE = r"""
import os
from hstu.training.cpu_placement import pin_local_rank
print(pin_local_rank(os.environ["ON_CPU"] == "1"), sorted(os.sched_getaffinity(0)))
"""


def _probe(local_rank: int, local_world: int, on_cpu: bool = True, switch: str = "1") -> str:
    env = dict(os.environ, LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_world),
               ON_CPU="1" if on_cpu else "0", HSTU_PIN_RANKS=switch)
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip() + done.stderr


@linux_only
def test_pin_local_rank_restricts_the_process_to_its_slice():
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip(f"needs 2 CPUs to give two ranks a core each; this host allows {len(cores)}")
    per = len(cores) // 2
    mine = cores[per:2 * per]
    assert _probe(1, 2) == f"{mine} {mine}"
    unchanged = f"None {cores}"
    assert _probe(1, 2, switch="0") == unchanged  # HSTU_PIN_RANKS=0
    assert _probe(0, 1) == unchanged  # one local rank: nothing to share
    assert _probe(1, 2, on_cpu=False) == unchanged  # GPU runs are left alone
    many = _probe(0, len(cores) + 1)
    assert many.startswith(unchanged) and "not pinned" in many


@linux_only
def test_feed_thread_runs_at_low_priority_on_cpu(monkeypatch):
    import torch

    from hstu.training.feed import Feed

    class Plain(Feed):
        def _cost(self, batch):
            return 0, 0.0

    base = os.getpriority(os.PRIO_PROCESS, 0)
    for nice, want in (("19", 19), ("0", base)):
        monkeypatch.setenv("HSTU_FEED_NICE", nice)
        feed = Plain([1, 2, 3], network=None, device=torch.device("cpu"), depth=1)
        it = iter(feed)
        assert next(it) == 1
        try:
            assert os.getpriority(os.PRIO_PROCESS, feed.native_id) == max(want, base)
            assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the training thread keeps its own
        finally:
            feed.close()
