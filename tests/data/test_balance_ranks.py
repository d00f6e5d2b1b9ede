"""DatasetArgs.balance_ranks: the global batch is split over the ranks by tokens."""

import numpy as np
import pytest

from hstu.data.loader import Samples, SequenceLoader


class _Store:
    """The few fields SequenceLoader reads: items, actions, contextual, metadata."""

    def __init__(self, lengths):
        total = int(np.sum(lengths))
        self.items = np.arange(1, total + 1, dtype=np.int64)
        self.timestamps = np.arange(total, dtype=np.int64)
        self.actions = None
        self.contextual = {}
        self.metadata = {"item_feature_name": "item", "action_feature_name": None,
                         "contextual_feature_names": []}


def _loaders(balance: bool, world: int, lengths, batch: int):
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ends = starts + np.asarray(lengths, dtype=np.int64)
    samples = Samples(
        user=np.arange(len(lengths)), hist_start=starts, hist_end=ends, cand_end=ends,
        target=np.full(len(lengths), -1),
    )
    return [
        SequenceLoader(_Store(lengths), samples, task="retrieval", training=True, batch_size=batch,
                       rank=r, world_size=world, seed=3, shuffle=True, max_seqlen=10_000,
                       action_tokens=False, contextual_features=[], balance_ranks=balance)
        for r in range(world)
    ]


def _epoch(loaders):
    """[step][rank] -> (sample set as first item ids, tokens)."""
    per_rank = [list(loader) for loader in loaders]
    return [
        [(frozenset(b.features["item"].values()[b.features["item"].offsets()[:-1]].tolist()),
          int(b.features["item"].lengths().sum())) for b in step]
        for step in zip(*per_rank)
    ]


@pytest.mark.parametrize("world", [2, 3])
def test_same_global_batches_fewer_tokens_on_the_busiest_rank(world):
    rng = np.random.default_rng(0)
    lengths = (rng.zipf(1.3, size=61) % 300 + 2).tolist()  # heavy-tailed, 61: a ragged last step
    plain, balanced = _epoch(_loaders(False, world, lengths, 8)), _epoch(_loaders(True, world, lengths, 8))
    assert len(plain) == len(balanced)
    worst_plain = worst_balanced = 0
    for p_step, b_step in zip(plain, balanced):
        # the same samples in the step (as a multiset over ranks), each rank the same count
        assert sorted(x for s, _ in p_step for x in s) == sorted(x for s, _ in b_step for x in s)
        assert [len(s) for s, _ in p_step] == [len(s) for s, _ in b_step]
        worst_plain += max(t for _, t in p_step)
        worst_balanced += max(t for _, t in b_step)
    # the step waits for its busiest rank: balancing must cut that sum clearly
    assert worst_balanced < 0.9 * worst_plain, (worst_balanced, worst_plain)


def test_off_for_one_rank_and_for_evaluation():
    lengths = [5, 50, 7, 3]
    (loader,) = _loaders(True, 1, lengths, 2)
    assert not loader.balance_ranks
