"""Stochastic length (SL, HSTU paper §3.2): shorten long training histories at random so that
the expected attention cost per sample is O(N^alpha) instead of O(N^2) (docs/data.md,
"Stochastic length", says why n is the length after the cut).

Legend: N = the configured maximum history length (``DatasetArgs.max_sequence_length``, the
length the data path already cuts every history to), n = a sample's history length *after*
that cut (n <= N; ranking: the history only, candidates are never touched), alpha in (1, 2],
K = floor(N^(alpha/2)) (at least 1; computed with a 1e-9 tolerance, so 4096^0.75 is 512).

Rule, per training sample:

- n <= K: the whole history is kept;
- n > K: with probability N^alpha / n^2 the whole (cut-to-N) history is kept, otherwise a
  subsequence of exactly K items: ``recency`` the K most recent ones, ``uniform`` K positions
  drawn uniformly without replacement (order kept), ``mix`` uniform with probability
  ``mix_prob``, else recency (drawn per sample).

Every draw is a counter-based hash of (seed, epoch, sample id), the sample id being the index
into the split's samples (the same on every rank), so a decision does not depend on the
number of ranks, the batch a sample lands in, or what was drawn before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hstu.data.negatives import _mix

SAMPLINGS = ("recency", "uniform", "mix")
_SALT_KEEP = np.uint64(0x5EED_5100_0000_0001)
_SALT_MODE = np.uint64(0x5EED_5100_0000_0002)
_SALT_SUBSET = 0x5100_0003
KEEP_WHOLE, KEEP_RECENT, KEEP_UNIFORM = 0, 1, 2
"""Per-sample decisions of :meth:`StochasticLength.decide`."""


def sampled_length(max_len: int, alpha: float) -> int:
    """K = floor(max_len^(alpha/2)), at least 1: the length of a shortened history."""
    return max(1, math.floor(max_len ** (alpha / 2.0) + 1e-9))


def _uniforms(seed: int, epoch: int, sample_ids: np.ndarray, salt: np.uint64) -> np.ndarray:
    """float64 [S] in [0, 1): a hash of (seed, epoch, sample id, salt), no RNG state."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(1_000_003) + np.uint64(epoch))
        key = _mix(key ^ salt)
        key = _mix(key ^ sample_ids.astype(np.uint64))
    return (key >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class StochasticLength:
    """The SL settings (``DatasetArgs.stochastic_length_*``; bad values are refused at
    construction): N = ``max_len`` the configured maximum history length, ``alpha`` in
    (1, 2], ``sampling`` "recency", "uniform" or "mix", ``mix_prob`` mix's chance of
    "uniform". Every method takes lengths int [S] (each sample's history length n, after the
    cut to N) and the keys of every draw, seed, epoch and sample_ids int [S] (see the module
    docstring)."""

    alpha: float
    max_len: int
    sampling: str = "recency"
    mix_prob: float = 0.5

    def __post_init__(self) -> None:
        if not 1.0 < self.alpha <= 2.0:
            raise ValueError(f"stochastic length alpha must be in (1, 2], got {self.alpha}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                f"stochastic length sampling {self.sampling!r} is not one of {SAMPLINGS}"
            )
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError(f"stochastic length mix_prob must be in [0, 1], got {self.mix_prob}")

    def decide(
        self, lengths: np.ndarray, seed: int, epoch: int, sample_ids: np.ndarray
    ) -> np.ndarray:
        """int8 [S]: KEEP_WHOLE, KEEP_RECENT or KEEP_UNIFORM per sample (vectorised; the
        kept length is n for KEEP_WHOLE, else :func:`sampled_length`)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        assert lengths.shape == sample_ids.shape, (lengths.shape, sample_ids.shape)
        k = sampled_length(self.max_len, self.alpha)
        budget = float(self.max_len) ** self.alpha
        p_whole = np.minimum(1.0, budget / np.maximum(lengths, 1).astype(np.float64) ** 2)
        whole = (lengths <= k) | (_uniforms(seed, epoch, sample_ids, _SALT_KEEP) < p_whole)
        if self.sampling == "mix":
            uniform = _uniforms(seed, epoch, sample_ids, _SALT_MODE) < self.mix_prob
        else:
            uniform = np.full(lengths.shape, self.sampling == "uniform")
        short = np.where(uniform, KEEP_UNIFORM, KEEP_RECENT)
        return np.where(whole, KEEP_WHOLE, short).astype(np.int8)

    def keep(
        self, lengths: np.ndarray, seed: int, epoch: int, sample_ids: np.ndarray
    ) -> list[np.ndarray]:
        """Kept history positions of each sample: int64 arrays, sorted, in [0, lengths[i])."""
        lengths = np.asarray(lengths, dtype=np.int64)
        decision = self.decide(lengths, seed, epoch, sample_ids)
        k = sampled_length(self.max_len, self.alpha)
        out: list[np.ndarray] = []
        for i, n in enumerate(lengths.tolist()):
            d = decision[i]
            if d == KEEP_WHOLE:
                out.append(np.arange(n, dtype=np.int64))
            elif d == KEEP_RECENT:
                out.append(np.arange(n - k, n, dtype=np.int64))
            else:
                rng = np.random.default_rng([seed, epoch, int(sample_ids[i]), _SALT_SUBSET])
                out.append(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64))
        return out

    def lengths(
        self, lengths: np.ndarray, seed: int, epoch: int, sample_ids: np.ndarray
    ) -> np.ndarray:
        """int64 [S]: the history length each sample keeps (no index arrays built)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        d = self.decide(lengths, seed, epoch, sample_ids)
        kept = sampled_length(self.max_len, self.alpha)
        return np.where(d == KEEP_WHOLE, lengths, kept).astype(np.int64)


__all__ = [
    "KEEP_RECENT",
    "KEEP_UNIFORM",
    "KEEP_WHOLE",
    "SAMPLINGS",
    "StochasticLength",
    "sampled_length",
]
