"""One run: process groups, build, train, clean up (also on failure)."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import gin
import torch.distributed as dist

from hstu.args import ConfigError
from hstu.config import RunConfig
from hstu.console import fail
from hstu.data.errors import DataError
from hstu.training.checkpoint import CheckpointError
from hstu.training.distributed import (
    broadcast_object,
    destroy_distributed,
    init_distributed,
    set_seed,
)
from hstu.training.logger import make_run_dir

if TYPE_CHECKING:
    from hstu.training.trainer import Trainer

T = TypeVar("T")


def _shared_run_dir(cfg: RunConfig, rank: int) -> str:
    """Rank 0 picks the directory (timestamped by default; an online run's is named after its
    stream, so that the same command on the same stream resumes and another stream starts
    fresh) and tells the others."""
    from hstu.training.online import online_enabled, stream_run_dir

    run_dir = cfg.trainer.run_dir
    if rank == 0 and not run_dir and online_enabled(cfg):
        run_dir = stream_run_dir(cfg)
    return broadcast_object(make_run_dir(run_dir, cfg.task) if rank == 0 else None)


EXIT_CHECKPOINT = 3
EXIT_NON_FINITE = 4
_PEER_LOST = (
    "Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused"
)


def _lost_peer(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (RuntimeError, dist.DistError)) and any(m in text for m in _PEER_LOST)


def run(cfg: RunConfig, evaluate_only: bool = False) -> int:
    from hstu.training.online import OnlineTrainer, online_enabled
    from hstu.training.trainer import Trainer

    env = init_distributed(cfg.tp.tensor_model_parallel_size)
    trainer = None
    try:
        set_seed(cfg.trainer.seed)
        run_dir = _shared_run_dir(cfg, env.rank)
        config_text = gin.operative_config_str()
        if online_enabled(cfg):  # a stream is bound: test then train, window by window
            if evaluate_only:
                raise ConfigError("StreamArgs", None, "--evaluate scores a checkpoint on a "
                                  "dataset's splits; an online run tests each window as it "
                                  "trains (docs/online.md)")
            trainer = OnlineTrainer(cfg, env, run_dir, config_text)
        else:
            trainer = Trainer(cfg, env, run_dir, config_text, evaluate_only=evaluate_only)
        if evaluate_only:
            trainer.evaluate_checkpoint()
            if env.is_main:
                print(f"[hstu] outputs in {run_dir}", flush=True)
            return 0
        metrics = trainer.train()
        if trainer.interrupted:
            return 143  # 128 + SIGTERM: stopped early, state saved
        if env.is_main:
            if metrics:  # none when a finished run is resumed (the trainer said so)
                text = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                print(f"[hstu] final {cfg.task} metrics: {text}", flush=True)
            print(f"[hstu] outputs in {run_dir}", flush=True)
        return 0
    except (ConfigError, DataError) as exc:
        # bad input found once the data is open: one line, no traceback (last under torchrun)
        return fail(str(exc))
    except CheckpointError as exc:  # the same on every rank (agreed)
        return fail(str(exc), EXIT_CHECKPOINT)
    except FloatingPointError as exc:  # agreed at the flush / before a save
        return fail(
            f"{exc}; training stopped there and no checkpoint after it was written "
            "(lower OptimizerArgs.learning_rate, set clip_grad_norm, or resume from an earlier "
            "checkpoint)",
            EXIT_NON_FINITE,
        )
    except Exception as exc:  # noqa: BLE001
        if _lost_peer(exc):
            # another rank died (killed, OOM, its own error above): one line, not a traceback
            text = " ".join(str(exc).split())[:200]
            print(
                f"error: rank {env.rank}: lost contact with another rank ({text}); "
                "resume with TrainerArgs.ckpt_load_dir=\"auto\" or relaunch with torchrun "
                "--max-restarts",
                file=sys.stderr,
                flush=True,
            )
            return 1
        print(
            f"[hstu] rank {env.rank} failed:\n{traceback.format_exc()}", file=sys.stderr,
            flush=True,
        )
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        # the trainer holds the model and with it the process groups: drop it first so that
        # destroy_distributed really frees the groups (and joins gloo's worker threads)
        # before interpreter exit, see its docstring
        trainer = None
        destroy_distributed()


def with_trainer(cfg: RunConfig, run_dir: str, body: Callable[[Trainer], T]) -> T:
    """``body`` given a seeded Trainer on this process's ranks, for tools (benchmarks,
    checks); afterwards, also on failure, the trainer is closed and dropped and then the
    process groups torn down (see :func:`run`)."""
    from hstu.training.trainer import Trainer

    env = init_distributed(cfg.tp.tensor_model_parallel_size)
    trainer = None
    try:
        set_seed(cfg.trainer.seed)
        trainer = Trainer(cfg, env, run_dir, "")
        return body(trainer)
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None
        destroy_distributed()
