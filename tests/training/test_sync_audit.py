"""No host synchronisation inside a training step (hstu.sync_audit, the CPU guard for CUDA).

The detector itself on single ops, then trainer-level steps of both debug presets (one
process, and TP=2 over two gloo processes) with the audit active around each whole step
(zero_grad, forward, backward, optimizer step): any op that would make the host wait for a
CUDA device fails the test, naming the op and our line; the syncs that remain are named with
their reason (``allowed_sync``) and must be among the known ones below.
"""

from __future__ import annotations

import pytest
import torch

from hstu.embeddings.dynamic import HOST_REMAP
from hstu.model.batch_gather import HOST_COUNTS
from hstu.ops import MAX_SEQLEN_CHECK
from hstu.sync_audit import (
    KNOWN_HOST_READS,
    TORCH_OPTIM_STEP,
    HostSyncError,
    allowed_sync,
    sync_audit,
)
from tests.dist_utils import run_multiprocess

# Every allowed sync a debug step may meet (docs/performance.md "No host sync in a step").
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


# ------------------------------------------------------------------------ trainer steps


def _audited_steps(
    rank: int, world_size: int, tmp: str, task: str, tp: int, steps: int, params: list[str],
) -> None:
    from hstu.training.pipeline import build_pipeline
    from tests.training.test_distributed import _trainer

    tp_params = [f"TensorModelParallelArgs.tensor_model_parallel_size={tp}"] if tp > 1 else []
    trainer, env = _trainer(task, tmp, f"{task}-tp{tp}", [*tp_params, *params])
    try:
        pipeline = build_pipeline("none", trainer.model, trainer.optimizer, env.device)
        trainer.model.train()
        batches = []  # read before the audit: the loader runs on the host, outside the step
        while len(batches) < steps:
            batches += [b for _, b in zip(range(steps - len(batches)), trainer.built.train_loader)]
        dense_step = trainer.optimizer.dense.step

        def step_naming_its_syncs(*args, **kwargs):
            with allowed_sync(TORCH_OPTIM_STEP):
                return dense_step(*args, **kwargs)

        trainer.optimizer.dense.step = step_naming_its_syncs
        feed = iter(batches)
        losses = []
        with sync_audit() as audit:  # raises HostSyncError at the first unnamed sync
            for _ in range(steps):
                losses.append(pipeline.progress(feed)[0])
        assert bool(torch.isfinite(torch.stack(losses)).all())
        reasons = {e.reason for e in audit.allowed} - {TORCH_OPTIM_STEP}
        assert reasons <= KNOWN_REASONS, reasons - KNOWN_REASONS
        if any("negative_sampling" in p for p in params):
            assert any("CPU-only kernel" in r for r in reasons), reasons
        elif task == "retrieval" and world_size > 1:  # the preset's in-batch negatives
            assert HOST_COUNTS in reasons, reasons
    finally:
        trainer.close()


@pytest.mark.parametrize("task", ["retrieval", "ranking"])
def test_debug_preset_steps_do_not_sync(tmp_path, task):
    run_multiprocess(
        _audited_steps, world_size=1, tmp=str(tmp_path), task=task, tp=1, steps=20, params=[]
    )


@pytest.mark.parametrize("task", ["retrieval", "ranking"])
def test_tensor_parallel_steps_do_not_sync(tmp_path, task):
    run_multiprocess(
        _audited_steps, world_size=2, tmp=str(tmp_path), task=task, tp=2, steps=5, params=[]
    )


def test_uniform_negatives_name_their_cpu_only_syncs(tmp_path):
    """Uniform negatives take the fused CPU loss, whose host reads are allowed (CPU only)."""
    params = ['RetrievalArgs.negative_sampling="uniform"', "RetrievalArgs.num_negatives=8"]
    run_multiprocess(
        _audited_steps, world_size=1, tmp=str(tmp_path), task="retrieval", tp=1, steps=3,
        params=params,
    )


def test_float16_loss_scaling_steps_do_not_sync(tmp_path):
    """The float16 scaler (unscale, overflow flag, skip, scale update) and the tables' unscale
    hook stay on the device; clipping on."""
    params = ['NetworkArgs.dtype_str="float16"', "OptimizerArgs.clip_grad_norm=1.0"]
    run_multiprocess(
        _audited_steps, world_size=1, tmp=str(tmp_path), task="ranking", tp=1, steps=3,
        params=params,
    )


def test_query_time_steps_do_not_sync(tmp_path):
    """NetworkArgs.rab_query_time: the batches' query times reach the attention (gathered over
    a TP group of 2) without a host read in the step."""
    params = ["NetworkArgs.relative_attention_bias=True", "DatasetArgs.action_tokens=False",
              "NetworkArgs.rab_query_time=True"]
    run_multiprocess(
        _audited_steps, world_size=2, tmp=str(tmp_path), task="retrieval", tp=2, steps=3,
        params=params,
    )
