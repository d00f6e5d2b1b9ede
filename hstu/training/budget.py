"""``TrainerArgs.time_budget_minutes``: the step count a run can afford, from its own timings.

Decided at the run's first evaluation at least ``MIN_TIMED_STEPS`` steps into training
(at the latest ``PROBE_STEPS`` steps in, where the evaluation interval is longer): by then the
run has timed its start-up, its training steps (the evaluations' time left out, the first
``UNTIMED_STEPS`` too) and an evaluation. The remaining work of a run that ends at step N is
the steps up to N, the evaluations due on the way (every ``eval_interval`` steps and at N) and
the test split (costed as one more evaluation); the largest N whose work fits ``SAFETY`` of
the time left is the new step count, never above the configured one. Each later evaluation
plans again with the pace of the steps since the first evaluation (``StepPace``; of all the
steps timed where fewer than ``RECENT_MIN_STEPS`` ran since): shorter where the plan no longer
fits by more than ``REPLAN_SHORTER`` (a host that slows down, steps that grow dearer), longer
where more than ``REPLAN_LONGER`` of it would fit (the first steps were slower than the run),
never past the configured length; the learning-rate schedule ends at the new plan's last
step. After the last evaluation before the plan's end, every ``GUARD_EVERY`` steps, the run
checks that its plan still ends inside the budget at the pace since that evaluation, and ends
sooner where it would not (a host that slows down where no evaluation is left to plan
again). The budget counts from the process's start (``hstu.STARTED``) when a run comes from
an entry point's command line.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from hstu.training.distributed import rank_and_world

SAFETY = 0.95
"""Share of the time left that the plan may fill (checkpoint saves, timing noise)."""
PROBE_STEPS = 100
"""A run with a time budget evaluates (and decides) no later than this many steps after it
starts (or resumes) training, even when its evaluation interval is longer: a run whose first
evaluation came after its budget was spent could not fit it."""
MIN_TIMED_STEPS = 40
"""... and no sooner than at the first evaluation this many steps in: fewer steps time the
first steps' one-off costs (allocations, caches) more than the run's pace."""
REPLAN_LONGER = 1.05
"""A later evaluation lengthens the plan only when the steps that fit are more than this
times the plan (a plan that moves by noise would move the learning-rate schedule with it)..."""
REPLAN_SHORTER = 0.98
"""... and shortens it only when they are fewer than this times the plan (a plan 2 % too long
still ends inside the budget: the plan fills SAFETY of the time left)."""
UNTIMED_STEPS = 3
"""The first steps after the start are not timed (their one-off costs are in the time spent,
not in the pace)."""
RECENT_MIN_STEPS = 20
"""A later plan takes the pace of the steps since the first evaluation when at least this many
ran (else of every step timed): the steps before it often run 10-30 % slower than the rest of
the run, and a pace averaged over them planned runs that ended a tenth of their budget early
(the pace since the last evaluation alone follows the host's noise: plans that move the
learning-rate schedule back and forth)."""
GUARD_EVERY = 10
"""Once the plan is decided and no evaluation is left before its last step, every this many
steps the run checks that the plan's remaining work still fits the whole budget (not SAFETY of
it) at the pace since the last evaluation, and shortens the plan to fit SAFETY of it where it
does not: a host that slowed 2x after the last evaluation overran a 9-minute budget by 82 s.
Earlier, the evaluations plan again (a check every few steps there followed the noise of 10
steps: it cut a plan by 15 % right after it was made). The check never lengthens a plan."""
GUARD_MIN_STEPS = 10
"""... once at least this many steps ran since the last evaluation (fewer time noise)."""


class StepPace:
    """Seconds a training step, the evaluations' seconds left out, for the budget's plans:
    over every step from ``UNTIMED_STEPS`` after ``step`` (the first plan), or over the steps
    since the first evaluation (later plans, :data:`RECENT_MIN_STEPS`). Times are
    ``time.monotonic()`` readings; ``eval_total`` the evaluations' seconds so far."""

    def __init__(self, step: int, now: float, eval_total: float) -> None:
        self.timed_from = step + UNTIMED_STEPS
        self.start = (step, now, eval_total)
        self.first_eval: tuple[int, float, float] | None = None
        self.last_eval: tuple[int, float, float] | None = None

    def stepped(self, step: int, now: float, eval_total: float) -> None:
        """After each training step: the clock starts UNTIMED_STEPS steps in."""
        if step == self.timed_from:
            self.start = (step, now, eval_total)

    def evaluated(self, step: int, now: float, eval_total: float) -> None:
        """After each evaluation: the first one starts the later plans' clock; each one the
        between-evaluations check's (:meth:`since_evaluation`)."""
        if self.first_eval is None:
            self.first_eval = (step, now, eval_total)
        self.last_eval = (step, now, eval_total)

    def since_evaluation(self, step: int, now: float) -> float | None:
        """Seconds a step since the last evaluation; None before one or with fewer than
        GUARD_MIN_STEPS steps since it."""
        if self.last_eval is None or step - self.last_eval[0] < GUARD_MIN_STEPS:
            return None
        return (now - self.last_eval[1]) / (step - self.last_eval[0])

    def seconds(self, step: int, now: float, eval_total: float, recent: bool) -> float:
        """Seconds a step: since the first evaluation with ``recent`` (when at least
        RECENT_MIN_STEPS ran since), else since the clock started."""
        if recent and self.first_eval is not None and step - self.first_eval[0] >= RECENT_MIN_STEPS:
            since, steps = self.first_eval, step - self.first_eval[0]
        else:
            since, steps = self.start, step - self.timed_from
        return (now - since[1] - (eval_total - since[2])) / max(1, steps)


