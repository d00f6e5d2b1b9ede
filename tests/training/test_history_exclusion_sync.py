"""RetrievalArgs.exclude_history_from_loss in trainer steps under the sync audit: the history
window is sized on the host (no list of pairs, no size read from the device), so a full-corpus
step with it on makes no host sync that is not named."""

from __future__ import annotations

import torch

from hstu.sync_audit import allowed_sync, sync_audit
from tests.dist_utils import run_multiprocess
from tests.training.test_sync_audit import KNOWN_REASONS, TORCH_OPTIM_STEP


def _steps_under_audit(rank: int, world_size: int, tmp: str, steps: int, params: list[str]) -> None:
    from hstu.training.pipeline import build_pipeline
    from tests.training.test_distributed import _trainer

    trainer, env = _trainer("retrieval", tmp, "exclude", params)
    try:
        assert trainer.model.dense_module.exclude_history_from_loss
        pipeline = build_pipeline("none", trainer.model, trainer.optimizer, env.device)
        trainer.model.train()
        batches = [b for _, b in zip(range(steps), trainer.built.train_loader)]
        assert len(batches) == steps
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
    finally:
        trainer.close()


def test_full_corpus_steps_with_history_exclusion_do_not_sync(tmp_path):
    params = [
        'RetrievalArgs.negative_sampling="full_corpus"', "RetrievalArgs.num_negatives=-1",
        "RetrievalArgs.exclude_history_from_loss=True",
        'RetrievalArgs.full_corpus_matmul_dtype="float32"',
    ]
    run_multiprocess(_steps_under_audit, world_size=1, tmp=str(tmp_path), steps=3, params=params)


def test_bfloat16_loss_with_history_exclusion_does_not_sync(tmp_path):
    params = [
        'RetrievalArgs.negative_sampling="full_corpus"', "RetrievalArgs.num_negatives=-1",
        "RetrievalArgs.exclude_history_from_loss=True",
        'RetrievalArgs.full_corpus_matmul_dtype="bfloat16"',
    ]
    run_multiprocess(_steps_under_audit, world_size=1, tmp=str(tmp_path), steps=2, params=params)
