"""build_data: the one entry point the trainer calls for loaders and dataset facts."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from hstu.args import BenchmarkDatasetArgs, ConfigError, DatasetArgs
from hstu.checks import check_dataset_name, check_ranking_data
from hstu.data.benchmark import BenchmarkLoader
from hstu.data.cold import draw_cold_items, hold_out_items
from hstu.data.info import ACTION_TABLE, ITEM_TABLE, DataInfo
from hstu.data.layout import METADATA_FILE
from hstu.data.loader import (
    Samples,
    SequenceLoader,
    gather_ranges,
    ranking_samples,
    retrieval_samples,
)
from hstu.data.sizes import info_from_metadata
from hstu.data.stochastic_length import StochasticLength
from hstu.data.store import SequenceStore


def build_data(
    dataset_args: DatasetArgs | BenchmarkDatasetArgs,
    task: Literal["retrieval", "ranking"],
    train_batch_size: int,
    eval_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    *,
    split: Literal["valid", "test"] = "test",
    holdout_validation: bool = False,
    drop_last: bool = False,
    benchmark_num_batches: int = 16,
    tp_size: int = 1,
    stream_metadata: dict[str, Any] | None = None,
) -> tuple[SequenceLoader | BenchmarkLoader, SequenceLoader | BenchmarkLoader, DataInfo]:
    """Train and eval loaders for one data-parallel rank, and the dataset's DataInfo.

    Args:
        dataset_args: DatasetArgs (reads dataset_args.resolved_path) or BenchmarkDatasetArgs.
        task: "retrieval" (leave-one-out) or "ranking" (last max_num_candidates as candidates).
        rank, world_size: this process's global rank and the world size (the ranks of a TP
            group load distinct samples; the dense part gathers them).
        seed: seed of the shuffle order (and of benchmark batches).
        split: evaluation split: "test" (last item / last candidates) or "valid" (second to
            last item / the candidates before the test ones; with holdout_validation only).
        holdout_validation: retrieval trains without each user's last two items, ranking
            without the validation and test candidates.
        drop_last: training yields only full batches.
        tp_size: tensor-parallel group size; batches then carry their group's sizes
            (``Batch.tp_sizes``; ``rank`` and ``world_size`` are then the global ones).
        stream_metadata: online training without a preprocessed dataset
            (DatasetArgs.dataset_name = "stream"): the metadata hstu.data.sizes.stream_metadata
            gives; the loaders then hold one placeholder user (the online loop gives them each
            window's samples).
    """
    if task not in ("retrieval", "ranking"):
        raise ConfigError("build_data", "task", f"{task!r} is not 'retrieval' or 'ranking'")
    if isinstance(dataset_args, BenchmarkDatasetArgs):
        return _build_benchmark(
            dataset_args, task, train_batch_size, eval_batch_size, rank, seed,
            benchmark_num_batches, tp_size,
        )
    if stream_metadata is not None:  # online training without a dataset: a placeholder store
        store = placeholder_store(stream_metadata, 3 * (dataset_args.max_num_candidates + 1))
    else:
        store = SequenceStore.load(dataset_args.resolved_path, verbose=rank == 0)
    meta = store.metadata
    check_dataset_name(dataset_args, meta, METADATA_FILE)
    msl, cands = dataset_args.max_sequence_length, dataset_args.max_num_candidates
    cold = None
    share = getattr(dataset_args, "cold_items", 0.0)
    if share and stream_metadata is None:
        if task != "retrieval":
            raise ConfigError("DatasetArgs", "cold_items",
                              "holds items out of retrieval training; ranking scores candidates")
        base = info_from_metadata(meta, dataset_args, task)
        cold = draw_cold_items(base.first_item_id, base.num_items, share,
                               getattr(dataset_args, "cold_items_seed", 0))
        store, dropped = hold_out_items(store, cold, 2 if holdout_validation else 1)
    if task == "ranking":
        check_ranking_data(dataset_args, meta)
        train_s = ranking_samples(store, "train", msl, cands, holdout_validation)
        eval_s = ranking_samples(store, split, msl, cands, holdout_validation)
    else:
        train_s = retrieval_samples(
            store, "train", msl, holdout_validation,
            full_history=getattr(dataset_args, "train_full_history", False),
        )
        eval_s = retrieval_samples(store, split, msl, holdout_validation)
    max_seqlen = msl + (cands if task == "ranking" else 0)
    common = {
        "store": store,
        "task": task,
        "rank": rank,
        "world_size": world_size,
        "seed": seed,
        "max_seqlen": max_seqlen,
        "action_tokens": dataset_args.action_tokens,
        "contextual_features": dataset_args.contextual_features,
        "tp_size": tp_size,
    }
    train = SequenceLoader(
        samples=train_s,
        training=True,
        batch_size=train_batch_size,
        shuffle=dataset_args.shuffle,
        drop_last=drop_last,
        balance_ranks=getattr(dataset_args, "balance_ranks", False),
        balance_by=getattr(dataset_args, "balance_ranks_by", "tokens"),
        stochastic_length=_stochastic_length(dataset_args),
        **common,
    )
    evaluation = SequenceLoader(
        samples=eval_s, training=False, batch_size=eval_batch_size, shuffle=False, **common
    )
    evaluation.cold_items = cold  # (hstu.training.evaluate's cold/<metric>)
    # the sizes' DataInfo (features selected as the loaders do), with the sample counts
    info = dataclasses.replace(
        info_from_metadata(meta, dataset_args, task),
        num_train_samples=len(train_s),
        num_eval_samples=len(eval_s),
        users_without_train_sample=int(store.num_users - len(np.unique(train_s.user))),
        cold_items=0 if cold is None else len(cold),
        cold_events_dropped=0 if cold is None else dropped,
        **_split_ties(store, eval_s),
    )
    return train, evaluation, info


def placeholder_store(metadata: dict[str, Any], length: int) -> SequenceStore:
    """One user with ``length`` events of item 1 (enough for a sample in every split): the
    loaders' store of an online run without a dataset (never trained on: the online loop
    gives the loaders each window's store)."""
    zeros = np.zeros(length, np.int64)
    return SequenceStore(offsets=np.array([0, length], np.int64), items=np.ones(length, np.int64),
                         timestamps=zeros, actions=zeros.copy(), contextual={}, metadata=metadata)


def _stochastic_length(args: DatasetArgs) -> StochasticLength | None:
    """The training loader's stochastic length (None when alpha is 0); N = the history cut."""
    alpha = float(getattr(args, "stochastic_length_alpha", 0.0))
    if alpha == 0.0:
        return None
    return StochasticLength(
        alpha=alpha, max_len=args.max_sequence_length,
        sampling=args.stochastic_length_sampling, mix_prob=args.stochastic_length_mix_prob,
    )


def _split_ties(store: SequenceStore, samples: Samples) -> dict[str, int]:
    """How many evaluation items share their timestamp with the last history item before them
    (their order is then the raw file's): counts for a warning at start-up."""
    last_hist = samples.hist_end - 1
    if samples.target is not None:  # retrieval: one target per sample
        tied = store.timestamps[samples.target] == store.timestamps[last_hist]
        return {"num_eval_items": len(samples), "tied_eval_items": int(tied.sum())}
    counts = samples.cand_end - samples.hist_end
    rows = gather_ranges(samples.hist_end, samples.cand_end)
    tied = store.timestamps[rows] == np.repeat(store.timestamps[last_hist], counts)
    return {"num_eval_items": int(counts.sum()), "tied_eval_items": int(tied.sum())}


def _build_benchmark(
    args: BenchmarkDatasetArgs,
    task: str,
    train_bs: int,
    eval_bs: int,
    rank: int,
    seed: int,
    num_batches: int,
    tp_size: int = 1,
) -> tuple[BenchmarkLoader, BenchmarkLoader, DataInfo]:
    if task == "ranking" and args.max_num_candidates < 1:
        raise ConfigError(
            "BenchmarkDatasetArgs", "max_num_candidates", "ranking needs max_num_candidates >= 1"
        )
    train = BenchmarkLoader(
        args, task, train_bs, rank, seed, training=True, num_batches=num_batches, tp_size=tp_size
    )
    evaluation = BenchmarkLoader(
        args, task, eval_bs, rank, seed, training=False, num_batches=max(1, num_batches // 4),
        tp_size=tp_size,
    )
    vocab = train.vocab
    info = DataInfo(
        dataset_name="benchmark",
        task=task,
        num_items=vocab[args.item_feature_name],
        item_feature_name=args.item_feature_name,
        action_feature_name=args.action_feature_name,
        contextual_feature_names=list(args.contextual_feature_names),
        contextual_vocab_sizes={n: vocab[n] for n in args.contextual_feature_names},
        num_action_values=vocab[args.action_feature_name] if args.action_feature_name else None,
        max_seqlen=train.max_seqlen,
        num_train_samples=len(train) * train_bs,
        num_eval_samples=len(evaluation) * eval_bs,
        first_item_id=0,
    )
    return train, evaluation, info


__all__ = ["ACTION_TABLE", "ITEM_TABLE", "DataInfo", "build_data"]
