"""``TrainerArgs.time_budget_minutes``: the step count a run can afford, from its own timings.

Decided once, at the run's first evaluation: by then the run has timed its start-up, its
training steps and one evaluation. The remaining work of a run that ends at step N is the steps
up to N, the evaluations due on the way (every ``eval_interval`` steps and at N) and the test
split (costed as one more evaluation); the largest N whose work fits ``SAFETY`` of the time
left is the new step count, never above the configured one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hstu.training.distributed import rank_and_world

SAFETY = 0.95
"""Share of the time left that the plan may fill (checkpoint saves, timing noise)."""


def evaluations_between(step: int, end: int, eval_interval: int) -> int:
    """Evaluations a run evaluating every ``eval_interval`` steps and at its last step ``end``
    runs after ``step``, up to and including ``end``."""
    if end <= step:
        return 0
    on_interval = end // eval_interval - step // eval_interval
    return on_interval + (0 if end % eval_interval == 0 else 1)


def affordable_steps(
    *, budget_s: float, elapsed_s: float, step: int, step_s: float, eval_s: float,
    eval_interval: int, max_steps: int,
) -> int:
    """The largest N in [step, max_steps] whose remaining work (steps, evaluations, the test
    split) fits ``SAFETY * budget_s - elapsed_s``; ``step`` when not even one more step does."""
    left = SAFETY * budget_s - elapsed_s - eval_s  # the test split at the end

    def cost(end: int) -> float:
        return (end - step) * step_s + evaluations_between(step, end, eval_interval) * eval_s

    if cost(max_steps) <= left:
        return max_steps
    lo, hi = step, max_steps  # cost(lo) = 0 fits when left >= 0; cost(hi) does not
    if left < 0:
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
