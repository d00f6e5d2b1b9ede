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
    return


def test_allreduce_two_ranks():
    run_multiprocess(_allreduce, world_size=2)


def test_error_is_carried_back():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_multiprocess(_fails_on_rank1, world_size=2)
