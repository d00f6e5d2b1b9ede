"""Retrieval negatives drawn in the data path, looked up with the batch's other item ids
(docs/model.md, "Retrieval").

Legend: B samples, H[b] history items of sample b, Q = sum(max(H - 1, 0)) training queries
(history position j of sample b predicts item j+1), M negatives per query, U distinct ids.

The ids travel as one more key of the batch's KeyedJaggedTensor (``NegativeSampler.feature_name``,
a feature of the item table), so the step's single lookup serves them with the other items.
What a strategy draws is its entry in ``hstu.registry.NEGATIVE_SAMPLING``:
- ``uniform`` (the uniform and mixed strategies): M ids per query, drawn uniformly from
  [min_item_id, num_items); the key holds the U distinct ids (all in sample 0's slot),
  ``Batch.negative_index`` int64 [Q, M] points into them.
- ``shared``: M ids per batch, scored by every query; the key holds their U <= M distinct
  ids (in sample 0's slot), no index.
- ``live`` (the sampled_live strategy): nothing here; the key travels empty and the model's
  input stage fills it with rows drawn over the dynamic item table's occupied rows
  (``hstu.model.model.RetrievalRecommender.prepare``: the table's state lives there).
- ``full_corpus`` draws nothing and adds no key (its loss reads the item table rows each
  rank holds, ``hstu.ops.losses.vocab_parallel``).
- evaluation batches carry the key empty (the key order must not change between calls of a
  sharded collection).

Draws are a hash of (seed, epoch, sample id, position, slot), not a stream (shared draws: of
(seed, epoch, the batch's set of sample ids, slot)): a sample gets the same negatives whatever
the rank, world size, batch size or pipeline that reads it, and no random stream of the model
depends on them. Every draw is O(batch), never a pass of the catalogue (:func:`_distinct`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MIX_ADD = np.uint64(0x9E3779B97F4A7C15)
_MIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_MUL2 = np.uint64(0x94D049BB133111EB)
_SLOT_MUL = np.uint64(0xD6E8FEB86659FD93)
_POS_MUL = np.uint64(0x100000001B3)
# elements per block of the [Q, M] draw: a block's passes stay in the cache
_BLOCK = 1 << 15


def _mix_(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array, in place (wrapping arithmetic; ``tmp`` is
    scratch of x's shape)."""
    with np.errstate(over="ignore"):
        x += _MIX_ADD
        np.right_shift(x, np.uint64(30), out=tmp)
        x ^= tmp
        x *= _MIX_MUL1
        np.right_shift(x, np.uint64(27), out=tmp)
        x ^= tmp
        x *= _MIX_MUL2
        np.right_shift(x, np.uint64(31), out=tmp)
        x ^= tmp
    return x


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, into a new array."""
    out = np.array(x, dtype=np.uint64, copy=True)
    return _mix_(out, np.empty_like(out))


def _distinct(ids: np.ndarray, low: int, span: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted distinct ids + ``low`` [U], each entry's rank among them (ids' shape), how often
    each distinct id occurs [U]) of int64 ``ids`` in [0, span).

    Where the span is at most the number D of ids, a count over the span (D + span: its
    arrays no larger than ``ids``); else a sort of the D ids (D log D), never a pass over the
    catalogue, so a step's cost stays O(batch) on catalogues of millions of items. Both give
    the same arrays."""
    flat = ids.reshape(-1)
    if span <= flat.size:
        counts = np.bincount(flat, minlength=span)
        present = counts > 0
        at = np.flatnonzero(present)
        slot = np.cumsum(present, dtype=np.int64)
        slot -= 1
        return at + low, np.take(slot, ids), counts[at]
    uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    return (uniq.astype(np.int64) + low, inverse.astype(np.int64).reshape(ids.shape),
            counts.astype(np.int64, copy=False))


def _epoch_key(seed: int, epoch: int) -> np.ndarray:
    """The hash key of (seed's low 32 bits, epoch) that every draw of the epoch starts from."""
    with np.errstate(over="ignore"):
        return _mix(np.uint64(seed & 0xFFFFFFFF) * np.uint64(1_000_003) + np.uint64(epoch))


