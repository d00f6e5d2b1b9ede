"""What the retrieval losses share: the in-place softmax and the name of their host reads."""

from __future__ import annotations

import torch

# the sampled-score kernels and the fused sampled loss run on CPU tensors only (see
# shared_row_scores, fused_sampled_loss_applies): their host reads wait for no device
CPU_ONLY = "a CPU-only kernel: the host reads its own memory, no device to wait for"


def softmax_lse_(logits: torch.Tensor) -> torch.Tensor:
    """Rows of ``logits`` [r, I] become their softmax, in place; returns their log-sum-exp [r]
    as max - log(max prob) (the largest probability is 1 / sum exp(logit - max) >= 1 / I:
    never underflows)."""
    top = logits.amax(dim=1)
    torch.softmax(logits, dim=1, out=logits)
    return top - logits.amax(dim=1).log()

