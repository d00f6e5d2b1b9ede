"""The extension points by name: attention backends, dataset readers, negative-sampling
strategies (the retrieval losses) and retrieval metrics.

Each table maps a name to where its implementation lives (``"module:attribute"``, imported
on first use) plus the little the configuration must know before anything runs. The choices
of :mod:`hstu.args` are these tables' names (its ``Literal`` annotations read them whenever a
class is checked or documented), so the gin checks, their did-you-mean lines and
docs/gin_reference.md follow the registration. Adding an extension is its module plus one
``register`` line below (docs/architecture.md). Torch-free: hstu.args imports it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hstu.validation import did_you_mean

T = TypeVar("T")


def load(target: str) -> Any:
    """The object a ``"package.module:attribute"`` target names (its module imported)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """Entries by name, in registration order (the order of the choices in messages and docs)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        del self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: str) -> str:
        """One line for a name that is not registered."""
        names = self.names()
        return f"unknown {self.kind} {name!r}{did_you_mean(name, names)}; one of {', '.join(names)}"


# ------------------------------------------------------------------------ attention backends


@dataclass(frozen=True)
class AttentionBackend:
    """An HSTU attention kernel (see hstu.ops.hstu_attention)."""

    impl: str
    """``fn(q, k, v, offsets, max_seqlen, **options) -> [T, H, d_v]``, ``options`` the fields
    of ``hstu.ops.masks.AttentionOptions``."""
    unavailable: str | None = None
    """``fn(head_dim, value_head_dim, device, dtype, causal, has_targets) -> str | None``: why
    the kernel cannot run a call (None: it can); no function: it runs everywhere."""
    fallback: str | None = None
    """The backend that runs instead when this one cannot (a message says so)."""


ATTENTION_BACKENDS: Registry[AttentionBackend] = Registry("attention backend")
ATTENTION_BACKENDS.register("cutlass", AttentionBackend(
    "hstu.ops.cutlass_attention:cutlass_hstu_attention",
    "hstu.ops.cutlass_attention:unavailable_reason", fallback="triton"))
ATTENTION_BACKENDS.register("triton", AttentionBackend(
    "hstu.ops.backends:triton_hstu_attention",
    "hstu.ops.backends:triton_unavailable_reason", fallback="pytorch"))
ATTENTION_BACKENDS.register("pytorch", AttentionBackend(
    "hstu.ops.pytorch_attention:pytorch_hstu_attention"))


# ------------------------------------------------------------------------------ datasets


@dataclass(frozen=True)
class DatasetReader:
    """A raw dataset the preprocessor reads (python -m hstu.data.preprocess --dataset NAME)."""

    reader: str | None
    """``fn(hstu.data.raw.RawSource) -> hstu.data.sources.Parsed``; None: prepared by
    hstu.data.preprocess itself (synthetic, custom)."""
    url: str | None = None
    """Official archive, downloaded when no --raw is given."""


_ZENODO = "https://zenodo.org/records/10439422/files"
DATASETS: Registry[DatasetReader] = Registry("dataset")
DATASETS.register("ml-1m", DatasetReader(
    "hstu.data.sources:read_ml_1m", "https://files.grouplens.org/datasets/movielens/ml-1m.zip"))
DATASETS.register("ml-20m", DatasetReader(
    "hstu.data.sources:read_ml_20m", "https://files.grouplens.org/datasets/movielens/ml-20m.zip"))
DATASETS.register("ml-100k", DatasetReader(
    "hstu.data.sources:read_ml_100k",
    "https://files.grouplens.org/datasets/movielens/ml-100k.zip"))
DATASETS.register("kuairand-pure", DatasetReader(
    "hstu.data.sources:read_kuairand", f"{_ZENODO}/KuaiRand-Pure.tar.gz"))
DATASETS.register("kuairand-1k", DatasetReader(
    "hstu.data.sources:read_kuairand", f"{_ZENODO}/KuaiRand-1K.tar.gz"))
DATASETS.register("kuairand-27k", DatasetReader(
    "hstu.data.sources:read_kuairand", f"{_ZENODO}/KuaiRand-27K.tar.gz"))
DATASETS.register("synthetic", DatasetReader(None))
DATASETS.register("custom", DatasetReader(None))


# ---------------------------------------------------------------- negative sampling (losses)

# what the data path can put into a retrieval batch's negatives key (hstu.data.negatives)
UNIFORM_DRAW = "uniform"  # num_negatives ids per query, uniform over the corpus, and an index
SHARED_DRAW = "shared"  # num_negatives ids per batch, uniform over the corpus, no index
# num_negatives rows per step, uniform over a dynamic item table's occupied rows: drawn by the
# model's input stage (the table's state is there), the data path carries the key empty
LIVE_DRAW = "live"


@dataclass(frozen=True)
class NegativeSampling:
    """A negative-sampling strategy of the retrieval loss: what the data path draws, which
    num_negatives it takes, and the training loss over them."""

    loss: str
    """``fn(hstu.ops.losses.LossInputs) -> (loss, (pos_logits [Q], neg_logits [Q, M] | None))``."""
    draws: str | None
    """UNIFORM_DRAW (when num_negatives > 0), SHARED_DRAW, LIVE_DRAW or None (nothing drawn; the
    full corpus is read from the item table's rows on each rank, hstu.ops.losses.vocab_parallel)."""
    num_negatives: str
    """Which RetrievalArgs.num_negatives it takes: "-1", "> 0" or "-1 or > 0"."""
    needs: str = ""
    """Why it needs num_negatives > 0 (for the message)."""
    in_batch: str = "never"
    """Whether its loss scores the batch's positives as negatives (LossInputs.batch_pos_*):
    "always", "without draws" (when it draws nothing: uniform with num_negatives -1) or
    "never". With several ranks the model then all-gathers every rank's positives first."""

    def __post_init__(self) -> None:
        assert self.in_batch in ("always", "without draws", "never"), self.in_batch

    def scores_batch_positives(self, num_negatives: int) -> bool:
        """Whether its loss reads the batch's positives with this num_negatives."""
        if self.in_batch == "without draws":
            return self.draw(num_negatives) is None
        return self.in_batch == "always"

    def draw(self, num_negatives: int) -> str | None:
        """What the batches carry for it (None: no negatives key)."""
        if self.draws == UNIFORM_DRAW and num_negatives <= 0:
            return None
        return self.draws

    def num_negatives_problem(self, name: str, num_negatives: int) -> str | None:
        """Why ``num_negatives`` does not fit this strategy, or None."""
        if self.num_negatives == "-1" and num_negatives != -1:
            return (
                f"must be -1 with negative_sampling={name!r} (it draws no uniform negatives), "
                f"got {num_negatives}"
            )
        if self.num_negatives == "> 0" and num_negatives <= 0:
            return (
                f"must be > 0 with negative_sampling={name!r} ({self.needs}), got {num_negatives}"
            )
        return None


NEGATIVE_SAMPLING: Registry[NegativeSampling] = Registry("negative sampling")
NEGATIVE_SAMPLING.register("uniform", NegativeSampling(
    "hstu.ops.losses.strategies:uniform", UNIFORM_DRAW, "-1 or > 0", in_batch="without draws"))
NEGATIVE_SAMPLING.register("in_batch", NegativeSampling(
    "hstu.ops.losses.strategies:in_batch", None, "-1", in_batch="always"))
NEGATIVE_SAMPLING.register("mixed", NegativeSampling(
    "hstu.ops.losses.strategies:mixed", UNIFORM_DRAW, "> 0",
    needs="uniform negatives plus in-batch", in_batch="always"))
NEGATIVE_SAMPLING.register("shared", NegativeSampling(
    "hstu.ops.losses.strategies:shared", SHARED_DRAW, "> 0",
    needs="the uniform ids drawn per batch, scored by every query"))
NEGATIVE_SAMPLING.register("mixed_logq", NegativeSampling(
    "hstu.ops.losses.strategies:mixed_logq", SHARED_DRAW, "> 0",
    needs="the uniform ids drawn per batch, besides the in-batch positives", in_batch="always"))
NEGATIVE_SAMPLING.register("full_corpus", NegativeSampling(
    "hstu.ops.losses.strategies:full_corpus", None, "-1"))
NEGATIVE_SAMPLING.register("sampled_live", NegativeSampling(
    "hstu.ops.losses.strategies:sampled_live", LIVE_DRAW, "> 0",
    needs="the uniform draws over the dynamic item table's live rows, per step",
    in_batch="always"))


# ------------------------------------------------------------------------ retrieval metrics


@dataclass(frozen=True)
class RetrievalMetric:
    """A per-sample retrieval metric from the target's rank (hstu.model.metrics)."""

    fn: str
    """``fn(ranks [B], k) -> [B]`` when ``at_k``, else ``fn(ranks [B]) -> [B]``."""
    at_k: bool
    """Named NAME@K (K >= 1, e.g. HR@10), else NAME."""


RETRIEVAL_METRICS: Registry[RetrievalMetric] = Registry("retrieval metric")
RETRIEVAL_METRICS.register("HR", RetrievalMetric("hstu.model.metrics:hit_rate", at_k=True))
RETRIEVAL_METRICS.register("NDCG", RetrievalMetric("hstu.model.metrics:ndcg", at_k=True))
RETRIEVAL_METRICS.register("MRR", RetrievalMetric("hstu.model.metrics:reciprocal_rank", at_k=False))


def parse_retrieval_metric(name: str) -> tuple[RetrievalMetric, int | None] | None:
    """(the metric, K or None) that ``name`` (HR@10, MRR, ...) asks for, or None."""
    match = re.match(r"^([^@\n]+)@([1-9][0-9]*)$|^([^@\n]+)$", name)
    if match is None:
        return None
    family = match.group(1) or match.group(3)
    metric = RETRIEVAL_METRICS._entries.get(family)
    if metric is None or metric.at_k != (match.group(1) is not None):
        return None
    return metric, (int(match.group(2)) if metric.at_k else None)


def retrieval_metric_names() -> str:
    """"HR@K, NDCG@K or MRR": the registered metrics as a message names them."""
    shown = [f"{n}@K" if RETRIEVAL_METRICS[n].at_k else n for n in RETRIEVAL_METRICS]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


__all__ = [
    "ATTENTION_BACKENDS",
    "DATASETS",
    "LIVE_DRAW",
    "NEGATIVE_SAMPLING",
    "RETRIEVAL_METRICS",
    "SHARED_DRAW",
    "UNIFORM_DRAW",
    "AttentionBackend",
    "DatasetReader",
    "NegativeSampling",
    "Registry",
    "RetrievalMetric",
    "load",
    "parse_retrieval_metric",
    "retrieval_metric_names",
]
