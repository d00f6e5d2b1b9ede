"""One optimizer container for the whole model: dense optimizer with LR schedule, gradient
clipping and data-parallel gradient averaging, plus the sparse optimizer that TorchRec fuses
into the embedding backward. One ``step()``, one ``zero_grad()``, one ``state_dict()``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.distributed as dist

from hstu.args import OptimizerArgs


def lr_at(step: int, args: OptimizerArgs, total_steps: int | None) -> float:
    """Learning rate for 0-based ``step``: linear warm-up, then constant/linear/cosine decay."""
    peak = args.learning_rate
    if args.lr_warmup_iters > 0 and step < args.lr_warmup_iters:
        return peak * (step + 1) / args.lr_warmup_iters
    if args.lr_decay_style == "constant":
        return peak
    end = args.lr_decay_iters or total_steps
    if end is None or end <= args.lr_warmup_iters:
        return peak
    progress = min(1.0, (step - args.lr_warmup_iters) / (end - args.lr_warmup_iters))
    if args.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:  # cosine
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.min_learning_rate + (peak - args.min_learning_rate) * factor


def build_dense_optimizer(params: Iterable[torch.nn.Parameter], args: OptimizerArgs) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if args.optimizer_str == "adam":
        return torch.optim.Adam(
            params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps, weight_decay=args.weight_decay,
        )
    if args.optimizer_str == "adamw":
        return torch.optim.AdamW(
            params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps, weight_decay=args.weight_decay,
        )
    return torch.optim.SGD(params, lr=args.learning_rate, weight_decay=args.weight_decay)


class OptimizerContainer(torch.optim.Optimizer):
    """Dense optimizer + fused sparse optimizer behind one interface.

    ``step()``: average dense gradients over ``allreduce_groups`` (each entry: parameters and
    the process group over which their gradients are averaged), clip the global norm, set
    the scheduled LR, step. The sparse (fused) optimizers, one per sharded collection,
    already stepped inside backward; they are here for ``state_dict()``.
    """

    def __init__(
        self,
        dense: torch.optim.Optimizer,
        args: OptimizerArgs,
        total_steps: int | None,
        sparse: list[Any] | None = None,
        allreduce_groups: list[tuple[list[torch.nn.Parameter], dist.ProcessGroup | None, int]] | None = None,
    ) -> None:
        # Not calling Optimizer.__init__: param_groups are the dense optimizer's.
        self.dense = dense
        self.sparse = sparse
        self.args = args
        self.total_steps = total_steps
        self.allreduce_groups = allreduce_groups or []
        self.num_steps = 0
        self.last_grad_norm: float | None = None
        self._set_lr(lr_at(0, args, total_steps))

    # torch.optim.Optimizer surface used by TorchRec pipelines and schedulers
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.dense.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.dense.state

    @property
    def lr(self) -> float:
        return self.dense.param_groups[0]["lr"]

    def _set_lr(self, lr: float) -> None:
        for group in self.dense.param_groups:
            group["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _allreduce_grads(self) -> None:
        for params, group, size in self.allreduce_groups:
            if size <= 1:
                continue
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            flat.div_(size)
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self._allreduce_grads()
        if self.args.clip_grad_norm > 0:
            params = [p for g in self.dense.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.args.clip_grad_norm)
            self.last_grad_norm = float(norm)
        self._set_lr(lr_at(self.num_steps, self.args, self.total_steps))
        self.dense.step()
        self.num_steps += 1
        # the next step's LR, so that logs show what the next update uses
        self._set_lr(lr_at(self.num_steps, self.args, self.total_steps))

    def state_dict(self) -> dict:  # type: ignore[override]
        out = {"dense": self.dense.state_dict(), "num_steps": self.num_steps}
        if self.sparse:
            out["sparse"] = [opt.state_dict() for opt in self.sparse]
        return out

    def load_dense_state_dict(self, dense_state: dict, num_steps: int) -> None:
        """Restores the dense optimizer and the schedule position (sparse state lives with
        the embedding tables' checkpoint)."""
        self.dense.load_state_dict(dense_state)
        self.num_steps = num_steps
        self._set_lr(lr_at(self.num_steps, self.args, self.total_steps))

    def load_state_dict(self, state: dict) -> None:  # type: ignore[override]
        self.dense.load_state_dict(state["dense"])
        self.num_steps = int(state["num_steps"])
        for opt, opt_state in zip(self.sparse or [], state.get("sparse", [])):
            opt.load_state_dict(opt_state)
        self._set_lr(lr_at(self.num_steps, self.args, self.total_steps))
