"""Stochastic length (DatasetArgs.stochastic_length_*): the sampling rule, its determinism,
and what the loaders do with it (training only, candidates kept, rank-independent)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hstu.args import ConfigError, DatasetArgs
from hstu.data import build_data
from hstu.data.data_args import SyntheticDataArgs
from hstu.data.loader import Samples, SequenceLoader
from hstu.data.preprocess import preprocess
from hstu.data.stochastic_length import KEEP_WHOLE, StochasticLength, sampled_length
from hstu.data.store import SequenceStore


# ----------------------------------------------------------------------------- the rule
def test_sampled_length_is_the_floor_of_n_to_the_half_alpha():
    assert sampled_length(200, 1.5) == math.floor(200**0.75) == 53
    assert sampled_length(4096, 1.5) == 512  # 4096^0.75 = 2^9 exactly, not 511
    assert sampled_length(4096, 2.0) == 4096
    assert sampled_length(3, 1.1) == 1


@pytest.mark.parametrize("n", [30, 53, 54, 90, 200])
def test_whole_fraction_follows_n_alpha_over_n_squared(n):
    big_n, alpha, s = 200, 1.5, 20_000
    k = sampled_length(big_n, alpha)
    kept = StochasticLength(alpha, big_n).lengths(np.full(s, n), seed=7, epoch=0, sample_ids=np.arange(s))
    whole = kept == n
    if n <= k:
        assert whole.all()
        return
    p = big_n**alpha / n**2
    assert abs(whole.mean() - p) < 4 * math.sqrt(p * (1 - p) / s) + 1e-9, (whole.mean(), p)
    assert (kept[~whole] == k).all()
    # the point of SL: expected attention cost per sample at most 2 N^alpha
    assert (kept.astype(float) ** 2).mean() <= 2 * big_n**alpha


def test_recency_keeps_the_tail_uniform_an_ordered_spread_subset():
    n, big_n, alpha, s = 200, 200, 1.5, 400
    k = sampled_length(big_n, alpha)
    ids = np.arange(s)
    recent = StochasticLength(alpha, big_n, "recency").keep(np.full(s, n), 1, 0, ids)
    uniform = StochasticLength(alpha, big_n, "uniform").keep(np.full(s, n), 1, 0, ids)
    short = [i for i in range(s) if recent[i].size == k]
    assert short and len(short) < s
    for i in short:
        assert recent[i].tolist() == list(range(n - k, n))
        u = uniform[i]
        assert u.size == k and (np.diff(u) > 0).all() and u[0] >= 0 and u[-1] < n
    # the same samples are shortened whatever the sampling (one draw decides)
    assert [i for i in range(s) if uniform[i].size == k] == short
    pos = np.concatenate([uniform[i] for i in short])
    assert abs(pos.mean() - (n - 1) / 2) < 6, pos.mean()  # spread over the whole history
    assert (pos < n - k).mean() > 0.5  # mostly outside recency's tail


def test_mix_takes_uniform_with_its_probability():
    s, n = 20_000, 200
    d = StochasticLength(1.5, 200, "mix", 0.3).decide(np.full(s, n), 3, 0, np.arange(s))
    short = d != KEEP_WHOLE
    frac = (d[short] == 2).mean()
    assert abs(frac - 0.3) < 0.03, frac


def test_deterministic_per_seed_epoch_sample_and_independent_of_the_batch():
    lengths = np.arange(60, 260)
    ids = np.arange(1000, 1200)
    sl = StochasticLength(1.4, 200, "uniform")
    a = sl.keep(lengths, 5, 2, ids)
    b = sl.keep(lengths, 5, 2, ids)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # any subset (another rank's batch, another order) gives each sample the same decision
    pick = np.array([150, 3, 77, 8])
    sub = sl.keep(lengths[pick], 5, 2, ids[pick])
    assert all(np.array_equal(a[p], x) for p, x in zip(pick, sub))
    other_epoch = sl.keep(lengths, 5, 3, ids)
    other_seed = sl.keep(lengths, 6, 2, ids)
    assert any(not np.array_equal(x, y) for x, y in zip(a, other_epoch))
    assert any(not np.array_equal(x, y) for x, y in zip(a, other_seed))


@pytest.mark.parametrize("field,value", [
    ("stochastic_length_alpha", 1.0), ("stochastic_length_alpha", 2.5),
    ("stochastic_length_alpha", -1.0), ("stochastic_length_sampling", "latest"),
    ("stochastic_length_mix_prob", 1.5),
])
def test_bad_options_are_one_line_naming_the_field(tmp_path, field, value):
    with pytest.raises(ConfigError) as err:
        DatasetArgs(dataset_name="synthetic", max_sequence_length=8, dataset_path=str(tmp_path),
                    **{field: value})
    assert f"DatasetArgs.{field}" in str(err.value).splitlines()[0]
    with pytest.raises(ValueError):
        StochasticLength(alpha=value if field.endswith("alpha") else 1.5, max_len=8,
                         sampling=value if field.endswith("sampling") else "recency",
                         mix_prob=value if field.endswith("prob") else 0.5)


# ------------------------------------------------------------------------------ loaders
class _Store:
    """The fields SequenceLoader reads; item id = flat row + 1, so an item names its row."""

    def __init__(self, total: int):
        self.items = np.arange(1, total + 1, dtype=np.int64)
        self.timestamps = np.arange(total, dtype=np.int64) * 10
        self.actions = np.arange(total, dtype=np.int64) % 7
        self.contextual = {}
        self.metadata = {"item_feature_name": "item", "action_feature_name": "action",
                         "contextual_feature_names": []}


def _loader(lengths, world, rank, batch, sl, balance=False, by="tokens"):
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ends = starts + np.asarray(lengths, dtype=np.int64)
    samples = Samples(np.arange(len(lengths)), starts, ends, ends, None)
    return SequenceLoader(
        _Store(int(ends[-1])), samples, task="retrieval", training=True, batch_size=batch,
        rank=rank, world_size=world, seed=11, shuffle=True, max_seqlen=64, contextual_features=[],
        balance_ranks=balance, balance_by=by, stochastic_length=sl,
    )


def _sequences(loaders, starts) -> dict[int, list[int]]:
    """sample -> kept item ids, over one epoch of every rank (a sample's items name it)."""
    out: dict[int, list[int]] = {}
    for loader in loaders:
        for b in loader:
            kjt = b.features["item"]
            acts = torch.split(b.features["action"].values(), b.features["action"].lengths().tolist())
            for items, a in zip(torch.split(kjt.values(), kjt.lengths().tolist()), acts):
                sample = int(np.searchsorted(starts, items[0].item() - 1, side="right") - 1)
                assert out.setdefault(sample, items.tolist()) == items.tolist()
                assert a.tolist() == ((items - 1) % 7).tolist()  # actions follow their items
    return out


@pytest.mark.parametrize("sampling", ["recency", "uniform"])
def test_one_and_two_ranks_keep_the_same_items_per_sample(sampling):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 65, size=24)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    sl = StochasticLength(alpha=1.5, max_len=64, sampling=sampling)
    one = _sequences([_loader(lengths, 1, 0, 4, sl)], starts)
    two = _sequences([_loader(lengths, 2, r, 2, sl) for r in range(2)], starts)
    assert one == two and len(one) == 24
    full = {i: list(range(starts[i] + 1, starts[i] + lengths[i] + 1)) for i in range(24)}
    shortened = [i for i in one if one[i] != full[i]]
    assert shortened, "alpha 1.5 on lengths up to 64 must shorten some samples"
    for i in shortened:
        assert len(one[i]) == sampled_length(64, 1.5)
        assert one[i] == sorted(one[i]) and set(one[i]) <= set(full[i])


