"""Retrieval with sampled negatives on bare item tokens (no contextual features, no action
tokens): the item lookup then reaches the loss still un-awaited (TorchRec's LazyAwaitable),
whose `in` raised KeyError: 0 at the first step."""

from __future__ import annotations

import math
import os

import torch

from tests.dist_utils import run_multiprocess
from tests.training.helpers import debug_trainer


def _body(rank: int, world_size: int, tmp: str) -> None:
    trainer = debug_trainer("retrieval", tmp, os.path.join(tmp, "run"), [
        "DatasetArgs.contextual_features=[]", "DatasetArgs.action_tokens=False",
        'RetrievalArgs.negative_sampling="uniform"', "RetrievalArgs.num_negatives=16",
        "TrainerArgs.max_train_iters=2", "TrainerArgs.log_interval=1",
        "TrainerArgs.eval_interval=1000", "TrainerArgs.max_eval_iters=1",
    ])
    try:
        trainer.train()
        torch.save(list(trainer.losses), os.path.join(tmp, "losses.pt"))
    finally:
        trainer.close()


def test_uniform_negatives_without_contextual_or_action_tokens_train(tmp_path):
    run_multiprocess(_body, world_size=1, tmp=str(tmp_path))
    losses = torch.load(tmp_path / "losses.pt")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