def negatives_feature_name(item_feature_name: str) -> str:
    return f"{item_feature_name}__negatives"


@dataclass
class NegativeSampler:
    """What a retrieval training batch carries for its loss (see the module docstring)."""

    # what the strategy draws (hstu.registry.NegativeSampling.draw): "shared" (num_negatives
    # uniform ids per batch), "live" (nothing: the model's input stage draws), anything else
    # num_negatives uniform ids per query ("uniform")
    mode: str
    num_negatives: int
    min_item_id: int
    num_items: int
    item_feature_name: str
    seed: int
    # ship the index's transpose with the batch (what the CPU score kernel's backward reads;
    # the trainer turns it off on GPUs, whose score path does not use it)
    transpose: bool = True

    def __post_init__(self) -> None:
        if self.mode == "full_corpus":
            raise ValueError(
                "NegativeSampler: the full corpus is never drawn into a batch (its loss reads "
                "each rank's item table rows: hstu.ops.losses.vocab_parallel)"
            )

    @property
    def feature_name(self) -> str:
        return negatives_feature_name(self.item_feature_name)

    def draw(
        self, sample_ids: np.ndarray, history_lengths: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids for the key [U], index [Q, M] into them or None for shared draws)."""
        uniq, index, _ = self.draw_counted(sample_ids, history_lengths, epoch)
        return uniq, index

    def draw_counted(
        self, sample_ids: np.ndarray, history_lengths: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`draw`, plus how many times each of the U ids was drawn (the transpose's
        row lengths; None for shared draws)."""
        if self.mode == "shared":
            return self.draw_shared(sample_ids, epoch), None, None
        if self.mode == "live":  # drawn over the live rows by the model's input stage
            return np.zeros(0, dtype=np.int64), None, None
        m = self.num_negatives
        per = np.maximum(history_lengths.astype(np.int64) - 1, 0)
        q = int(per.sum())
        sample = np.repeat(sample_ids.astype(np.uint64), per)
        first = np.repeat(np.cumsum(per) - per, per)
        pos = (np.arange(q, dtype=np.int64) - first).astype(np.uint64)
        with np.errstate(over="ignore"):
            key = _mix(_epoch_key(self.seed, epoch) ^ sample)
            key = _mix(key ^ (pos * _POS_MUL))  # [Q]
            slots = np.arange(m, dtype=np.uint64) * _SLOT_MUL  # [M]
        span = np.uint64(self.num_items - self.min_item_id)
        # ids[q, m] = mix(key[q] ^ slots[m]) % span, a block of queries at a time
        raw = np.empty((q, m), dtype=np.uint64)
        rows = max(1, _BLOCK // max(m, 1))
        tmp = np.empty((min(rows, q), m), dtype=np.uint64)
        for start in range(0, q, rows):
            x = raw[start:start + rows]
            t = tmp[: x.shape[0]]
            np.bitwise_xor(key[start:start + rows, None], slots[None, :], out=x)
            _mix_(x, t)
            # x % span as x - (x // span) * span: numpy divides by a scalar without a
            # division instruction per element (4x faster than np.remainder)
            np.floor_divide(x, span, out=t)
            t *= span
            x -= t
        ids = raw.view(np.int64)  # < span < 2**63: same values
        return _distinct(ids, self.min_item_id, int(span))

    def draw_shared(self, sample_ids: np.ndarray, epoch: int) -> np.ndarray:
        """The sorted distinct ids [U <= M] of M uniform draws for a whole batch: a hash of
        (seed, epoch, the batch's sample ids as a set, slot), so the same batch draws the same
        ids whatever its order, the rank or the pipeline that reads it."""
        key = _epoch_key(self.seed, epoch)
        with np.errstate(over="ignore"):
            # the set of sample ids: an order-free combination of their hashes
            members = _mix(sample_ids.astype(np.uint64) ^ key)
            key = _mix(key ^ np.bitwise_xor.reduce(members, initial=np.uint64(0))
                       ^ (np.uint64(members.size) * _POS_MUL))
            x = _mix(np.arange(self.num_negatives, dtype=np.uint64) * _SLOT_MUL ^ key)
        ids = (x % np.uint64(self.num_items - self.min_item_id)).astype(np.int64)
        return np.unique(ids + self.min_item_id)

    def batch_fields(
        self, index: np.ndarray | None, num_rows: int, counts: np.ndarray | None = None
    ) -> dict:
        """The Batch fields of a draw: ``negative_index``, and its transpose (see
        :func:`transpose_index`; ``counts``: the draw's per-row counts, if known) built
        here, in the data path, instead of in the step."""
        if index is None:
            return {"negative_index": None, "negative_order": None, "negative_offsets": None}
        order = offsets = None
        if self.transpose:
            order, offsets = transpose_index(index, num_rows, counts)
        return {
            "negative_index": torch.from_numpy(index),
            "negative_order": None if order is None else torch.from_numpy(order),
            "negative_offsets": None if offsets is None else torch.from_numpy(offsets),
        }


# the transpose is sorted here by numpy's 16-bit radix sort; wider keys sort slower in numpy
# than in the step (torch's radix sort), so there the model builds it itself
_TRANSPOSE_MAX_ROWS = 2**15


def transpose_index(
    index: np.ndarray, num_rows: int, counts: np.ndarray | None = None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The column-major view of ``index`` [Q, M] (values in [0, U = num_rows)): (order int64
    [2, Q*M], offsets int64 [U + 1]). order[0] lists the flat positions q*M + m of the entries
    sorted by their value, stably (ascending positions within a value), order[1] their query
    q; the entries of value u are order[:, offsets[u]:offsets[u + 1]]. It is the CSR pattern of
    the transposed [U, Q] score gradient (``hstu.ops.losses.sampled._SampledScores``).
    (None, None) when U > 2**15 (the model then sorts in the step). ``counts`` [U]: how often
    each value occurs, when the caller has them (else counted here)."""
    if num_rows > _TRANSPOSE_MAX_ROWS:
        return None, None
    flat = index.reshape(-1)
    order = np.empty((2, flat.size), dtype=np.int64)
    order[0] = np.argsort(flat.astype(np.int16), kind="stable")
    m = max(1, index.shape[1])
    if m & (m - 1) == 0:  # a power of two: a shift
        np.right_shift(order[0], m.bit_length() - 1, out=order[1])
    else:
        np.floor_divide(order[0], m, out=order[1])
    offsets = np.zeros(num_rows + 1, dtype=np.int64)
    if counts is None:
        counts = np.bincount(flat, minlength=num_rows)
    np.cumsum(counts, out=offsets[1:])
    return order, offsets


__all__ = ["NegativeSampler", "negatives_feature_name", "transpose_index"]


def attach_negatives(
    batch, sampler: NegativeSampler, sample_ids: np.ndarray, epoch: int, training: bool
):
    """``batch`` with the negatives key appended (and ``negative_index`` in training)."""
    from dataclasses import replace

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = batch.features
    neg_lengths = torch.zeros(batch.batch_size, dtype=torch.int64)
    ids = np.zeros(0, dtype=np.int64)
    index = counts = None
    if training:
        hist = batch.history_lengths().numpy()
        ids, index, counts = sampler.draw_counted(sample_ids, hist, epoch)
        neg_lengths[0] = ids.size
    # per-key lengths and offsets counted here, on the host (not in the step; see host_kjt)
    per_key = [*kjt.length_per_key(), int(ids.size)]
    features = KeyedJaggedTensor(
        keys=list(kjt.keys()) + [sampler.feature_name],
        values=torch.cat([kjt.values(), torch.from_numpy(ids)]),
        lengths=torch.cat([kjt.lengths(), neg_lengths]),
        stride=kjt.stride(),
        length_per_key=per_key,
        offset_per_key=[0, *np.cumsum(per_key).tolist()],
    )
    fields = sampler.batch_fields(index, ids.size, counts)
    return replace(batch, features=features, **fields)
