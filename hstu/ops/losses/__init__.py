"""Retrieval losses and their kernels: the sampled softmax (hstu.ops.losses.sampled), the
exact full-corpus softmax with its reused buffers (hstu.ops.losses.full_corpus), and the
training loss of each negative-sampling strategy (hstu.ops.losses.strategies), registered
by name in hstu.registry.NEGATIVE_SAMPLING."""

from hstu.ops.losses.full_corpus import (
    MATMUL_DTYPES,
    HistoryWindow,
    full_corpus_loss,
    full_softmax_loss,
    native_bfloat16_matmul,
    resolve_matmul_dtype,
)
from hstu.ops.losses.sampled import (
    SharedRows,
    negative_vectors,
    sampled_softmax_loss,
    sampled_softmax_loss_shared,
    shared_row_scores,
)
from hstu.ops.losses.strategies import LossInputs, LossOutput

__all__ = [
    "MATMUL_DTYPES",
    "HistoryWindow",
    "LossInputs",
    "LossOutput",
    "SharedRows",
    "full_corpus_loss",
    "full_softmax_loss",
    "native_bfloat16_matmul",
    "negative_vectors",
    "resolve_matmul_dtype",
    "sampled_softmax_loss",
    "sampled_softmax_loss_shared",
    "shared_row_scores",
]
