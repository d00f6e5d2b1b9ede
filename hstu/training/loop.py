"""The small collaborators of the training loop (:meth:`hstu.training.trainer.Trainer.train`).

- :class:`MetricsWindow`: the losses of the steps since the last log line stay on the device
  (no host sync inside a step) until a log or checkpoint boundary moves them to the host,
  stopping every rank at the first non-finite loss or gradient; at a log boundary it sums the
  window over the ranks into the ``train`` metrics and the console line.
- :class:`Preemption`: SIGTERM/SIGUSR1 ask for a checkpoint at the next boundary, then a
  clean stop; the ranks agree on it with one tiny all-reduce.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Self

import torch
import torch.distributed as dist

from hstu.training.distributed import gather_objects, rank_and_world


def agree_finite(problem: tuple[int, str] | None) -> None:
    """Every rank stops on the first non-finite step of any rank (FloatingPointError).
    ``problem``: (step, text) of this rank's first one, or None."""
    # host tensors: the default group reduces them with its host backend (gloo)
    flag = torch.tensor([0.0 if problem is None else 1.0])
    gathered = [problem]
    if rank_and_world()[1] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            gathered = gather_objects(problem)
    found = [(p[0], rank, p[1]) for rank, p in enumerate(gathered) if p is not None]
    if found:
        _, rank, text = min(found)
        where = f" (rank {rank})" if len(gathered) > 1 else ""
        raise FloatingPointError(text + where)


class MetricsWindow:
    """The steps since the last log line: their losses (on the device until :meth:`flush`),
    tokens, FLOPs and wall time. ``losses`` keeps every flushed loss of the run."""

    def __init__(self, peak_flops: float, world_size: int) -> None:
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.losses: list[float] = []
        self._pending: list[torch.Tensor] = []
        self._pending_grads: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        """A new window: counters to zero, the clock restarted."""
        self.loss_sum, self.num_steps, self.tokens, self.flops = 0.0, 0, 0, 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Time spent outside training steps (evaluation, a save) is not the window's."""
        self.start = time.perf_counter()

    def record(
        self, loss: torch.Tensor, grads_finite: torch.Tensor | None, tokens: int, flops: float
    ) -> None:
        """One step: its detached loss and whether its dense gradients were finite (both
        device tensors, left there), its tokens and FLOPs."""
        self._pending.append(loss)
        if grads_finite is not None:
            self._pending_grads.append(grads_finite)
        self.num_steps += 1
        self.tokens += tokens
        self.flops += flops

    def flush(self, last_step: int) -> None:
        """Moves the pending losses (of the steps up to ``last_step``) to the host and adds
        them to the window's sum; stops every rank at the first non-finite loss or gradient,
        naming its step (checkpoints come after a flush: never non-finite)."""
        pending = self._pending
        if not pending:
            return
        values = torch.stack([x.reshape(()).float() for x in pending]).double().cpu().tolist()
        if self._pending_grads:
            grads_ok = torch.stack(self._pending_grads).cpu().tolist()
        else:
            grads_ok = [True] * len(values)
        first = last_step - len(pending) + 1
        pending.clear()
        self._pending_grads.clear()
        problem = None
        for step, v, ok in zip(range(first, last_step + 1), values, grads_ok):
            if not math.isfinite(v):
                problem = (step, f"step {step}: loss is {v}")
            elif not ok:
                problem = (step, f"step {step}: a dense gradient is not finite (loss {v:.4g})")
            if problem:
                break
        agree_finite(problem)
        self.losses.extend(values)
        self.loss_sum += sum(values)

    def summarize(self, optimizer: Any) -> dict[str, float]:
        """The window's ``train`` metrics over all ranks (one all-reduce), then a new window."""
        elapsed = time.perf_counter() - self.start
        stats = torch.tensor(
            [self.loss_sum, self.num_steps, self.tokens, self.flops], dtype=torch.float64
        )
        dist.all_reduce(stats)
        mean_loss = stats[0].item() / max(stats[1].item(), 1)
        # with TP, every rank of a group counts its own samples once
        tok_s = stats[2].item() / elapsed
        flop_s = stats[3].item() / elapsed
        mfu = flop_s / (self.peak_flops * self.world_size) if self.peak_flops > 0 else float("nan")
        metrics = {"loss": mean_loss, "lr": optimizer.lr, "tokens_per_s": tok_s,
                   "tflops": flop_s / 1e12, "mfu": mfu}
        if optimizer.last_grad_norm is not None:
            metrics["grad_norm"] = float(optimizer.last_grad_norm)
        if optimizer.scaler is not None:
            metrics["loss_scale"] = optimizer.scaler.scale
        self.reset()
        return metrics


def train_line(step: int, max_steps: int, metrics: dict[str, float],
               eta_s: float | None = None) -> str:
    """The console line of a log boundary (with ``eta_s``: `` eta 6 min 05 s``)."""
    line = (
        f"step {step}/{max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
        f"tokens/s {metrics['tokens_per_s']:,.0f} TFLOP/s {metrics['tflops']:.4f} "
        f"MFU {metrics['mfu']:.2%}"
    )
    if eta_s is not None and step < max_steps:
        line += f" eta {format_eta(eta_s)}"
    return line


def format_eta(seconds: float) -> str:
    """``6 min 05 s``, ``45 s``, ``1 h 02 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Eta:
    """The run's remaining wall time, measured: the seconds since training started (steps,
    evaluations and saves alike, as they recur) per step taken, times the steps left.
    ``seconds(step)`` is None before the first step of this process."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step
        self.start = time.perf_counter()

    def seconds(self, step: int, max_steps: int) -> float | None:
        done = step - self.first_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.start) / done * (max_steps - step)


class Preemption:
    """SIGTERM (sent by torchrun, schedulers, preemption) and SIGUSR1 ask for a checkpoint
    at the next step boundary, then a clean stop: a run is never lost to a polite kill.
    A context manager: the previous handlers are back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._old_handlers: dict[int, Any] = {}

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> Self:
        for sig in self.SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def agreed(self) -> bool:
        """All ranks stop at the same step if any rank was signalled (one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self.requested else 0.0])  # host, like the signal
        if rank_and_world()[1] > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
