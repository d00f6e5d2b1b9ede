"""Runs an entry script and SIGKILLs this process at a chosen point of online training: the
kill points of tests/training/test_online.py, placed inside the real code path by wrapping one
function (nothing of the trainer is replaced; the kill is a real SIGKILL).

    python tests/training/kill_at.py pretrain_gr_retrieval.py --gin-config-file ...   (or under torchrun)

``HSTU_KILL_AT="<point>:<n>[:<rank>]"`` (rank: only that rank dies; default every rank):

- ``train_step:n``   before the n-th call of Trainer.train_step (mid-window; a window takes
                     its steps and one more call that finds it done)
- ``evaluate:n``     before the n-th window's evaluation (a window read, nothing done with it)
- ``append:n``       after the n-th window was appended to the user store (between windows)
- ``store_save:n``   after the n-th user-store snapshot was written into a checkpoint being
                     saved (mid-save: tables and dense state written, not yet published)
- ``delta_save:n``   after the n-th user-store delta was written into a checkpoint being
                     saved (mid-save of a delta checkpoint, StreamArgs.full_checkpoint_every)
- ``publish:n``      before the n-th checkpoint folder is renamed into place (mid-save: every
                     file written and fsynced)
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(owner: object, name: str, n: int, after: bool, when=None) -> None:
    original = getattr(owner, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        if when is not None and not when(*args, **kwargs):
            return original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n and not after:
            _die()
        out = original(*args, **kwargs)
        if calls[0] == n and after:
            _die()
        return out

    setattr(owner, name, wrapped)


def main() -> None:
    spec = os.environ.get("HSTU_KILL_AT", "")
    parts = spec.split(":")
    point, n = parts[0], int(parts[1])
    rank = int(parts[2]) if len(parts) > 2 else None
    if rank is None or rank == int(os.environ.get("RANK", "0")):
        from hstu.data.user_store import UserStore
        from hstu.training.online import OnlineTrainer
        from hstu.training.trainer import Trainer

        if point == "train_step":
            _arm(Trainer, "train_step", n, after=False)
        elif point == "evaluate":
            _arm(OnlineTrainer, "evaluate_window", n, after=False)
        elif point == "append":
            _arm(UserStore, "append", n, after=True)
        elif point == "store_save":
            _arm(UserStore, "checkpoint", n, after=True)
        elif point == "delta_save":
            _arm(UserStore, "checkpoint_delta", n, after=True)
        elif point == "publish":
            _arm(os, "replace", n, after=False,
                 when=lambda src, dst, *a, **k: os.path.basename(os.fspath(src)).startswith("iter_")
                 and os.fspath(src).endswith(".tmp"))
        else:
            raise SystemExit(f"HSTU_KILL_AT: unknown point {point!r}")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
