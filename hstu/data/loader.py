"""Samples of the retrieval and ranking protocols, and the sharded, resumable batch loader.

Legend: U users, S samples, B samples per batch, H[b] history items, C[b] candidates.

A sample is four positions into the store's flat arrays (rows of one user):
``hist_start <= hist_end <= cand_end`` (history = [hist_start, hist_end), candidates =
[hist_end, cand_end)), plus ``target`` (flat row of the held-out item, retrieval evaluation
only). Batches are gathered from these ranges with vectorised numpy; nothing loops per item.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.data.batch import Batch, BatchSizes
from hstu.data.negatives import NegativeSampler
from hstu.data.sizes import select_contextual
from hstu.data.stochastic_length import StochasticLength
from hstu.data.store import SequenceStore

Task = Literal["retrieval", "ranking"]
Split = Literal["train", "valid", "test"]


@dataclass
class Samples:
    """S samples as row ranges of a SequenceStore (all int64 [S])."""

    user: np.ndarray
    hist_start: np.ndarray
    hist_end: np.ndarray
    cand_end: np.ndarray
    target: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.user)

    def select(self, keep: np.ndarray) -> Samples:
        return Samples(
            self.user[keep],
            self.hist_start[keep],
            self.hist_end[keep],
            self.cand_end[keep],
            None if self.target is None else self.target[keep],
        )


def retrieval_samples(
    store: SequenceStore,
    split: Split,
    max_sequence_length: int,
    holdout_validation: bool = False,
    full_history: bool = False,
) -> Samples:
    """Leave-one-out samples (docs/data.md "Protocols"). train: each user's sequence without
    its last item (with holdout_validation also without the second-to-last), its most recent
    L = ``max_sequence_length`` items, at least 2; test (valid): the L items before the last
    (second-to-last) item, which is the ``target``.

    full_history (train only): a longer training sequence is cut, from its end, into windows
    of L items overlapping by one (window i ends i * (L - 1) items before the end), so every
    item after the sequence's first is a target exactly once.
    """
    off, n = store.offsets[:-1], store.lengths
    users = np.arange(store.num_users, dtype=np.int64)
    if split == "train":
        end = off + n - (2 if holdout_validation else 1)
        if full_history and max_sequence_length > 1:
            step = max_sequence_length - 1
            count = np.maximum(1, -(-(end - off - 1) // step))  # ceil, >= 1 window per user
            users = np.repeat(users, count)
            within = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
            end = np.repeat(end, count) - within * step
            off = np.repeat(off, count)
        start = np.maximum(off, end - max_sequence_length)
        s = Samples(users, start, end, end.copy())
        return s.select(end - start >= 2)
    if split == "valid" and not holdout_validation:
        raise ValueError("split='valid' needs holdout_validation=True")
    target = off + n - (2 if split == "valid" else 1)
    start = np.maximum(off, target - max_sequence_length)
    s = Samples(users, start, target.copy(), target.copy(), target)
    return s.select(target - start >= 1)


def ranking_samples(
    store: SequenceStore,
    split: Split,
    max_sequence_length: int,
    max_num_candidates: int,
    holdout_validation: bool = False,
) -> Samples:
    """Each user's last C = min(max_num_candidates, L-1) interactions are the test
    candidates; with holdout_validation the C interactions before those (at most, keeping one
    history item) are the validation candidates. Training draws its candidates the same way
    from the history before every evaluation candidate (so no evaluation interaction is ever
    an input or a label in training). History = the most recent ``max_sequence_length``
    interactions before the candidates.
    """
    if max_num_candidates < 1:
        raise ValueError("ranking needs max_num_candidates >= 1")
    if split == "valid" and not holdout_validation:
        raise ValueError("split='valid' needs holdout_validation=True")
    off = store.offsets[:-1]
    users = np.arange(store.num_users, dtype=np.int64)
    avail = store.lengths.astype(np.int64)  # interactions still before the candidates
    stages = ["test"] + (["valid"] if holdout_validation else []) + ["train"]
    for stage in stages:
        c = np.minimum(max_num_candidates, avail - 1)
        if stage == split:
            break
        avail = avail - np.maximum(c, 0)
    cand_end = off + avail
    hist_end = cand_end - c
    start = np.maximum(off, hist_end - max_sequence_length)
    return Samples(users, start, hist_end, cand_end).select(c >= 1)


def gather_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Flat indices of the concatenated ranges [starts[i], ends[i]). int64 [sum(ends - starts)]."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = starts - np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


class SequenceLoader:
    """Iterable of Batch over the samples of one split, for one data-parallel rank
    (docs/data.md, "Loaders": order, padding to equal work, ``balance_ranks``, position).

    Every rank computes the same padded order from (seed, epoch) and takes every
    world_size-th sample from its rank; the wrapped padding samples are ``sample_mask = False``
    in evaluation. ``stochastic_length`` (training only) shortens histories as
    :mod:`hstu.data.stochastic_length` decides from (seed, epoch, sample index); every cost
    uses the kept lengths. With ``tp_size`` > 1 the ranks ``[r - r % tp_size, ...)`` form rank
    r's TP group (Megatron's layout); each batch carries its group's sizes
    (``Batch.tp_sizes``), known here from the sample order without any communication.
    ``state_dict()`` = {epoch, batch_index (batches yielded this epoch), ...}.
    """

    def __init__(
        self,
        store: SequenceStore,
        samples: Samples,
        *,
        task: Task,
        training: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        max_seqlen: int,
        drop_last: bool = False,
        balance_ranks: bool = False,
        action_tokens: bool = True,
        contextual_features: list[str] | None = None,
        tp_size: int = 1,
        balance_by: Literal["tokens", "attention"] = "tokens",
        stochastic_length: StochasticLength | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if len(samples) == 0:
            raise ValueError("no samples: every user's sequence is too short for this split")
        self.store, self.samples, self.task, self.training = store, samples, task, training
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle, self.max_seqlen, self.drop_last = shuffle and training, max_seqlen, drop_last
        self.balance_ranks = balance_ranks and training and world_size > 1
        if tp_size < 1 or world_size % tp_size != 0:
            raise ValueError(f"tp_size {tp_size} does not divide the world size {world_size}")
        self.tp_size = tp_size
        if balance_by not in ("tokens", "attention"):
            raise ValueError(f"balance_by {balance_by!r} is not 'tokens' or 'attention'")
        self.balance_by = balance_by
        self.stochastic_length = stochastic_length if training else None
        meta = store.metadata
        self.item_feature_name: str = meta["item_feature_name"]
        self.action_feature_name: str | None = (
            meta["action_feature_name"] if action_tokens else None
        )
        self.contextual_feature_names: list[str] = select_contextual(
            list(meta["contextual_feature_names"]), contextual_features
        )
        self.samples_per_rank = math.ceil(len(samples) / world_size)
        self.sid_rows: np.ndarray | None = None
        """NetworkArgs.architecture="hstu_sid": int64 [num_items, L], each item id's rows of the
        code table; every batch then carries each item's L rows as key ``sid_key``."""
        self.sid_key = ""
        self.negatives: NegativeSampler | None = None
        """Retrieval: the negatives (or corpus) key every batch carries; set by the trainer."""
        self.query_times = False
        """Retrieval: batches carry ``query_timestamps`` (``NetworkArgs.rab_query_time``); set
        by the trainer."""
        self.cold_items: np.ndarray | None = None
        """Evaluation with ``DatasetArgs.cold_items``: the item ids held out of training
        (sorted); its metrics add ``cold/<metric>`` over the targets among them."""
        self.target_counts: np.ndarray | None = None
        """The validation and test splits' (with ``TrainerArgs.best_metric``): how often each
        item id occurs in the training split; their metrics add ``seen_<lo>-<hi>/<metric>``
        per group of targets by that count (:class:`hstu.training.evaluate.TargetCounts`)."""
        self.epoch = 0
        self.batch_index = 0

    def subset(self, keep: np.ndarray) -> SequenceLoader:
        """A loader like this one over ``samples.select(keep)``, from its first batch."""
        other = copy.copy(self)
        other.samples = self.samples.select(keep)
        other.samples_per_rank = math.ceil(len(other.samples) / self.world_size)
        other.epoch, other.batch_index = 0, 0
        return other

    # --------------------------------------------------------------------- position
    def __len__(self) -> int:
        if self.drop_last and self.samples_per_rank >= self.batch_size:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": len(self.samples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position. Saved with another world or batch size, the position is
        converted through the number of samples consumed (rounded down)."""
        self.epoch = int(state["epoch"])
        index = int(state["batch_index"])
        if (
            state.get("world_size", self.world_size) != self.world_size
            or state.get("batch_size", self.batch_size) != self.batch_size
        ):
            consumed = index * state["batch_size"] * state["world_size"]
            index = consumed // (self.batch_size * self.world_size)
        self.batch_index = min(index, len(self))

    def _padded_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(every sample index in epoch order, padded by wrapping to samples_per_rank *
        world_size; real-sample mask of the same length): the same on every rank."""
        num = len(self.samples)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(num)
        else:
            order = np.arange(num)
        padded = self.samples_per_rank * self.world_size
        real = np.ones(padded, dtype=bool)
        if padded > num:
            order = np.concatenate([order, np.resize(order, padded - num)])
            real[num:] = False
        return order, real

    def _batch_of(self, order: np.ndarray, batch_index: int, rank: int, epoch: int) -> np.ndarray:
        """Rank ``rank``'s sample indices of batch ``batch_index`` (``order``: the epoch's
        :meth:`_padded_order`); with balance_ranks, its share of the global batch split by
        cost."""
        world = self.world_size
        lo = batch_index * self.batch_size
        if not self.balance_ranks:
            return order[rank::world][lo : lo + self.batch_size]
        per_rank = min(self.batch_size, self.samples_per_rank - lo)
        # the global batch, in rank order (rank r's batch k would be
        # order[r::world][lo:lo+per_rank])
        members = np.concatenate([order[r::world][lo : lo + per_rank] for r in range(world)])
        cost = self.sample_costs(members, epoch, self.balance_by)
        load = [0] * world
        taken: list[list[int]] = [[] for _ in range(world)]
        # largest first (stable: ties keep the global order), each to the least-loaded rank
        # with room (ties: the lowest rank); deterministic, so every rank computes the same split
        for j in np.argsort(-cost, kind="stable"):
            open_ranks = (q for q in range(world) if len(taken[q]) < per_rank)
            r = min(open_ranks, key=lambda q: (load[q], q))
            taken[r].append(int(j))
            load[r] += int(cost[j])
        return members[np.sort(np.asarray(taken[rank], dtype=np.int64))]

    def history_lengths(self, index: np.ndarray, epoch: int) -> np.ndarray:
        """int64 [B]: the history items samples ``index`` keep in ``epoch`` (stochastic length
        applied in training)."""
        s = self.samples
        h = (s.hist_end[index] - s.hist_start[index]).astype(np.int64)
        if self.stochastic_length is None:
            return h
        return self.stochastic_length.lengths(h, self.seed, epoch, index)

    def sample_costs(self, index: np.ndarray, epoch: int, by: str = "tokens") -> np.ndarray:
        """int64 [B]: "tokens": the items (history kept + candidates) of samples ``index``;
        "attention": (X + A*H + C)^2, the square of the tokens the model attends over
        (X contextual features, A = 2 with action tokens)."""
        if by not in ("tokens", "attention"):
            raise ValueError(f"cost {by!r} is not 'tokens' or 'attention'")
        s = self.samples
        h = self.history_lengths(index, epoch)
        c = (s.cand_end[index] - s.hist_end[index]).astype(np.int64)
        if by == "tokens":
            return h + c
        a = 2 if self.action_feature_name is not None else 1
        n = len(self.contextual_feature_names) + a * h + c
        return n * n

    def rank_costs(self, epoch: int | None = None, by: str = "attention") -> np.ndarray:
        """int64 [len(self), world_size]: the summed cost (:meth:`sample_costs`) of every rank's
        batch k in ``epoch`` (default: the current one) under this loader's sharding: the
        per-rank load report (max over ranks / mean = how long the others wait)."""
        epoch = self.epoch if epoch is None else epoch
        full, _ = self._padded_order(epoch)
        out = np.zeros((len(self), self.world_size), dtype=np.int64)
        for k in range(len(self)):
            for r in range(self.world_size):
                idx = self._batch_of(full, k, r, epoch)
                out[k, r] = int(self.sample_costs(idx, epoch, by).sum())
        return out

    def __iter__(self) -> Iterator[Batch]:
        if self.batch_index >= len(self):
            self.epoch, self.batch_index = self.epoch + 1, 0
        full, full_real = self._padded_order(self.epoch)
        real = full_real[self.rank :: self.world_size]
        first = self.rank - self.rank % self.tp_size
        group = range(first, first + self.tp_size)
        while self.batch_index < len(self):
            lo = self.batch_index * self.batch_size
            indices = [self._batch_of(full, self.batch_index, r, self.epoch) for r in group]
            self.batch_index += 1
            tp_sizes = tuple(self._sizes(i) for i in indices) if self.tp_size > 1 else None
            mask = None if self.training else real[lo : lo + self.batch_size]
            yield self.make_batch(indices[self.rank - first], mask, tp_sizes)
        self.epoch, self.batch_index = self.epoch + 1, 0

    def _sizes(self, index: np.ndarray) -> BatchSizes:
        s = self.samples
        return BatchSizes.of(
            self.history_lengths(index, self.epoch), s.cand_end[index] - s.hist_end[index]
        )

    def _rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat store rows of every item, history then candidates per sample; flat rows of
        the history items alone; H [B]): the whole ranges, or the stochastic-length subsets."""
        s = self.samples
        hist_start, hist_end, cand_end = s.hist_start[index], s.hist_end[index], s.cand_end[index]
        if self.stochastic_length is None:
            return (
                gather_ranges(hist_start, cand_end), gather_ranges(hist_start, hist_end),
                hist_end - hist_start,
            )
        kept = self.stochastic_length.keep(hist_end - hist_start, self.seed, self.epoch, index)
        h = np.asarray([k.size for k in kept], dtype=np.int64)
        hist_rows = (
            np.concatenate(kept) + np.repeat(hist_start, h) if kept else np.zeros(0, np.int64)
        )
        c = cand_end - hist_end
        out_start = np.concatenate(([0], np.cumsum(h + c)[:-1])).astype(np.int64)
        rows = np.empty(int((h + c).sum()), dtype=np.int64)
        rows[gather_ranges(out_start, out_start + h)] = hist_rows
        rows[gather_ranges(out_start + h, out_start + h + c)] = gather_ranges(hist_end, cand_end)
        return rows, hist_rows, h

    # ------------------------------------------------------------------------ batch
    def make_batch(
        self, index: np.ndarray, mask: np.ndarray | None = None,
        tp_sizes: tuple[BatchSizes, ...] | None = None,
    ) -> Batch:
        """Batch of the samples `index` (int64 [B]); mask bool [B] marks real samples;
        ``tp_sizes``: the sizes of the TP group's batches (rank order)."""
        st = self.store
        s = self.samples
        hist_end, cand_end = s.hist_end[index], s.cand_end[index]
        rows, hist_rows, hist_lengths = self._rows(index)
        num_candidates = cand_end - hist_end
        # the store's arrays are memory maps (items and actions possibly int32): gather only
        # this batch's rows, as int64
        values = [st.items[rows].astype(np.int64)]
        lengths = [hist_lengths + num_candidates]
        keys = [self.item_feature_name]
        if self.action_feature_name is not None:
            keys.append(self.action_feature_name)
            values.append(st.actions[hist_rows].astype(np.int64))
            lengths.append(hist_lengths)
        if self.contextual_feature_names:
            keys += self.contextual_feature_names
            users = s.user[index]
            # feature-major: every sample's value of the first feature, then of the next
            values += [
                st.contextual[n][users].astype(np.int64) for n in self.contextual_feature_names
            ]
            lengths.append(np.ones(len(index) * len(self.contextual_feature_names), dtype=np.int64))
        if self.sid_rows is not None:
            keys.append(self.sid_key)
            values.append(self.sid_rows[values[0]].reshape(-1))
            lengths.append(lengths[0] * self.sid_rows.shape[1])
        negative_fields: dict = {}
        if self.negatives is not None:
            keys.append(self.negatives.feature_name)
            neg_lengths = np.zeros(len(index), dtype=np.int64)
            if self.training:
                ids, neg, counts = self.negatives.draw_counted(index, hist_lengths, self.epoch)
                neg_lengths[0] = ids.size
                values.append(ids)
                negative_fields = self.negatives.batch_fields(neg, ids.size, counts)
            lengths.append(neg_lengths)
        features = host_kjt(keys, values, lengths, len(index))
        if self.task == "ranking":
            labels = (
                torch.from_numpy(st.actions[gather_ranges(hist_end, cand_end)].astype(np.int64))
                if st.actions is not None
                else None
            )
        elif not self.training:
            labels = torch.from_numpy(st.items[s.target[index]].astype(np.int64))
        else:
            labels = None
        query_timestamps = None
        if self.query_times:
            if self.task != "retrieval":
                raise ValueError(
                    "query times are for retrieval samples (NetworkArgs.rab_query_time)"
                )
            # training: the interaction after the window (every train window ends before the
            # user's last item); evaluation: the held-out target
            query_rows = hist_end if self.training else s.target[index]
            if self.training and (query_rows >= st.offsets[s.user[index] + 1]).any():
                raise ValueError(
                    "query times in training need an interaction after each training window; "
                    "a sample ends with its user's sequence"
                )
            query_timestamps = torch.from_numpy(st.timestamps[query_rows])
        return Batch(
            features=features,
            batch_size=len(index),
            item_feature_name=self.item_feature_name,
            contextual_feature_names=list(self.contextual_feature_names),
            action_feature_name=self.action_feature_name,
            num_candidates=torch.from_numpy(num_candidates),
            timestamps=torch.from_numpy(st.timestamps[rows]),
            query_timestamps=query_timestamps,
            labels=labels,
            max_seqlen=self.max_seqlen,
            sample_mask=None if mask is None else torch.from_numpy(mask.copy()),
            sizes=BatchSizes.of(hist_lengths, num_candidates),
            tp_sizes=tp_sizes,
            **negative_fields,
        )


def host_kjt(
    keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray], stride: int
) -> KeyedJaggedTensor:
    """``stride`` samples of every key (``lengths``: [stride] per key, concatenated in key
    order) as a KeyedJaggedTensor with its per-key lengths and offsets counted here, on the host:
    TorchRec would otherwise compute them from the lengths when first asked, a host read of
    a device tensor in the step (its ``from_lengths_sync``)."""
    flat_lengths = np.concatenate(lengths)
    per_key = flat_lengths.reshape(len(keys), stride).sum(1).tolist()
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(flat_lengths),
        stride=stride,
        length_per_key=per_key,
        offset_per_key=[0, *np.cumsum(per_key).tolist()],
    )


__all__ = [
    "Samples", "SequenceLoader", "gather_ranges", "host_kjt", "ranking_samples",
    "retrieval_samples",
]
