"""The cutlass adapter's bridging logic, on CPU, against a stand-in for FBGEMM's entry.

The stand-in follows FBGEMM's documented semantics (its reference test): SiLU(alpha * (QK^T +
rab)) / max_seqlen_q, causal window, contextual rows seeing the whole non-candidate history,
candidates blocked from earlier target groups. The adapter must turn that into our
definition exactly; the real kernels are compared in test_gpu_kernels.py.
"""

import pytest
import torch
import torch.nn.functional as F

from hstu.ops import cutlass_attention, hstu_attention

from .reference import grads, random_case


def fbgemm_like_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    num_contexts=None,
    num_targets=None,
    target_group_size=1,
    window_size=(-1, -1),
    alpha=1.0,
    rab=None,
    has_drab=False,
):
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    acc = torch.promote_types(q.dtype, torch.float32)
    outs = []
    for b in range(cu_seqlens_q.numel() - 1):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        n = end - start
        mask = torch.ones(n, n, dtype=torch.bool)
        if window_size == (-1, 0):
            mask = mask.tril()
        first_cand = n - (int(num_targets[b]) if num_targets is not None else 0)
        if num_contexts is not None:
            mask[: int(num_contexts[b]), :first_cand] = True
        for i in range(first_cand, n):
            group_start = first_cand + (i - first_cand) // target_group_size * target_group_size
            mask[i, first_cand:group_start] = False
        scores = torch.einsum("ihd,jhd->hij", q[start:end].to(acc), k[start:end].to(acc))
        if rab is not None:
            scores = scores + rab[b, :, :n, :n].to(acc)
        weights = F.silu(alpha * scores) / max_seqlen_q * mask
        outs.append(torch.einsum("hij,jhd->ihd", weights, v[start:end].to(acc)).to(q.dtype))
    return torch.cat(outs)


@pytest.mark.parametrize("rab, causal", [("none", True), ("pos+ts", True), ("pos", False)])
def test_adapter_reproduces_our_definition(monkeypatch, rab: str, causal: bool) -> None:
    monkeypatch.setattr(cutlass_attention, "load_entry", lambda: (fbgemm_like_varlen, ""))
    case = random_case(
        [21, 9, 30],
        num_contextual=[3, 2, 4],
        num_targets=[6, 2, 9] if causal else None,
        rab=rab,
        max_positions=32,
        dtype=torch.float64,
        seed=5,
    )
    kw = {
        "alpha": 0.35,
        "scaling_seqlen": 50,
        "num_contextual": case.num_contextual,
        "num_targets": case.num_targets,
        "target_group_size": 2,
        "causal": causal,
        "rab": case.rab,
    }
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    got = cutlass_attention.cutlass_hstu_attention(*args, **kw)
    want = hstu_attention(*args, backend="pytorch", **kw)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(a, b)