def run_length(args: Any, steps_per_epoch: int) -> tuple[int, int]:
    """(the step count, the evaluation interval in steps) of TrainerArgs ``args`` on a training
    split of ``steps_per_epoch`` steps: max_train_iters, or max_train_epochs epochs rounded up
    to a whole step, or one epoch; eval_interval_epochs of an epoch rounded to the nearest step
    (at least 1), or eval_interval."""
    if args.max_train_iters is not None:
        total = int(args.max_train_iters)
    elif args.max_train_epochs is not None:
        # (the 1e-9: 0.1 x 30 is 3.0000000000000004 in floats, three steps, not four)
        total = max(1, math.ceil(args.max_train_epochs * steps_per_epoch - 1e-9))
    else:
        total = steps_per_epoch
    interval = int(args.eval_interval)
    if args.eval_interval_epochs is not None:
        interval = max(1, round(args.eval_interval_epochs * steps_per_epoch))
    return total, interval


def length_line(args: Any, steps_per_epoch: int, total: int, interval: int) -> str | None:
    """The line that says what max_train_epochs / eval_interval_epochs came to in steps; None
    when neither is set."""
    parts = []
    if args.max_train_epochs is not None:
        parts.append(f"{args.max_train_epochs:g} epochs = {total} steps")
    if args.eval_interval_epochs is not None:
        parts.append(f"an evaluation every {args.eval_interval_epochs:g} epoch = {interval} steps")
    if not parts:
        return None
    return f"[hstu] run length: {'; '.join(parts)} ({steps_per_epoch} steps an epoch)"


def last_stretch(step: int, end: int, eval_interval: int) -> bool:
    """No evaluation of the interval is due after ``step`` and before the last step ``end``."""
    return (end - 1) // eval_interval <= step // eval_interval


def evaluations_between(step: int, end: int, eval_interval: int) -> int:
    """Evaluations a run evaluating every ``eval_interval`` steps and at its last step ``end``
    runs after ``step``, up to and including ``end``."""
    if end <= step:
        return 0
    on_interval = end // eval_interval - step // eval_interval
    return on_interval + (0 if end % eval_interval == 0 else 1)


def remaining_seconds(*, step: int, end: int, step_s: float, eval_s: float,
                      eval_interval: int) -> float:
    """The work left after ``step`` of a run ending at ``end``: its steps, the evaluations
    due on the way and the test split (costed as one more evaluation)."""
    return (end - step) * step_s + (evaluations_between(step, end, eval_interval) + 1) * eval_s


def affordable_steps(
    *, budget_s: float, elapsed_s: float, step: int, step_s: float, eval_s: float,
    eval_interval: int, max_steps: int,
) -> int:
    """The largest N in [step, max_steps] whose remaining work (steps, evaluations, the test
    split) fits ``SAFETY * budget_s - elapsed_s``; ``step`` when not even one more step does."""
    left = SAFETY * budget_s - elapsed_s

    def cost(end: int) -> float:
        return remaining_seconds(step=step, end=end, step_s=step_s, eval_s=eval_s,
                                 eval_interval=eval_interval)

    if cost(max_steps) <= left:
        return max_steps
    lo, hi = step, max_steps  # cost(lo) fits when cost(step) (the test split) does
    if cost(step) > left:
        return step
    while hi - lo > 1:  # cost is non-decreasing in end
        mid = (lo + hi) // 2
        if cost(mid) <= left:
            lo = mid
        else:
            hi = mid
    return lo


def agree_min(value: int) -> int:
    """The smallest of every rank's ``value`` (each rank timed itself; all must stop together)."""
    if rank_and_world()[1] == 1:
        return value
    # host tensors: the default group reduces them with its host backend (gloo)
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def budget_line(
    *, minutes: float, elapsed_s: float, step: int, step_s: float, eval_s: float,
    chosen: int, configured: int,
) -> str:
    head = (
        f"[hstu] time budget {minutes:g} min: {elapsed_s:.0f} s spent by step {step}, "
        f"{step_s:.3f} s a step, {eval_s:.1f} s an evaluation"
    )
    if chosen >= configured:
        return f"{head}: the configured {configured} steps fit; training to step {configured}"
    return (
        f"{head}: {configured} steps would not fit; training to step {chosen} (the learning-rate "
        f"schedule ends there; TrainerArgs.time_budget_minutes)"
    )


def guard_line(
    *, minutes: float, elapsed_s: float, step: int, step_s: float, chosen: int, planned: int,
) -> str:
    return (
        f"[hstu] time budget {minutes:g} min: {elapsed_s:.0f} s spent by step {step}, "
        f"{step_s:.3f} s a step since the last evaluation: step {planned} would end past the "
        f"budget; training to step {chosen} (the learning-rate schedule ends there)"
    )


def replan_line(
    *, minutes: float, elapsed_s: float, step: int, step_s: float, eval_s: float,
    chosen: int, planned: int,
) -> str:
    return (
        f"[hstu] time budget {minutes:g} min: {elapsed_s:.0f} s spent by step {step}, "
        f"{step_s:.3f} s a step, {eval_s:.1f} s an evaluation: "
        f"{'slower' if chosen < planned else 'faster'} than planned; training to step {chosen} "
        f"instead of {planned} (the learning-rate schedule ends there)"
    )
