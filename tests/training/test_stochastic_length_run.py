"""A debug training run with stochastic length on: it trains (finite losses) and its losses
differ from the same run without it (the shortened histories reach the model)."""

from __future__ import annotations

import math
import os

import torch

from tests.dist_utils import run_multiprocess
from tests.training.helpers import debug_trainer


def _body(rank: int, world_size: int, tmp: str) -> None:
    out = {}
    for tag, params in (("off", []), ("on", ["DatasetArgs.stochastic_length_alpha=1.2",
                                            'DatasetArgs.stochastic_length_sampling="uniform"'])):
        trainer = debug_trainer("retrieval", tmp, os.path.join(tmp, tag), [
            "TrainerArgs.max_train_iters=4", "TrainerArgs.log_interval=1",
            "TrainerArgs.eval_interval=1000", "TrainerArgs.max_eval_iters=1", *params,
        ])
        try:
            trainer.train()
            out[tag] = list(trainer.losses)
        finally:
            trainer.close()
    torch.save(out, os.path.join(tmp, "losses.pt"))


def test_debug_run_with_stochastic_length_trains_and_differs(tmp_path):
    run_multiprocess(_body, world_size=1, tmp=str(tmp_path))
    losses = torch.load(tmp_path / "losses.pt")
    off, on = losses["off"], losses["on"]
    assert len(on) == len(off) == 4
    assert all(math.isfinite(v) for v in on)
    # step 1 already differs: same initial weights and batch order, shortened histories
    assert on[0] != off[0]
