"""A preemption (SIGTERM/SIGUSR1) that lands on a periodic save step: the step's checkpoint
is gathered and written once, then the run stops."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.dist_utils import run_multiprocess

ROOT = Path(__file__).resolve().parents[2]


def _body(rank: int, world_size: int, tmp: str) -> None:
    import gin

    from hstu.config import load_config
    from hstu.training import checkpoint as ckpt
    from hstu.training.distributed import init_distributed, set_seed
    from hstu.training.trainer import Trainer

    gin.clear_config()
    cfg = load_config(str(ROOT / "configs" / "debug_retrieval.gin"), [
        f'DatasetArgs.dataset_path="{os.path.join(tmp, "data", "synthetic")}"',
        "TrainerArgs.max_train_iters=8", "TrainerArgs.log_interval=1",
        "TrainerArgs.eval_interval=1000", "TrainerArgs.max_eval_iters=1",
        "TrainerArgs.ckpt_save_interval=2",
        f'TrainerArgs.ckpt_save_dir="{os.path.join(tmp, "ckpt")}"',
    ], task="retrieval")
    env = init_distributed(1)
    set_seed(cfg.trainer.seed)
    lines: list[str] = []
    trainer = Trainer(cfg, env, os.path.join(tmp, "run"), "")
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
