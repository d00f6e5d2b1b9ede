"""No host synchronisation inside a training step (hstu.sync_audit, the CPU guard for CUDA).

The detector itself on single ops, and the reasons a trainer step may name (``KNOWN_REASONS``:
the syncs that remain, docs/kernels.md "Host syncs that remain"); the trainer-level steps
under the audit are tests/training/test_sync_matrix.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from hstu.embeddings.dynamic import HOST_REMAP
from hstu.ops import MAX_SEQLEN_CHECK
from hstu.ops.gather import HOST_COUNTS
from hstu.ops.losses.common import CPU_ONLY
from hstu.ops.softmax_attention import CHUNK_PLAN_SYNC
from hstu.sync_audit import (
    KNOWN_HOST_READS,
    TORCH_OPTIM_STEP,
    HostSyncError,
    allowed_sync,
    sync_audit,
)
from hstu.training.optimizer import FUSED_ADAM_SKIP

PLAN_FROM_LENGTHS = "pytorch attention backend: chunk plan from the lengths, once per batch"

# Every allowed_sync reason a trainer step may name, with the call sites (SyncEvent.site:
# file, function and source line) each may sync at: a reason covers these calls, not its
# whole block (docs/kernels.md "Host syncs that remain").
def _at(function: str, *lines: str) -> frozenset[str]:
    """The sites of one function ('file in function') at each of its source ``lines``."""
    return frozenset(f"{function}: {line}" for line in lines)


_DYNAMIC = "hstu/embeddings/dynamic.py in "
KNOWN_SITES: dict[str, frozenset[str]] = {
    MAX_SEQLEN_CHECK: _at("hstu/ops/__init__.py in hstu_attention",
                          "longest = int((offsets[1:] - offsets[:-1]).max())"),
    PLAN_FROM_LENGTHS: _at(
        "hstu/ops/pytorch_attention.py in _build_plan",
        "host_lengths = lengths.tolist()",
        "ctx_counts = None if num_contextual is None else num_contextual.tolist()",
        "target_counts = None if num_targets is None else num_targets.tolist()",
    ) | _at("hstu/ops/pytorch_attention.py in _band_blocks",
            "for c in seen[r0:r1].any(dim=0).nonzero().view(-1).tolist():"),
    CPU_ONLY: _at("hstu/ops/losses/sampled.py in forward", "any_empty = bool(empty.any())")
    | _at("hstu/ops/losses/strategies.py in uniform",
          "fused = bool((x.key_ids[1:] > x.key_ids[:-1]).all())")
    | _at("hstu/ops/losses/full_corpus.py in _mask_pairs_", "host_ends = lengths.cumsum(0).tolist()"),
    CHUNK_PLAN_SYNC: _at("hstu/ops/softmax_attention.py in plan_causal_chunks",
                         "host_offsets = offsets.tolist()"),
    HOST_COUNTS: _at("hstu/ops/gather.py in wait",
                     "self._counts = [int(p[0]) for p in self._parts]"),
    # the dense optimizer's step, named by the matrix around optimizer.dense.step
    TORCH_OPTIM_STEP: _at("tests/training/test_sync_matrix.py in step_naming_its_syncs",
                          "return dense_step(*args, **kwargs)"),
    FUSED_ADAM_SKIP: _at("hstu/training/optimizer.py in restore", "skipped = bool(skip)"),
    # the dynamic tables' input stage: host ids and host state, each read listed
    HOST_REMAP: _at("hstu/embeddings/collection.py in _remap_on_host",
                    "if not bool(found.all()):", "values = device_values.cpu()")
    | _at(_DYNAMIC + "forward",
          "local, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)")
    | _at(_DYNAMIC + "_gather_unique",
          "max_size = int(torch.stack(sizes).max())",
          "all_ids = torch.cat([g[0, : int(s)] for g, s in zip(gathered, sizes)])",
          "all_counts = torch.cat([g[1, : int(s)] for g, s in zip(gathered, sizes)])",
          "uniq, inverse = torch.unique(all_ids, return_inverse=True)")
    | _at(_DYNAMIC + "_admit",
          "step = int(self.step) + 1",
          "hit = slots[found]",
          "self.access_count[hit] += counts[found]",
          "new_ids, new_counts = uniq[~found], counts[~found]  # sorted",
          "free = torch.nonzero(~self.occupied, as_tuple=False).flatten()[:num_new]",
          "slots[~found if held is None else held & ~found] = new_slots",
          # admission (admit_min_count): which new ids reach the count
          "if admitted is not None and not bool(admitted.all()):",
          "held[~found] = admitted",
          "new_ids, new_counts = new_ids[admitted], new_counts[admitted]",
          "slots[~held] = self.miss_slot",
          "self._index_update(new_ids, new_slots)")
    # the id index's two levels (host arrays): stale entries dropped by a mask
    | _at(_DYNAMIC + "_index_update", "recent, recent_slots = recent[stay], recent_slots[stay]")
    | _at(_DYNAMIC + "_compact",
          "recent, recent_slots = recent[held], recent_slots[held]",
          "keep[at[twice]] = False",
          "self._sorted_ids, self._sorted_slots = _merge(main[keep], main_slots[keep], recent,")
    | _at(_DYNAMIC + "_count_new", "waiting = int(new_counts[~admitted].sum())")
    | _at(_DYNAMIC + "forward", "if held is None or bool(held.all()):")
    | _at("hstu/embeddings/admission.py in add", "if int(self.occurrences) >= self.width:")
    | _at(_DYNAMIC + "_live_start", "return int(torch.searchsorted(self._sorted_ids, bound)[0])")
    | _at(_DYNAMIC + "_log_append", "live_slots, live_steps = live_slots[keep], live_steps[keep]")
    | _at(_DYNAMIC + "draw_live",
          "torch.tensor(seed, dtype=torch.int64) ^ _splitmix64(self.step.clone().cpu())")
    | _at("hstu/embeddings/rows.py in _write_local",
          "any_inside = inside[first]",
          "target_first = torch.where(any_inside, local_rows[first], 0)",
          "fill = torch.where(any_inside, values[first], local[0])  # one row"),
}
# ...and the library reads KNOWN_HOST_READS names (each scoped to its library line)
KNOWN_REASONS = {*KNOWN_SITES, *(why for _, _, why in KNOWN_HOST_READS)}


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


def _block_with_syncs(x: torch.Tensor, another: bool) -> int:
    with allowed_sync("a test's reason"):
        n = int(x.sum())
        if another:
            n += int(x.max())  # a sync added to the block later
    return n


LISTED = "tests/training/test_sync_audit.py in _block_with_syncs: n = int(x.sum())"


def test_a_reason_covers_its_listed_calls_not_its_block():
    """With a per-reason allow-list of sites, the block's listed call is named and a second
    sync in the same block is not."""
    x = torch.arange(10.0)
    sites = {"a test's reason": {LISTED}}
    with sync_audit(sites=sites) as audit:
        _block_with_syncs(x, another=False)
    assert [(e.reason, e.site) for e in audit.events] == [("a test's reason", LISTED)]
    added = re.escape("in _block_with_syncs: n += int(x.max())")
    inside = re.escape("""inside allowed_sync("a test's reason") but not one of the sites""")
    with pytest.raises(HostSyncError, match=f"{inside}.*{added}"), sync_audit(sites=sites):
        _block_with_syncs(x, another=True)
    with sync_audit(raise_on_sync=False, sites=sites) as audit:  # recorded as unnamed
        _block_with_syncs(x, another=True)
    assert [(e.reason, e.unlisted) for e in audit.events] == [
        ("a test's reason", None), (None, "a test's reason")]


def test_every_listed_site_is_in_the_code():
    """KNOWN_SITES cannot keep a site that no longer exists: each names a function of its file
    and a line of that file."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for reason, sites in KNOWN_SITES.items():
        assert sites, reason
        for site in sites:
            path, function, line = re.fullmatch(r"(\S+) in (\w+): (.+)", site).groups()
            with open(os.path.join(root, path)) as fh:
                text = fh.read()
            assert re.search(rf"def {function}\(", text), site
            assert line in {ln.strip() for ln in text.splitlines()}, site


# Trainer-level steps under the audit, for every switch that changes the step:
# tests/training/test_sync_matrix.py.
