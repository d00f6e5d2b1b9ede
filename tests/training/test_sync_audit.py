"""No host synchronisation inside a training step (hstu.sync_audit, the CPU guard for CUDA).

The detector itself on single ops, and the reasons a trainer step may name (``KNOWN_REASONS``:
the syncs that remain, docs/kernels.md "Host syncs that remain"); the trainer-level steps
under the audit are tests/training/test_sync_matrix.py.
"""

from __future__ import annotations

import pytest
import torch

from hstu.embeddings.dynamic import HOST_REMAP
from hstu.ops import MAX_SEQLEN_CHECK
from hstu.ops.gather import HOST_COUNTS
from hstu.sync_audit import (
    KNOWN_HOST_READS,
    HostSyncError,
    allowed_sync,
    sync_audit,
)

# Every allowed sync a debug step may meet (docs/kernels.md "No host sync in a step").
KNOWN_REASONS = {
    MAX_SEQLEN_CHECK,
    "pytorch attention backend: chunk plan from the lengths, once per batch",
    "RowSparseOptimizer's step count lives on the host",
    "a CPU-only kernel: the host reads its own memory, no device to wait for",
    HOST_COUNTS,
    HOST_REMAP,
    *(why for _, _, why in KNOWN_HOST_READS),
}


# ------------------------------------------------------------------------- the detector


@pytest.mark.parametrize(
    "name, fn",
    [
        ("item", lambda x, n: x.sum().item()),
        ("int", lambda x, n: int(n[0])),
        ("bool", lambda x, n: bool((x > 0).all())),
        ("nonzero", lambda x, n: (x > 3).nonzero()),
        ("mask index", lambda x, n: x[x > 3]),
        ("mask assignment", lambda x, n: x.clone().__setitem__(x > 3, 0.0)),
        ("repeat_interleave", lambda x, n: torch.repeat_interleave(torch.arange(2), n)),
        ("tolist", lambda x, n: n.tolist()),
        ("unique", lambda x, n: torch.unique(n)),
        ("bincount", lambda x, n: torch.bincount(n, minlength=8)),
        ("equal", lambda x, n: torch.equal(n, n)),
        ("one-argument where", lambda x, n: torch.where(x > 2)),
        ("mask in backward", lambda x, n: _masked_backward(x)),
    ],
)
def test_audit_raises_on_syncs(name, fn):
    x, n = torch.arange(10.0), torch.tensor([2, 3])
    with pytest.raises(HostSyncError, match="host sync on CUDA.*test_sync_audit.py"), sync_audit():
        fn(x, n)


def _masked_backward(x: torch.Tensor) -> None:
    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * (grad > 0).nonzero().numel()

    Masked.apply(x.clone().requires_grad_()).sum().backward()


def test_audit_passes_sized_ops_and_names_allowed_syncs():
    x, n = torch.arange(10.0), torch.tensor([2, 3])
    with sync_audit() as audit:
        torch.repeat_interleave(torch.arange(2), n, output_size=5)
        x[n]
        x.index_put((n,), torch.zeros(2))
        torch.histc(x, 4, 0, 10)
        with allowed_sync("a test's reason"):
            x.sum().item()
    assert [(e.op, e.reason) for e in audit.events] == [
        ("aten._local_scalar_dense.default", "a test's reason")
    ]
    assert x.tolist()  # the Python-level patch is gone with the audit


# Trainer-level steps under the audit, for every switch that changes the step:
# tests/training/test_sync_matrix.py.
