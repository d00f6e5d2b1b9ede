"""CPU placement (hstu.training.cpu_placement): each local rank on its own slice of cores (only
where the launcher left the mask whole and no other job claims cores), and the data thread at
a low priority (it fills the training thread's waits); the settings (host_settings)."""

import os
import subprocess
import sys

import pytest

from hstu.training.cpu_placement import host_cpus, parse_cpu_list, rank_cores
from hstu.training.host_settings import HostSettings

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


def _probe(local_rank: int, local_world: int, on_cpu: bool = True, switch: str = "1",
           claims: str = "", job: str = "29500", cpus: set[int] | None = None) -> str:
    env = dict(os.environ, LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_world),
               ON_CPU="1" if on_cpu else "0", HSTU_PIN_RANKS=switch, HSTU_CPU_CLAIMS_FILE=claims,
               MASTER_ADDR="127.0.0.1", MASTER_PORT=job, TORCHELASTIC_RUN_ID="test")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    return done.stdout.strip() + done.stderr


def _whole_mask() -> list[int]:
    cores = sorted(os.sched_getaffinity(0))
    if set(cores) != host_cpus():
        pytest.skip(f"this test runs under a CPU binding ({cores} of {sorted(host_cpus())})")
    return cores


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5}


@linux_only
def test_pin_local_rank_restricts_the_process_to_its_slice(tmp_path):
    cores = _whole_mask()
    if len(cores) < 2:
        pytest.skip(f"needs 2 CPUs to give two ranks a core each; this host allows {len(cores)}")
    claims = str(tmp_path / "claims")
    per = len(cores) // 2
    mine = cores[per:2 * per]
    assert _probe(1, 2, claims=claims) == f"{mine} {mine}"
    unchanged = f"None {cores}"
    assert _probe(1, 2, switch="0", claims=claims) == unchanged  # HSTU_PIN_RANKS=0
    assert _probe(0, 1, claims=claims) == unchanged  # one local rank: nothing to share
    assert _probe(1, 2, on_cpu=False, claims=claims) == unchanged  # GPU runs are left alone
    many = _probe(0, len(cores) + 1, claims=claims)
    assert many.startswith(unchanged) and "not pinned" in many


@linux_only
def test_a_mask_the_launcher_restricted_is_left_alone(tmp_path):
    cores = _whole_mask()
    if len(cores) < 2:
        pytest.skip("needs 2 CPUs to restrict a process to fewer than the host's")
    bound = {cores[-1]}  # as srun --cpu-bind / numactl / taskset would leave it
    out = _probe(0, 2, claims=str(tmp_path / "claims"), cpus=bound)
    assert out.startswith(f"None {sorted(bound)}") and "restricted" in out


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[19]


@linux_only
def test_a_job_next_to_another_pins_nothing_and_unpins_the_other(tmp_path):
    cores = _whole_mask()
    if len(cores) < 2:
        pytest.skip("needs 2 CPUs to give two ranks a core each")
    claims = tmp_path / "claims"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # another job's rank, pinned to the first core
        os.sched_setaffinity(other.pid, cores[:1])
        mask = ",".join(map(str, cores))
        claims.write_text(f"{other.pid} {_start_time(other.pid)} 127.0.0.1:29999/test 1 {mask}\n")
        out = _probe(0, 2, claims=str(claims), job="29500")
        assert out.startswith(f"None {cores}") and "another job runs on these cores" in out
        assert sorted(os.sched_getaffinity(other.pid)) == cores  # its whole mask back
        lines = claims.read_text().splitlines()
        assert lines[0].split(" ")[3] == "0"  # recorded as unpinned
        # a rank of the same job as the registered process pins beside it
        mine = cores[:len(cores) // 2]
        assert _probe(0, 2, claims=str(claims), job="29999").startswith(f"{mine}")
    finally:
        other.kill()
        other.wait()
    # the other job ended: its line no longer counts and is dropped
    assert _probe(0, 2, claims=str(claims), job="29500").startswith(f"{cores[:len(cores) // 2]}")
    assert f"{other.pid} " not in claims.read_text()


@linux_only
def test_an_unusable_claims_file_means_no_pinning(tmp_path):
    cores = _whole_mask()
    if len(cores) < 2:
        pytest.skip("needs 2 CPUs to give two ranks a core each")
    out = _probe(0, 2, claims=str(tmp_path / "missing-dir" / "claims"))
    assert out.startswith(f"None {cores}") and "cannot open the claims file" in out


@linux_only
def test_a_single_process_job_registers_as_a_neighbour(tmp_path):
    claims = tmp_path / "claims"
    out = _probe(0, 1, claims=str(claims), job="29500")
    assert out.startswith("None")
    assert claims.read_text().split(" ")[3] == "0"  # registered, not pinned


def test_host_settings_from_the_environment():
    assert HostSettings.from_env({}) == HostSettings()
    got = HostSettings.from_env({"HSTU_PIN_RANKS": "0", "HSTU_FEED_NICE": "5",
                                 "HSTU_KEEP_FREED_HOST_MEMORY": "0", "HSTU_RESTART_BACKOFF_S": "2",
                                 "HSTU_CPU_CLAIMS_FILE": "/x"})
    assert (got.pin_ranks, got.feed_nice, got.keep_freed_host_memory, got.restart_backoff_s,
            got.cpu_claims_file) == (False, 5, False, 2.0, "/x")
    assert [got.restart_wait_s(k) for k in (0, 1, 2, 3)] == [0.0, 2.0, 4.0, 8.0]
    assert HostSettings(restart_backoff_s=100).restart_wait_s(5) == 300.0
    with pytest.raises(ValueError, match="HSTU_PIN_RANKS='yes': must be 0 or 1"):
        HostSettings.from_env({"HSTU_PIN_RANKS": "yes"})
    with pytest.raises(ValueError, match="HSTU_FEED_NICE='low': must be an integer"):
        HostSettings.from_env({"HSTU_FEED_NICE": "low"})


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
