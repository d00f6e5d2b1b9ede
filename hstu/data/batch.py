"""The jagged batch that flows from the loader through the train pipeline to the model.

Legend: B samples; per sample b, H[b] history items, C[b] candidates (ranking only),
X contextual features of one value each. Nothing is padded on the way in.

``features`` is a TorchRec ``KeyedJaggedTensor`` with (stride B):
- ``item_feature_name``: H[b] + C[b] item ids per sample, history first then candidates,
  chronological.
- ``action_feature_name`` (optional): H[b] action values, one per history item. Candidate
  actions are never inputs; they are the ranking labels.
- each of ``contextual_feature_names``: 1 value per sample.

``timestamps``: int64 [sum(H + C)], aligned with the item feature's values (unix seconds).
``query_timestamps`` (retrieval with ``NetworkArgs.rab_query_time``, else None): int64 [B], the
time of each sample's query, the next time of its last token in the relative attention bias:
in training the timestamp of the interaction right after the sample's last history item (the
item the last position would predict), in evaluation the held-out target's.
``num_candidates``: int64 [B], C[b] (zeros for retrieval).
``labels``:
- ranking: int64 [sum(C)], the action value of each candidate, aligned with the candidates
  in the item feature (decoded per task by the model);
- retrieval evaluation: int64 [B], the held-out target item of each sample;
- retrieval training: None (the target of each position is the next item).
``sample_mask`` (optional): bool [B], False for padding samples that an evaluation loader
repeats so that every rank runs the same number of equally sized batches; metrics must skip
them. None means every sample is real (always the case in training).
``sizes`` (:class:`BatchSizes`): host-side counts of the batch (sum H, sum C, ...), so that
the step sizes its tensors without reading the device (no host sync on CUDA); ``tp_sizes``:
those of every batch of this rank's tensor-parallel group (rank order), which the dense part
gathers. Both come from the loader, on the host, where they are free.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass(frozen=True)
class BatchSizes:
    """Host-side counts of one batch: B samples, sum(H) history items, sum(C) candidates,
    and sum(max(H - 1, 0)) history items followed by another (retrieval's training queries)."""

    num_samples: int
    num_history_items: int
    num_candidates: int
    num_queries: int
    # per sample, on the host: H [B] and C [B] (int64), for sizes that depend on the model's
    # options (attention truncation's kept tokens, ``HSTUBlock``); not part of equality
    history_per_sample: np.ndarray | None = field(default=None, compare=False, repr=False)
    candidates_per_sample: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def num_items(self) -> int:
        """sum(H + C): values of the item feature."""
        return self.num_history_items + self.num_candidates

    @staticmethod
    def of(history_lengths: np.ndarray, num_candidates: np.ndarray) -> BatchSizes:
        """From host (numpy) H [B] and C [B]."""
        return BatchSizes(
            num_samples=int(history_lengths.size),
            num_history_items=int(history_lengths.sum()),
            num_candidates=int(num_candidates.sum()),
            num_queries=int(np.maximum(history_lengths - 1, 0).sum()),
            history_per_sample=np.asarray(history_lengths, dtype=np.int64),
            candidates_per_sample=np.asarray(num_candidates, dtype=np.int64),
        )

    @staticmethod
    def total(parts: tuple[BatchSizes, ...]) -> BatchSizes:
        """The counts of the concatenation of ``parts``."""
        whole = all(p.history_per_sample is not None and p.candidates_per_sample is not None
                    for p in parts)
        return BatchSizes(
            sum(p.num_samples for p in parts), sum(p.num_history_items for p in parts),
            sum(p.num_candidates for p in parts), sum(p.num_queries for p in parts),
            np.concatenate([p.history_per_sample for p in parts]) if whole else None,
            np.concatenate([p.candidates_per_sample for p in parts]) if whole else None,
        )

    def truncated_tokens(
        self, keep: int, num_contextual: int, per_history_item: int
    ) -> tuple[int, int] | None:
        """Attention truncation: (sum_b min(n_b, keep), max_b C[b]) for token sequences of
        n_b = num_contextual + per_history_item * H[b] + C[b] tokens; None without the
        per-sample counts."""
        if self.history_per_sample is None or self.candidates_per_sample is None:
            return None
        hist, cand = self.history_per_sample, self.candidates_per_sample
        tokens = num_contextual + per_history_item * hist + cand
        return int(np.minimum(tokens, keep).sum()), int(cand.max()) if cand.size else 0


@dataclass
class Batch(Pipelineable):
    features: KeyedJaggedTensor
    batch_size: int
    item_feature_name: str
    contextual_feature_names: list[str] = field(default_factory=list)
    action_feature_name: str | None = None
    num_candidates: torch.Tensor | None = None
    timestamps: torch.Tensor | None = None
    query_timestamps: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    # max H + C over the whole dataset (not this batch): keeps kernel shapes stable
    max_seqlen: int = 0
    # bool [B]: False marks an evaluation padding sample (not counted in metrics)
    sample_mask: torch.Tensor | None = None
    # retrieval training, uniform/mixed negatives: int64 [Q, M] index into the values of the
    # negatives key of ``features`` (hstu.data.negatives)
    negative_index: torch.Tensor | None = None
    # its transpose, built in the data path (hstu.data.negatives.transpose_index): int64
    # [2, Q*M] (flat positions sorted by index value; their query) and int64 [U + 1]
    negative_order: torch.Tensor | None = None
    negative_offsets: torch.Tensor | None = None
    # retrieval training, negative_sampling="sampled_live": how many live rows of the dynamic
    # item table the negatives key's rows were drawn from (set by the model's input stage)
    negative_live: int | None = None
    # online training (retrieval): int64 [B], the first history position of each sample whose
    # next item is a target (earlier ones were trained on before); None: every position. The
    # sizes' num_queries then counts sum(max(H - 1 - first_trained, 0))
    first_trained: torch.Tensor | None = None
    # dynamic tables: feature -> bool mask of ids without a slot (set by the model's input
    # stage, ``GenerativeRecommender.prepare``; their embeddings are zeroed)
    lookup_misses: dict[str, torch.Tensor] | None = None
    # host-side counts (see the module docstring): filled from the host tensors when not given
    sizes: BatchSizes | None = None
    tp_sizes: tuple[BatchSizes, ...] | None = None

    def __post_init__(self) -> None:
        if self.sizes is None and self.features.lengths().device.type == "cpu":
            from hstu.sync_audit import allowed_sync

            with allowed_sync("a Batch built without its sizes: counted from its host tensors"):
                cands = (
                    self.num_candidates.numpy() if self.num_candidates is not None
                    else np.zeros(self.batch_size, dtype=np.int64)
                )
                self.sizes = BatchSizes.of(self.item_lengths().numpy() - cands, cands)

    _TENSOR_FIELDS = (
        "num_candidates", "timestamps", "query_timestamps", "labels", "sample_mask",
        "negative_index", "negative_order", "negative_offsets", "first_trained",
    )

    def _map(self, fn) -> Batch:
        """This batch with ``fn`` applied to every tensor (features and lookup misses too)."""
        moved = {
            name: None if (t := getattr(self, name)) is None else fn(t)
            for name in self._TENSOR_FIELDS
        }
        misses = self.lookup_misses
        if misses is not None:
            misses = {k: fn(v) for k, v in misses.items()}
        return replace(self, features=fn(self.features), lookup_misses=misses, **moved)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        for name in self._TENSOR_FIELDS:
            t = getattr(self, name)
            if t is not None:
                t.record_stream(stream)
        for t in (self.lookup_misses or {}).values():
            t.record_stream(stream)

    # ----------------------------------------------------------------- conveniences
    def item_lengths(self) -> torch.Tensor:
        """[B] H[b] + C[b]."""
        return self.features[self.item_feature_name].lengths()

    def history_lengths(self) -> torch.Tensor:
        """[B] H[b]."""
        lengths = self.item_lengths()
        if self.num_candidates is None:
            return lengths
        return lengths - self.num_candidates

    def num_tokens(self) -> int:
        """Tokens the model sees: contextual + items (+ actions), for tokens/s figures."""
        sizes = self.require_sizes()
        n = sizes.num_items + self.batch_size * len(self.contextual_feature_names)
        if self.action_feature_name is not None:
            n += sizes.num_history_items
        return n

    def require_sizes(self) -> BatchSizes:
        """``sizes``, which a batch built on the host always has."""
        if self.sizes is None:
            raise ValueError("this Batch has no sizes: build it on the host (see BatchSizes)")
        return self.sizes


__all__ = ["Batch", "BatchSizes"]