def test_attention_balance_evens_the_squared_lengths_across_ranks():
    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.zipf(1.3, size=64) * 4, 64) + 1
    sl = StochasticLength(alpha=1.6, max_len=64, sampling="uniform")
    plain = _loader(lengths, 4, 0, 4, sl).rank_costs(0)
    tokens = _loader(lengths, 4, 0, 4, sl, balance=True).rank_costs(0)
    attention = _loader(lengths, 4, 0, 4, sl, balance=True, by="attention").rank_costs(0)
    # the same global batches (their total cost) however they are split
    assert (plain.sum(1) == attention.sum(1)).all() and (tokens.sum(1) == attention.sum(1)).all()
    assert attention.max(1).sum() < 0.9 * plain.max(1).sum()
    assert attention.max(1).sum() < tokens.max(1).sum()  # squares, not counts, balanced


# ------------------------------------------------------------------ build_data (real files)
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("synth_sl")
    preprocess("synthetic", out=out, verbose=False,
               synthetic=SyntheticDataArgs(num_users=40, num_items=50, min_length=6, max_length=40))
    return str(out / "synthetic")


def _args(path, cands=0, **sl) -> DatasetArgs:
    return DatasetArgs(dataset_name="synthetic", max_sequence_length=12, dataset_path=path,
                       max_num_candidates=cands, shuffle=True, **sl)


