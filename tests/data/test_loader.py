"""Loaders: protocol contents, determinism, shuffle, sharding, resume, benchmark batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hstu.args import BenchmarkDatasetArgs, ConfigError, DatasetArgs, EmbeddingArgs, FeatureArgs
from hstu.data import build_data
from hstu.data.data_args import SyntheticDataArgs
from hstu.data.preprocess import preprocess
from hstu.data.store import SequenceStore


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("synth")
    preprocess(
        "synthetic",
        out=out,
        synthetic=SyntheticDataArgs(num_users=103, num_items=60, min_length=3, max_length=30),
        verbose=False,
    )
    return str(out / "synthetic")


def args(path: str, msl: int = 8, cands: int = 0, shuffle: bool = True) -> DatasetArgs:
    return DatasetArgs(
        dataset_name="synthetic",
        max_sequence_length=msl,
        dataset_path=path,
        max_num_candidates=cands,
        shuffle=shuffle,
    )


def flat_items(batch) -> list[list[int]]:
    kjt = batch.features[batch.item_feature_name]
    return [t.tolist() for t in torch.split(kjt.values(), kjt.lengths().tolist())]


def test_retrieval_batches_follow_leave_one_out(synth):
    store = SequenceStore.load(synth)
    train, ev, info = build_data(args(synth, shuffle=False), "retrieval", 16, 16, 0, 1, 0)
    seqs = [store.items[a:b].tolist() for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    users = [b.features["user_id"].values().tolist() for b in train]
    train_items = [s for b in train for s in flat_items(b)]
    for uid, items in zip([u for batch_users in users for u in batch_users], train_items):
        assert items == seqs[uid - 1][:-1][-8:]
    ev_batches = list(ev)
    targets = torch.cat([b.labels for b in ev_batches]).tolist()
    assert targets == [s[-1] for s in seqs]
    for b in ev_batches:
        for uid, items in zip(b.features["user_id"].values().tolist(), flat_items(b)):
            assert items == seqs[uid - 1][:-1][-8:]
        assert b.num_candidates.sum() == 0 and b.sample_mask.all()
        assert b.features["action"].lengths().tolist() == b.item_lengths().tolist()
        assert b.timestamps.shape[0] == b.item_lengths().sum()
        assert b.max_seqlen == 8 == info.max_seqlen
    assert info.num_eval_samples == store.num_users and info.num_items == 61


def test_holdout_validation_splits(synth):
    store = SequenceStore.load(synth)
    seqs = [store.items[a:b].tolist() for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    train, valid, _ = build_data(
        args(synth, shuffle=False),
        "retrieval",
        200,
        200,
        0,
        1,
        0,
        split="valid",
        holdout_validation=True,
    )
    b = next(iter(valid))
    assert b.labels.tolist() == [s[-2] for s in seqs]
    t = next(iter(train))
    assert flat_items(t)[0] == seqs[t.features["user_id"].values()[0] - 1][:-2][-8:]


def test_train_full_history_windows_cover_every_target_once(synth):
    """With train_full_history each item after a user's first is a training target exactly
    once (windows of max_sequence_length overlapping by one item); without it only the most
    recent window's targets are, so some are lost."""
    from hstu.data.loader import retrieval_samples

    store = SequenceStore.load(synth)
    for holdout in (False, True):
        plain = retrieval_samples(store, "train", 8, holdout)
        full = retrieval_samples(store, "train", 8, holdout, full_history=True)
        drop = 2 if holdout else 1
        for s, complete in ((plain, False), (full, True)):
            assert ((s.hist_end - s.hist_start) <= 8).all() and ((s.hist_end - s.hist_start) >= 2).all()
            targets = np.concatenate(
                [np.arange(a + 1, b) for a, b in zip(s.hist_start, s.hist_end)]
            )
            assert len(np.unique(targets)) == len(targets)  # no target twice
            want = np.concatenate(
                [np.arange(o + 1, o + n - drop) for o, n in zip(store.offsets[:-1], store.lengths)]
            )
            assert set(targets.tolist()) <= set(want.tolist())
            assert (len(targets) == len(want)) == complete
    args_full = DatasetArgs(
        dataset_name="synthetic", max_sequence_length=8, dataset_path=synth, train_full_history=True
    )
    train, _, _ = build_data(args_full, "retrieval", 16, 16, 0, 1, 0)
    assert sum(b.item_lengths().numel() for b in train) == len(retrieval_samples(store, "train", 8, full_history=True))


