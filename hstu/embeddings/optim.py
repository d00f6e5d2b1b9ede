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

from hstu.sync_audit import allowed_sync

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
                flat_w = p.view(-1)
                flat_g = (p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1)
                for name, start, end, dim in segments_of(p):
                    w = flat_w[start:end].view(-1, dim)
                    g = flat_g[start:end].view(-1, dim)
                    # every row is computed and the untouched ones (all-zero gradient) keep
                    # their old values: no nonzero() to list the touched rows (a host sync on
                    # CUDA); the touched rows' values are the same elementwise operations
                    touched = (g.abs().sum(dim=1) > 0).unsqueeze(1)
                    seg = state["segments"][name]
                    if kind == "adam":
                        # the step count is a host tensor (made on the CPU): no device wait
                        with allowed_sync("RowSparseOptimizer's step count lives on the host"):
                            t = int(state["step"])
                        m = (seg["exp_avg"] * b1).add_(g, alpha=1 - b1)
                        v = (seg["exp_avg_sq"] * b2).addcmul_(g, g, value=1 - b2)
                        m = torch.where(touched, m, seg["exp_avg"])
                        v = torch.where(touched, v, seg["exp_avg_sq"])
                        seg["exp_avg"].copy_(m)
                        seg["exp_avg_sq"].copy_(v)
                        m_hat = m / (1 - b1**t)
                        v_hat = v / (1 - b2**t)
                        w.copy_(torch.where(touched, w - lr * m_hat / (v_hat.sqrt() + eps), w))
                    else:
                        mom = seg["momentum1"]
                        s = mom + g.pow(2).mean(dim=1)
                        mom.copy_(torch.where(touched.squeeze(1), s, mom))
                        step = g * (lr / (s.sqrt() + eps)).unsqueeze(1)
                        w.copy_(torch.where(touched, w - step, w))
        return loss
