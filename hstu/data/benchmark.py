"""In-memory random batches from BenchmarkDatasetArgs / FeatureArgs (no files), for speed runs.

Lengths and ids follow each FeatureArgs' distribution (docs/data.md gives the formulas):
lengths in [1, max_sequence_length], ids in [0, vocab) of the table the feature looks up.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from hstu.args import BenchmarkDatasetArgs, FeatureArgs
from hstu.data.batch import Batch, BatchSizes
from hstu.data.loader import host_kjt


def _bounded_power_law(rng: np.random.Generator, alpha: float, n: int, size: int) -> np.ndarray:
    """Integers in [0, n) with P(k) ~ (k+1)^-alpha (continuous inverse CDF, then floor)."""
    u = rng.random(size)
    if abs(alpha - 1.0) < 1e-9:
        x = np.power(n + 1.0, u)
    else:
        a = 1.0 - alpha
        x = np.power(1.0 + u * (np.power(n + 1.0, a) - 1.0), 1.0 / a)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


def draw(
    rng: np.random.Generator, distribution: str, alpha: float, n: int, size: int
) -> np.ndarray:
    """int64 [size] in [0, n) from uniform | normal | zipf | lognormal (see docs/data.md)."""
    if distribution == "uniform":
        return rng.integers(0, n, size=size)
    if distribution == "normal":
        x = rng.normal(n / 2.0, alpha * n / 4.0, size=size)
    elif distribution == "lognormal":
        x = (n / 4.0) * rng.lognormal(0.0, alpha, size=size)
    elif distribution == "zipf":
        return _bounded_power_law(rng, alpha, n, size)
    else:
        raise ValueError(f"unknown distribution {distribution!r}")
    return np.clip(np.floor(x).astype(np.int64), 0, n - 1)


def draw_lengths(rng: np.random.Generator, fa: FeatureArgs, size: int) -> np.ndarray:
    """int64 [size] in [1, max_sequence_length]; all max_sequence_length unless is_jagged."""
    if not fa.is_jagged:
        return np.full(size, fa.max_sequence_length, dtype=np.int64)
    return draw(rng, fa.length_distribution, fa.length_alpha, fa.max_sequence_length, size) + 1


class BenchmarkLoader:
    """A fixed pool of `num_batches` random batches per rank, yielded once per epoch.

    Same interface as SequenceLoader (len, iteration by epoch, state_dict/load_state_dict).
    The item feature's FeatureArgs gives the history length H[b]; ranking adds C[b] in
    [1, max_num_candidates] candidates with random action labels; contextual features get
    one value per sample; the action feature one value per history item.
    """

    def __init__(
        self,
        args: BenchmarkDatasetArgs,
        task: str,
        batch_size: int,
        rank: int,
        seed: int,
        training: bool,
        num_batches: int = 16,
        tp_size: int = 1,
    ) -> None:
        self.args, self.task, self.batch_size, self.training = args, task, batch_size, training
        self.vocab = {
            n: ea.item_vocab_size_or_capacity
            for ea in args.embedding_args
            for n in ea.feature_names
        }
        self.features = {n: fa for fa in args.feature_args for n in fa.feature_names}
        self.max_seqlen = (
            self.features[args.item_feature_name].max_sequence_length + args.max_num_candidates
        )
        self._pool = self._random_pool(seed, rank, training, num_batches)
        if tp_size > 1:
            # the TP group's batches are drawn from their ranks' seeds: their sizes are
            # known here without any communication (Batch.tp_sizes)
            first = rank - rank % tp_size
            pools = [
                self._pool if r == rank else self._random_pool(seed, r, training, num_batches)
                for r in range(first, first + tp_size)
            ]
            self._pool = [
                replace(b, tp_sizes=tuple(p[i].sizes for p in pools))
                for i, b in enumerate(self._pool)
            ]
        self.rank = rank
        # retrieval: a hstu.data.negatives.NegativeSampler, set by the trainer
        self.negatives = None
        self.epoch = 0
        self.batch_index = 0

    def _random_pool(self, seed: int, rank: int, training: bool, num_batches: int) -> list[Batch]:
        rng = np.random.default_rng([seed, rank, 0 if training else 1])
        return [self._random_batch(rng) for _ in range(num_batches)]

    def _random_batch(self, rng: np.random.Generator) -> Batch:
        a, b = self.args, self.batch_size
        item_fa = self.features[a.item_feature_name]
        hist = draw_lengths(rng, item_fa, b)
        cands = (
            rng.integers(1, a.max_num_candidates + 1, size=b)
            if a.max_num_candidates > 0
            else np.zeros(b, dtype=np.int64)
        )
        total = hist + cands
        n_items = int(total.sum())
        keys, values, lengths = [], [], []

        def add(name: str, counts: np.ndarray) -> None:
            """Feature ``name`` with counts[b] values in sample b, drawn as its FeatureArgs say."""
            fa = self.features[name]
            keys.append(name)
            values.append(draw(rng, fa.value_distribution, fa.value_alpha, self.vocab[name],
                               int(counts.sum())))
            lengths.append(counts)

        add(a.item_feature_name, total)
        if a.action_feature_name:
            add(a.action_feature_name, hist)
        for name in a.contextual_feature_names:
            add(name, np.ones(b, dtype=np.int64))
        action_vocab = self.vocab[a.action_feature_name] if a.action_feature_name else 2
        item_vocab = self.vocab[a.item_feature_name]
        gaps = rng.integers(1, 3600, size=n_items)
        timestamps = 1_600_000_000 + np.cumsum(gaps)
        if self.task == "ranking":
            labels = torch.from_numpy(rng.integers(0, action_vocab, size=int(cands.sum())))
        elif not self.training:
            labels = torch.from_numpy(rng.integers(0, item_vocab, size=b))
        else:
            labels = None
        return Batch(
            features=host_kjt(keys, values, lengths, b),
            batch_size=b,
            item_feature_name=a.item_feature_name,
            contextual_feature_names=list(a.contextual_feature_names),
            action_feature_name=a.action_feature_name,
            num_candidates=torch.from_numpy(cands),
            timestamps=torch.from_numpy(timestamps),
            labels=labels,
            max_seqlen=self.max_seqlen,
            sizes=BatchSizes.of(hist, cands),
        )

    def __len__(self) -> int:
        return len(self._pool)

    def __iter__(self) -> Iterator[Batch]:
        if self.batch_index >= len(self):
            self.epoch, self.batch_index = self.epoch + 1, 0
        while self.batch_index < len(self):
            self.batch_index += 1
            batch = self._pool[self.batch_index - 1]
            if self.negatives is not None:
                from hstu.data.negatives import attach_negatives

                first = ((self.rank * len(self) + self.batch_index - 1) * self.batch_size)
                ids = np.arange(first, first + batch.batch_size)
                batch = attach_negatives(batch, self.negatives, ids, self.epoch, self.training)
            yield batch
        self.epoch, self.batch_index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_index = min(int(state["batch_index"]), len(self))


__all__ = ["BenchmarkLoader", "draw", "draw_lengths"]