def test_ranking_candidates_never_trained_on(synth):
    store = SequenceStore.load(synth)
    seqs = [store.items[a:b].tolist() for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    acts = [store.actions[a:b].tolist() for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    train, ev, info = build_data(
        args(synth, msl=6, cands=4, shuffle=False), "ranking", 32, 32, 0, 1, 0
    )
    assert info.max_seqlen == 10
    for loader, is_eval in ((train, False), (ev, True)):
        for b in loader:
            offs = np.concatenate([[0], np.cumsum(b.num_candidates.numpy())])
            for k, (uid, items) in enumerate(
                zip(b.features["user_id"].values().tolist(), flat_items(b))
            ):
                seq, act = seqs[uid - 1], acts[uid - 1]
                c = min(4, len(seq) - 1)
                earlier = len(seq) - c
                if is_eval:
                    h = items[: len(items) - c]
                    assert items[len(h) :] == seq[earlier:] and h == seq[:earlier][-6:]
                    assert b.labels[offs[k] : offs[k + 1]].tolist() == act[earlier:]
                else:
                    assert len(items) <= earlier  # nothing from the evaluation candidates
                    c_tr = min(4, earlier - 1)
                    assert items[-c_tr:] == seq[earlier - c_tr : earlier]
                    assert b.labels[offs[k] : offs[k + 1]].tolist() == act[earlier - c_tr : earlier]
            assert b.features["action"].lengths().tolist() == b.history_lengths().tolist()


def test_ranking_holdout_validation_candidates_sit_between_train_and_test(synth):
    """valid candidates = the C interactions before the test ones; training candidates come
    from before the valid ones; each split's history ends where its candidates start."""
    store = SequenceStore.load(synth)
    seqs = [store.items[a:b].tolist() for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    loaders = {}
    for split in ("valid", "test"):
        train, ev, _ = build_data(
            args(synth, msl=6, cands=4, shuffle=False), "ranking", 512, 512, 0, 1, 0,
            split=split, holdout_validation=True,
        )
        loaders[split] = ev
    def cands_by_user(loader):
        out = {}
        for b in loader:
            for uid, items, c in zip(
                b.features["user_id"].values().tolist(), flat_items(b), b.num_candidates.tolist()
            ):
                out[uid] = (items[: len(items) - c], items[len(items) - c :])
        return out
    test, valid, tr = (cands_by_user(loaders["test"]), cands_by_user(loaders["valid"]),
                       cands_by_user(train))
    checked = 0
    for uid, seq in enumerate(seqs, start=1):
        c_test = min(4, len(seq) - 1)
        t_start = len(seq) - c_test
        assert test[uid][1] == seq[t_start:]
        c_val = min(4, t_start - 1)
        if c_val < 1:
            assert uid not in valid and uid not in tr
            continue
        v_start = t_start - c_val
        assert valid[uid] == (seq[:v_start][-6:], seq[v_start:t_start])
        if uid in tr:
            hist, cands = tr[uid]
            c_tr = min(4, v_start - 1)
            assert cands == seq[v_start - c_tr : v_start] and hist == seq[: v_start - c_tr][-6:]
            checked += 1
    assert checked > 50


def test_deterministic_and_shuffled_per_epoch(synth):
    def epoch_users(seed: int, epochs: int = 2, shuffle: bool = True) -> list[list[int]]:
        train, _, _ = build_data(args(synth, shuffle=shuffle), "retrieval", 10, 10, 0, 1, seed)
        return [
            torch.cat([b.features["user_id"].values() for b in train]).tolist()
            for _ in range(epochs)
        ]

    a, b = epoch_users(1), epoch_users(1)
    assert a == b
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1])
    assert epoch_users(2)[0] != a[0]
    plain = epoch_users(1, shuffle=False)
    assert plain[0] == plain[1] == sorted(plain[0])


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_sharding_equal_counts_and_exact_eval_cover(synth, world_size):
    lens, train_users, eval_users = [], [], []
    for rank in range(world_size):
        train, ev, info = build_data(args(synth), "retrieval", 7, 5, rank, world_size, 3)
        lens.append((len(train), len(ev)))
        batches = list(train)
        assert len(batches) == len(train)
        train_users += torch.cat([b.features["user_id"].values() for b in batches]).tolist()
        for b in ev:
            eval_users += b.features["user_id"].values()[b.sample_mask].tolist()
    assert len(set(lens)) == 1, lens
    assert sorted(eval_users) == list(range(1, info.num_eval_samples + 1))
    assert (
        set(train_users) == set(range(1, info.num_train_samples + 1))
        or len(set(train_users)) == info.num_train_samples
    )


def test_resume_from_state_dict_is_exact(synth):
    train, _, _ = build_data(args(synth), "retrieval", 8, 8, 1, 2, 5)
    reference = [flat_items(b) for _ in range(2) for b in train]  # two epochs
    fresh, _, _ = build_data(args(synth), "retrieval", 8, 8, 1, 2, 5)
    it = iter(fresh)
    consumed = [flat_items(next(it)) for _ in range(len(fresh) + 0)]  # epoch 0 up to its end
    list(it)
    it = iter(fresh)
    consumed += [flat_items(next(it)) for _ in range(2)]
    state = fresh.state_dict()
    assert state["epoch"] == 1 and state["batch_index"] == 2
    resumed, _, _ = build_data(args(synth), "retrieval", 8, 8, 1, 2, 5)
    resumed.load_state_dict(state)
    rest = [flat_items(b) for b in resumed]
    assert consumed + rest == reference


def test_benchmark_batches_from_feature_args():
    item = FeatureArgs(
        feature_names=["item"],
        max_sequence_length=50,
        is_jagged=True,
        length_distribution="zipf",
        value_distribution="zipf",
    )
    act = FeatureArgs(feature_names=["act"], max_sequence_length=50, value_distribution="uniform")
    ctx = FeatureArgs(feature_names=["u"], max_sequence_length=1, value_distribution="lognormal")
    tables = [
        EmbeddingArgs(["item"], "item", 1000, "model_parallel"),
        EmbeddingArgs(["act"], "act", 8, "data_parallel"),
        EmbeddingArgs(["u"], "u", 30, "data_parallel"),
    ]
    bench = BenchmarkDatasetArgs(
        feature_args=[item, act, ctx],
        embedding_args=tables,
        item_feature_name="item",
        contextual_feature_names=["u"],
        action_feature_name="act",
        max_num_candidates=5,
    )
    train, _, info = build_data(bench, "ranking", 32, 16, 0, 1, 0, benchmark_num_batches=4)
    batches = list(train)
    assert len(batches) == 4 and info.max_seqlen == 55 and info.num_items == 1000
    for b in batches:
        lengths = b.item_lengths()
        assert (
            (lengths <= 55).all()
            and (b.num_candidates >= 1).all()
            and (b.num_candidates <= 5).all()
        )
        assert (b.history_lengths() >= 1).all()
        assert b.labels.numel() == b.num_candidates.sum() and (b.labels < 8).all()
        vals = b.features["item"].values()
        assert vals.min() >= 0 and vals.max() < 1000
        assert b.features["u"].lengths().eq(1).all()
    again, _, _ = build_data(bench, "ranking", 32, 16, 0, 1, 0, benchmark_num_batches=4)
    assert all(
        torch.equal(x.features.values(), y.features.values()) for x, y in zip(batches, again)
    )
    zipf_vals = torch.cat([b.features["item"].values() for b in batches])
    assert (zipf_vals < 10).float().mean() > 0.3  # zipf puts mass on small ids


def test_batch_is_pipelineable(synth):
    train, _, _ = build_data(args(synth, cands=2), "ranking", 4, 4, 0, 1, 0)
    b = next(iter(train)).to(torch.device("cpu"))
    assert b.features.values().dtype == torch.int64 and b.batch_size == 4
    assert b.num_tokens() == int(
        b.item_lengths().sum() + 4 * len(b.contextual_feature_names) + b.history_lengths().sum()
    )


def test_missing_dataset_points_at_preprocessor(tmp_path):
    from hstu.data.errors import DataError

    with pytest.raises(DataError, match=r"run: python -m hstu.data.preprocess --dataset ml-1m"):
        build_data(
            DatasetArgs(
                dataset_name="ml-1m", max_sequence_length=5, dataset_path=str(tmp_path / "ml-1m")
            ),
            "retrieval",
            2,
            2,
            0,
            1,
            0,
        )


def test_input_token_choices(synth):
    base = args(synth, cands=2, shuffle=False)
    full_train, _, full_info = build_data(base, "ranking", 8, 8, 0, 1, 0)
    assert full_info.action_feature_name == "action"
    assert full_info.contextual_feature_names == ["user_id", "segment"]
    lean = DatasetArgs(
        dataset_name="synthetic", max_sequence_length=8, dataset_path=synth, max_num_candidates=2,
        action_tokens=False, contextual_features=["segment"],
    )
    train, _, info = build_data(lean, "ranking", 8, 8, 0, 1, 0)
    assert info.action_feature_name is None and info.contextual_feature_names == ["segment"]
    assert set(info.contextual_vocab_sizes) == {"segment"}
    assert [t.table_name for t in info.default_tables()] == ["item", "segment"]
    batch, full = next(iter(train)), next(iter(full_train))
    assert batch.features.keys() == ["item_id", "segment"]
    # the labels (candidate actions) do not depend on whether actions are input tokens
    assert torch.equal(batch.labels, full.labels)
    assert torch.equal(batch.features["item_id"].values(), full.features["item_id"].values())
    with pytest.raises(ConfigError, match=r"contextual_features: 'segmnt' .* \(did you mean 'segment'\?\)"):
        build_data(
            DatasetArgs(dataset_name="synthetic", max_sequence_length=8, dataset_path=synth,
                        contextual_features=["segmnt"]),
            "retrieval", 8, 8, 0, 1, 0,
        )


def test_retrieval_query_times(synth):
    """With query times (NetworkArgs.rab_query_time) a training sample carries the timestamp
    of its user's interaction right after the window (the item its last position would
    predict), an evaluation sample its held-out target's; without them, none."""
    store = SequenceStore.load(synth)
    stamps = [store.timestamps[a:b].tolist() for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    seqs = [store.items[a:b].tolist() for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    for split, drop in (("valid", 2), ("test", 1)):
        train, ev, _ = build_data(
            args(synth, shuffle=False), "retrieval", 16, 16, 0, 1, 0, split=split,
            holdout_validation=True, drop_last=False,
        )
        assert next(iter(train)).query_timestamps is None
        train.query_times = ev.query_times = True
        for b in train:
            for uid, items, qt in zip(b.features["user_id"].values().tolist(), flat_items(b),
                                      b.query_timestamps.tolist()):
                # the window ends before the validation target; the next event's time
                assert items == seqs[uid - 1][:-2][-8:]
                assert qt == stamps[uid - 1][-2]
        for b in ev:
            uid = b.features["user_id"].values().tolist()
            assert b.query_timestamps.tolist() == [stamps[u - 1][-drop] for u in uid]
            assert b.labels.tolist() == [seqs[u - 1][-drop] for u in uid]
