"""Row-sparse torch optimizers mirroring FBGEMM's fused ones, for non-fused kernels.

FBGEMM's fused kernels only touch the rows looked up in a step. The data_parallel tables
run TorchRec's dense kernel and use these optimizers, so every table follows the same
row-sparse semantics: a row whose gradient is all zero is left alone (weights and state).

A parameter may pack several tables in one flat tensor (TorchRec's dense TBE kernel); its
layout is given by the attribute ``_hstu_segments = [(table, start, end, dim), ...]``
(flat element offsets). Without it the parameter is a plain [R, D] table.
Optimizer state is kept per segment: ``state[p]["segments"][table]`` holds ``exp_avg`` and
``exp_avg_sq`` [R, D] (adam) or ``momentum1`` [R] (rowwise_adagrad); ``state[p]["step"]``.
"""

from __future__ import annotations

from typing import Literal

import torch

Segment = tuple[str, int, int, int]


def segments_of(p: torch.Tensor) -> list[Segment]:
    segs = getattr(p, "_hstu_segments", None)
    if segs is not None:
        return segs
    dim = p.shape[1] if p.dim() == 2 else 1
    return [("", 0, p.numel(), dim)]


class RowSparseOptimizer(torch.optim.Optimizer):
    """Lazy (row-sparse) Adam or exact row-wise Adagrad, as FBGEMM computes them.

    adam, per touched row r at global step t (bias-corrected like FBGEMM):
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    rowwise_adagrad, per touched row r:
        s += mean(g^2);  w -= lr * g / (sqrt(s) + eps)
    """

    def __init__(
        self,
        params,
        kind: Literal["adam", "rowwise_adagrad"],
        lr: float,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__(params, {"kind": kind, "lr": lr, "eps": eps, "betas": betas})

    def init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "segments" not in state:
            kind = self.param_groups[0]["kind"]
            state["step"] = torch.zeros((), dtype=torch.int64)
            segs = {}
            for name, start, end, dim in segments_of(p):
                rows = (end - start) // dim
                if kind == "adam":
                    segs[name] = {
                        "exp_avg": torch.zeros(rows, dim, device=p.device),
                        "exp_avg_sq": torch.zeros(rows, dim, device=p.device),
                    }
                else:
                    segs[name] = {"momentum1": torch.zeros(rows, device=p.device)}
            state["segments"] = segs
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, eps, (b1, b2), kind = group["lr"], group["eps"], group["betas"], group["kind"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.init_state(p)
                state["step"] += 1
                t = int(state["step"])
                flat_w = p.view(-1)
                flat_g = (p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1)
                for name, start, end, dim in segments_of(p):
                    w = flat_w[start:end].view(-1, dim)
                    g = flat_g[start:end].view(-1, dim)
                    rows = torch.nonzero(g.abs().sum(dim=1) > 0, as_tuple=False).flatten()
                    if rows.numel() == 0:
                        continue
                    gr = g[rows]
                    seg = state["segments"][name]
                    if kind == "adam":
                        m = seg["exp_avg"][rows].mul_(b1).add_(gr, alpha=1 - b1)
                        v = seg["exp_avg_sq"][rows].mul_(b2).addcmul_(gr, gr, value=1 - b2)
                        seg["exp_avg"][rows], seg["exp_avg_sq"][rows] = m, v
                        m_hat = m / (1 - b1**t)
                        v_hat = v / (1 - b2**t)
                        w[rows] = w[rows] - lr * m_hat / (v_hat.sqrt() + eps)
                    else:
                        s = seg["momentum1"][rows] + gr.pow(2).mean(dim=1)
                        seg["momentum1"][rows] = s
                        w[rows] = w[rows] - gr * (lr / (s.sqrt() + eps)).unsqueeze(1)
        return loss