def _dump(batches) -> list:
    out = []
    for b in batches:
        kjt = b.features
        out.append([kjt.keys(), kjt.values(), kjt.lengths(), b.labels, b.timestamps,
                    b.num_candidates, b.sample_mask])
    return out


def _equal(a, b) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        return x == y
    return len(a) == len(b) and all(same(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.parametrize("task,cands", [("retrieval", 0), ("ranking", 3)])
def test_evaluation_is_bitwise_unchanged_and_training_is_shortened(synth, task, cands):
    sl = {"stochastic_length_alpha": 1.3, "stochastic_length_sampling": "mix"}
    off_train, off_eval, _ = build_data(_args(synth, cands), task, 8, 8, 0, 1, 4)
    on_train, on_eval, _ = build_data(_args(synth, cands, **sl), task, 8, 8, 0, 1, 4)
    assert _equal(_dump(off_eval), _dump(on_eval))
    off, on = list(off_train), list(on_train)
    assert not _equal(_dump(off), _dump(on))
    k = sampled_length(12, 1.3)
    shortened = 0
    for b_off, b_on in zip(off, on):
        assert torch.equal(b_off.num_candidates, b_on.num_candidates)
        if task == "ranking":
            assert torch.equal(b_off.labels, b_on.labels)  # every candidate and its label kept
        h_off, h_on = b_off.history_lengths().tolist(), b_on.history_lengths().tolist()
        items_off = torch.split(b_off.features["item_id"].values(), b_off.item_lengths().tolist())
        items_on = torch.split(b_on.features["item_id"].values(), b_on.item_lengths().tolist())
        times_on = torch.split(b_on.timestamps, b_on.item_lengths().tolist())
        for i in range(b_on.batch_size):
            assert h_on[i] in (h_off[i], k)
            shortened += h_on[i] != h_off[i]
            assert items_on[i][h_on[i]:].tolist() == items_off[i][h_off[i]:].tolist()  # candidates
            assert (torch.diff(times_on[i][: h_on[i]]) >= 0).all()  # order kept
        assert b_on.require_sizes().num_history_items == sum(h_on)
        assert b_on.features["action"].lengths().tolist() == h_on
    assert shortened > 0


def test_the_loader_keeps_the_store_rows_it_says(synth):
    store = SequenceStore.load(synth)
    train, _, _ = build_data(_args(synth, 0, stochastic_length_alpha=1.3,
                                   stochastic_length_sampling="uniform"), "retrieval", 8, 8, 0, 1, 4)
    loader = train
    # recompute epoch 0's decisions directly from the rule and compare with the loader
    sl = loader.stochastic_length
    s = loader.samples
    for b in loader:
        users = b.features["user_id"].values().numpy() - 1
        items = torch.split(b.features["item_id"].values(), b.item_lengths().tolist())
        for u, got in zip(users, items):
            (idx,) = np.flatnonzero(s.user == u)
            h = int(s.hist_end[idx] - s.hist_start[idx])
            keep = sl.keep(np.array([h]), loader.seed, 0, np.array([idx]))[0]
            assert got.tolist() == store.items[s.hist_start[idx] + keep].tolist()
        break
