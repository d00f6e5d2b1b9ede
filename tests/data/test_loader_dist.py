"""Two gloo ranks agree on batch counts and together cover every eval user once."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hstu.args import DatasetArgs
from hstu.data import build_data
from hstu.data.data_args import SyntheticDataArgs
from hstu.data.preprocess import preprocess
from tests.dist_utils import run_multiprocess


def _body(rank: int, world_size: int, path: str) -> None:
    args = DatasetArgs(
        dataset_name="synthetic", max_sequence_length=10, dataset_path=path, shuffle=True
    )
    train, ev, info = build_data(args, "retrieval", 9, 4, rank, world_size, 11)
    counts = torch.tensor([len(train), len(ev), sum(1 for _ in train), sum(1 for _ in ev)])
    gathered = [torch.zeros_like(counts) for _ in range(world_size)]
    dist.all_gather(gathered, counts)
    assert all(torch.equal(g, gathered[0]) for g in gathered), gathered
    users = torch.cat([b.features["user_id"].values()[b.sample_mask] for b in ev])
    total = torch.zeros(info.num_users + 1, dtype=torch.int64)
    total.index_add_(0, users, torch.ones_like(users))
    dist.all_reduce(total)
    assert total[1:].eq(1).all() and total[0] == 0


def test_two_ranks(tmp_path):
    preprocess(
        "synthetic",
        out=tmp_path,
        synthetic=SyntheticDataArgs(num_users=37, num_items=20, min_length=3, max_length=9),
        verbose=False,
    )
    run_multiprocess(_body, world_size=2, path=str(tmp_path / "synthetic"))
