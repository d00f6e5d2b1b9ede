"""Row-sparse torch optimizer mirroring FBGEMM's fused ones, for the replicated tables.

FBGEMM's fused kernels only touch the rows looked up in a step. The data_parallel tables
(plain [R, D] weights) use this optimizer, so every table follows the same row-sparse
semantics: a row whose gradient is all zero is left alone (weights and state).
State per table: ``state[p]`` holds ``step`` (an int64 count on the table's device: Adam's
bias correction is computed there, so a step reads nothing on the host and a float16 skip
can restore the count with ``torch.where``), and ``exp_avg`` and ``exp_avg_sq`` [R, D] (adam)
or ``momentum1`` [R] (rowwise_adagrad).

Why not ``torch.optim.SparseAdam`` (docs/architecture.md, "Ours where a dependency ships
something close"): it adds ``eps`` to ``sqrt(v)`` before bias correction where FBGEMM adds it
to ``sqrt(v_hat)``, needs a sparse gradient, and torch has no row-wise Adagrad.
"""

from __future__ import annotations

from typing import Literal

import torch


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
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
            if self.param_groups[0]["kind"] == "adam":
                state["exp_avg"] = torch.zeros(p.shape, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, device=p.device)
            else:
                state["momentum1"] = torch.zeros(p.shape[0], device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, eps, (b1, b2), kind = group["lr"], group["eps"], group["betas"], group["kind"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.init_state(w)
                state["step"] += 1
                g = w.grad.to_dense() if w.grad.is_sparse else w.grad
                # every row is computed and the untouched ones (all-zero gradient) keep
                # their old values: no nonzero() to list the touched rows (a host sync on
                # CUDA); the touched rows' values are the same elementwise operations
                touched = (g.abs().sum(dim=1) > 0).unsqueeze(1)
                if kind == "adam":
                    # 1 - b^t on the device, in float64 as Python's b**t was: the same
                    # float32 divisors, no host read of the count
                    t = state["step"].to(torch.float64)
                    m = (state["exp_avg"] * b1).add_(g, alpha=1 - b1)
                    v = (state["exp_avg_sq"] * b2).addcmul_(g, g, value=1 - b2)
                    m = torch.where(touched, m, state["exp_avg"])
                    v = torch.where(touched, v, state["exp_avg_sq"])
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
                    m_hat = m / (1 - b1**t)
                    v_hat = v / (1 - b2**t)
                    w.copy_(torch.where(touched, w - lr * m_hat / (v_hat.sqrt() + eps), w))
                else:
                    mom = state["momentum1"]
                    s = mom + g.pow(2).mean(dim=1)
                    mom.copy_(torch.where(touched.squeeze(1), s, mom))
                    step = g * (lr / (s.sqrt() + eps)).unsqueeze(1)
                    w.copy_(torch.where(touched, w - step, w))
        return loss
