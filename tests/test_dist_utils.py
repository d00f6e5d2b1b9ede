import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_multiprocess


def _allreduce(rank: int, world_size: int) -> None:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == sum(range(1, world_size + 1))


def _fails_on_rank1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    # rank 0 must not hang waiting for rank 1


def test_allreduce_two_ranks():
    run_multiprocess(_allreduce, world_size=2)


def test_error_is_carried_back():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_multiprocess(_fails_on_rank1, world_size=2)


_LEAKED: list = []


def _leaks_the_group(rank: int, world_size: int) -> None:
    _allreduce(rank, world_size)
    _LEAKED.append(dist.group.WORLD)  # like a hook or closure that outlives the run


def test_a_leaked_process_group_is_reported(capfd):
    # A group that outlives destroy_distributed keeps gloo's worker threads into interpreter
    # exit, where they can abort the process now and then: the harness names the leak and
    # ends the rank without finalization, so the run neither aborts nor passes silently.
    run_multiprocess(_leaks_the_group, world_size=2)
    err = capfd.readouterr().err
    assert "gloo worker thread(s) still running after destroy_distributed()" in err


def _megatron_groups(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = ps.get_tensor_model_parallel_group()
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    assert t.item() == world_size


def test_megatron_groups_are_freed_by_destroy_distributed():
    # megatron-core's destroy_model_parallel leaves some group globals set; the harness
    # fails if any group (and its gloo threads) survives hstu's destroy_distributed.
    run_multiprocess(_megatron_groups, world_size=2)


def _sees_the_callers_env_and_cwd(rank: int, world_size: int, want_cwd: str) -> None:
    import os
    import sys

    assert os.environ.get("HSTU_TEST_MARKER") == "set-after-the-server-started", os.environ.get("HSTU_TEST_MARKER")
    assert os.getcwd() == want_cwd
    if os.environ.get("HSTU_TEST_START_METHOD", "forkserver") == "forkserver":
        # forked from the server that imported the trainer once: no import cost per rank
        assert "hstu.training.trainer" in sys.modules and "torchrec" in sys.modules


def test_ranks_get_the_callers_environment_and_directory(tmp_path, monkeypatch):
    run_multiprocess(_allreduce, world_size=2)  # the fork server runs from here on
    monkeypatch.setenv("HSTU_TEST_MARKER", "set-after-the-server-started")
    monkeypatch.chdir(tmp_path)
    run_multiprocess(_sees_the_callers_env_and_cwd, world_size=2, want_cwd=str(tmp_path))
