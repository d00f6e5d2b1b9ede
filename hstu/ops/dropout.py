"""Dropout whose mask costs what a uniform draw costs, on every device.

On CPUs torch's dropout draws its mask with ``bernoulli_``, element by element: on a
[6,218, 150] activation (the ML-100K preset's ``LayerNorm(O) * U`` on one rank) forward and
backward take ~18 ms on one AMD EPYC core, against ~8.5 ms for a mask from ``rand_like``
(vectorised) kept as booleans, as here: 7 % of the preset's step. On GPUs torch's fused
kernel is used unchanged. Same distribution (each element kept with probability 1 - p and
scaled by 1 / (1 - p)), from the same default generator (so ``manual_seed``, the
tensor-parallel stream of :mod:`hstu.model.rng` and checkpointed RNG states govern it as
they govern ``torch.nn.Dropout``); the masks themselves differ from torch's for a seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _MaskedScale(torch.autograd.Function):
    """x * mask / keep with a boolean mask drawn as ``rand < keep``; backward reuses it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: float) -> torch.Tensor:
        mask = torch.rand(x.shape, dtype=torch.float32, device=x.device) < keep
        ctx.save_for_backward(mask)
        ctx.scale = 1.0 / keep
        return x.mul(mask).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``; on CPU tensors the mask comes from ``rand`` (above)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0 or not x.is_floating_point():
        return F.dropout(x, p, training)
    return _MaskedScale.apply(x, 1.0 - p)


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` (same fields, same ``p``) through :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
