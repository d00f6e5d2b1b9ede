"""A preemption (SIGTERM/SIGUSR1) that lands on a periodic save step: the step's checkpoint
is gathered and written once, then the run stops."""

from __future__ import annotations

import json
import os
import signal

from tests.dist_utils import run_multiprocess
from tests.training.helpers import debug_trainer


def _body(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training import checkpoint as ckpt

    trainer = debug_trainer("retrieval", tmp, os.path.join(tmp, "run"), [
        "TrainerArgs.max_train_iters=8", "TrainerArgs.log_interval=1",
        "TrainerArgs.eval_interval=1000", "TrainerArgs.max_eval_iters=1",
        "TrainerArgs.ckpt_save_interval=2",
        f'TrainerArgs.ckpt_save_dir="{os.path.join(tmp, "ckpt")}"',
    ])
    lines: list[str] = []
    calls = {"state": [], "write": []}
    manager = trainer.checkpoint
    real_state, real_write = manager.state, ckpt.save_checkpoint

    def state(step):
        calls["state"].append(step)
        return real_state(step)

    def write(root, step, *a, **k):
        calls["write"].append(step)
        return real_write(root, step, *a, **k)

    def log(message):
        lines.append(message)

    real_step = trainer.train_step

    def train_step(batches):
        loss = real_step(batches)
        if trainer.step == 4:  # the signal arrives during the step before a save boundary
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    manager.state, ckpt.save_checkpoint, manager.log = state, write, log
    trainer.train_step = train_step
    try:
        trainer.train()
    finally:
        ckpt.save_checkpoint = real_write
        trainer.close()
    with open(os.path.join(tmp, "result.json"), "w") as fh:
        json.dump({"calls": calls, "step": trainer.step, "interrupted": trainer.interrupted,
                   "lines": lines}, fh)


def test_a_preemption_on_a_save_step_saves_once(tmp_path):
    run_multiprocess(_body, world_size=1, tmp=str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["interrupted"] and result["step"] == 4
    # step 2: the periodic save; step 4: the periodic save, which the stop reuses
    assert result["calls"] == {"state": [2, 4], "write": [2, 4]}, result
    saved = [line for line in result["lines"] if "checkpoint saved" in line]
    assert len(saved) == 2 and "step 4" in saved[1], saved
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter_2", "iter_4", "latest"]
