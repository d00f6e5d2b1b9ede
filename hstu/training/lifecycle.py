"""The checkpoint lifecycle of a run: resume, save, verify, prune, best.

- Start: stale ``iter_<n>.tmp`` folders (saves cut short by a kill) are removed, and so is an
  ``iter_<n>.old`` whose replacement is complete.
- Resume (``TrainerArgs.ckpt_load_dir``): ``""`` starts fresh; ``"auto"`` takes the newest
  complete checkpoint under ``ckpt_save_dir`` whose files match their manifest (a damaged one
  is reported and the next older one tried) and starts fresh when there is none; a path names
  a checkpoint folder, or a root whose newest complete checkpoint is taken. A checkpoint that
  needs others (online training's deltas: its manifest's ``needs``) counts as complete only
  with every one of them whole: "auto" skips it otherwise, a named one is refused in one
  line naming the link.
- Save: never a checkpoint with non-finite weights; the same step twice in one process is
  saved once; files, manifest and folders are fsynced before the rename
  (:mod:`hstu.training.checkpoint`); then all but the newest ``keep_last_n`` are pruned, and
  never a checkpoint that a kept one needs.
- Best: :class:`BestTracker` keeps the best validation value, its step and the evaluations
  since, saved in every checkpoint's meta and restored with it; its checkpoint lives in its
  own root (one kept).

All methods are collective (every rank calls them in the same order).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from hstu.model.metrics import STDERR_PREFIX
from hstu.training import checkpoint as ckpt
from hstu.training.checkpoint import CheckpointError, CheckpointState, RankPlace
from hstu.training.distributed import barrier, broadcast_object, rank_and_world

AUTO = "auto"


def _is_main() -> bool:
    return rank_and_world()[0] == 0


def first_non_finite(states: dict[str, Any]) -> str | None:
    """Name of the first state (by top-level key) holding a NaN or an infinity on any rank."""
    names = sorted(states)
    bad = torch.tensor([
        float(any(t.is_floating_point() and not torch.isfinite(t).all()
                  for t in ckpt.state_tensors(states[name])))
        for name in names
    ], dtype=torch.float32)
    if rank_and_world()[1] > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return next((name for name, b in zip(names, bad.tolist()) if b > 0), None)


@dataclass
class BestTracker:
    """The best validation value so far (higher is better) and early-stopping patience.

    With ``loss_limit`` (ranking: the label prior's validation loss), only an evaluation whose
    ``loss`` is below it may become the best; the others are counted in ``ineligible``. Until
    one is eligible, the selection is the evaluation with the lowest loss (``fallback`` true,
    ``value`` its metric): a run where none ever is ends with that one, and says so."""

    metric: str | None = None
    patience: int | None = None
    loss_limit: float | None = None
    tolerance: float = 0.0
    """TrainerArgs.best_within_stderr: a later eligible evaluation whose value is within this
    many standard errors (the peak evaluation's) of the highest eligible value so far becomes
    the selection too; 0 selects only a new highest value."""
    value: float = -math.inf
    step: int = -1
    evals_since_best: int = 0
    ineligible: int = 0
    fallback: bool = False
    fallback_loss: float = math.inf
    top_value: float = -math.inf
    """The highest value of any evaluation, eligible or not (the summary says where it was
    and, when it was not selected, why)."""
    top_step: int = -1
    top_loss: float = math.nan
    """That evaluation's loss (NaN where the metrics have none)."""
    peak_value: float = -math.inf
    """The highest value of an eligible evaluation (the selection's is within ``tolerance``
    standard errors of it), its step and its standard error."""
    peak_step: int = -1
    peak_stderr: float = math.nan

    def update(self, metrics: dict[str, float], step: int) -> tuple[bool, bool]:
        """(is a new selection, stop early now). Patience counts the evaluations since the
        last new selection (the lowest-loss fallback ones included; with a tolerance, those
        within it of the peak).

        With a tolerance the selection is the latest eligible evaluation within it of the
        peak at its time; the peak only rises by an evaluation that is then selected itself,
        so the selection is always within the tolerance of the final peak (the
        one-standard-error rule of model selection, evaluated as training goes)."""
        value = metrics[self.metric]
        if value > self.top_value:
            self.top_value, self.top_step = value, step
            self.top_loss = float(metrics.get("loss", math.nan))
        if self.loss_limit is not None and not metrics["loss"] < self.loss_limit:
            self.ineligible += 1
            loss = metrics["loss"]
            if (self.step < 0 or self.fallback) and loss < self.fallback_loss:
                self.value, self.step, self.evals_since_best = value, step, 0
                self.fallback, self.fallback_loss = True, loss
                return True, False
        else:
            new_peak = value > self.peak_value
            if new_peak:
                self.peak_value, self.peak_step = value, step
                self.peak_stderr = self._stderr(metrics)
            if new_peak or self.fallback or self._within(value):
                self.value, self.step, self.evals_since_best = value, step, 0
                self.fallback = False
                return True, False
        self.evals_since_best += 1
        return False, self.patience is not None and self.evals_since_best >= self.patience

    def _stderr(self, metrics: dict[str, float]) -> float:
        if self.tolerance == 0:
            return math.nan
        key = STDERR_PREFIX + str(self.metric)
        if key not in metrics:
            raise RuntimeError(f"TrainerArgs.best_within_stderr: the evaluation reports no "
                               f"standard error of {self.metric} ({key})")
        return float(metrics[key])

    def _within(self, value: float) -> bool:
        """A tolerance is set and ``value`` is within it of the peak (never with a NaN
        standard error: fewer than two evaluation samples)."""
        return self.tolerance > 0 and value >= self.peak_value - self.tolerance * self.peak_stderr

    @property
    def margin(self) -> float:
        """How far below the peak a selection may be (0 without a tolerance)."""
        return self.tolerance * self.peak_stderr if self.tolerance > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            k: v for k, v in asdict(self).items()
            if k not in ("metric", "patience", "loss_limit", "tolerance")
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, value)
        if state and "peak_value" not in state and not self.fallback and self.step >= 0:
            # a checkpoint written before the peak was tracked: its selection is the peak
            self.peak_value, self.peak_step = self.value, self.step


class CheckpointLifecycle:
    """One checkpoint root: which checkpoint to resume, when to save, what to keep."""

    def __init__(
        self, root: str, keep_last_n: int | None = None, log: Callable[[str], None] = print
    ) -> None:
        self.root = root
        self.keep_last_n = keep_last_n
        self.log = log if _is_main() else (lambda _msg: None)
        self.last_saved: tuple[int, str] | None = None
        self.pinned: set[str] = set()
        """Checkpoint folders pruning keeps besides the newest (online training: those of
        the serving versions scored, whose weights a resume loads again)."""

    # ---------------------------------------------------------------------- start
    def clean_stale(self) -> list[str]:
        """Removes ``.tmp`` folders and ``.old`` ones whose replacement is complete."""
        removed: list[str] = []
        if _is_main() and os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                path = os.path.join(self.root, name)
                stale = name.endswith(".tmp") and os.path.isdir(path)
                if name.endswith(".old"):
                    if not os.path.exists(path[:-4]):  # killed between a same-step save's renames
                        os.replace(path, path[:-4])
                        self.log(
                            f"[hstu] restored {path[:-4]} (a save of the same step was cut short)"
                        )
                        continue
                    stale = ckpt.check_files(path[:-4], checksums=False) is None
                if stale:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(name)
            if removed:
                self.log(
                    f"[hstu] removed unfinished checkpoint folders in {self.root}: "
                    f"{', '.join(removed)}"
                )
        barrier()
        return removed

    def resolve(self, load_dir: str) -> str | None:
        """The checkpoint to resume from (see the module docstring), or None to start fresh."""
        if not load_dir:
            return None
        if load_dir == AUTO:
            return self._newest_verified(self.root, required=False)
        if ckpt.is_checkpoint_dir(load_dir):
            problem = None
            if _is_main():
                problem = ckpt.chain_problem(load_dir, checksums=False)
            problem = broadcast_object(problem)
            if problem is not None:
                raise CheckpointError(f"TrainerArgs.ckpt_load_dir={load_dir!r}: {problem}")
            for link in ckpt.needed(load_dir):
                ckpt.verify(link)
            return load_dir
        return self._newest_verified(load_dir, required=True)

    def _newest_verified(self, root: str, required: bool) -> str | None:
        candidates: list[str] = []
        if _is_main():
            candidates = [p for p in ckpt.checkpoint_folders(root) if ckpt.is_checkpoint_dir(p)]
        for path in broadcast_object(candidates):
            try:
                ckpt.verify(path)
                problem = ckpt.chain_problem(path, checksums=False) if _is_main() else None
                problem = broadcast_object(problem)
                if problem is not None:
                    raise CheckpointError(problem)
                for link in ckpt.needed(path):
                    ckpt.verify(link)
                return path
            except CheckpointError as exc:
                self.log(f"[hstu] skipping a damaged checkpoint: {exc}")
        if required:
            raise CheckpointError(
                f"TrainerArgs.ckpt_load_dir={root!r}: no complete checkpoint there; "
                f'use "{AUTO}" to start fresh when there is none'
            )
        return None

    # ----------------------------------------------------------------------- save
    def save(self, step: int, state: CheckpointState, place: RankPlace) -> str:
        """Writes ``iter_<step>`` (once per step and process), then prunes. Raises
        FloatingPointError (nothing written) if any weight or optimizer state is not finite."""
        done = self.saved_at(step)
        if done is not None:
            return done
        bad = first_non_finite({"dense": state.dense, "embeddings": state.sharded})
        if bad is not None:
            latest = ""
            if self.last_saved:
                latest = f"; the latest checkpoint is still {self.last_saved[1]}"
            raise FloatingPointError(
                f"step {step}: the {bad} weights or optimizer state are not finite: "
                f"checkpoint not written{latest}"
            )
        path = ckpt.save_checkpoint(self.root, step, state, place)
        self.last_saved = (step, path)
        self.prune()
        return path

    def saved_at(self, step: int) -> str | None:
        """The path this process last saved (or resumed from) under this root when it is
        ``step``'s, else None: saving ``step`` again would write the same state."""
        if self.last_saved is not None and self.last_saved[0] == step:
            return self.last_saved[1]
        return None

    def mark_saved(self, step: int, path: str) -> None:
        """A resume from ``path`` under this root: saving that step again is not needed."""
        if os.path.realpath(os.path.dirname(path)) == os.path.realpath(self.root):
            self.last_saved = (step, path)

    def prune(self) -> None:
        """Removes all but the newest ``keep_last_n`` complete checkpoints (never the latest,
        never a ``pinned`` one nor one a live process holds with
        :func:`hstu.training.checkpoint.pin`), and never a checkpoint that a kept one needs (its
        manifest's ``needs``: a delta's base and the deltas before it)."""
        if self.keep_last_n is not None and _is_main() and os.path.isdir(self.root):
            complete = []
            for name in os.listdir(self.root):
                step = ckpt.step_of(name)
                path = os.path.join(self.root, name)
                if step is not None and ckpt.manifest_of(path) is not None:
                    complete.append((step, path))
            complete.sort(reverse=True)
            kept = [p for _, p in complete[: self.keep_last_n]] + sorted(self.pinned)
            kept += ckpt.pinned_folders(self.root)  # a publisher exporting one
            if self.last_saved is not None:
                kept.append(self.last_saved[1])
            keep = {os.path.realpath(p) for p in kept}
            keep.update(os.path.realpath(link) for p in kept for link in ckpt.needed(p))
            for _, path in complete:
                if os.path.realpath(path) not in keep:
                    shutil.rmtree(path, ignore_errors=True)
            ckpt.fsync_dir(self.root)
        barrier()
