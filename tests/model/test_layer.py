"""HSTU layer math (by hand), the fused norm/linear/SiLU, recompute flags, positions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hstu.model.hstu_block import HSTUBlock
from hstu.model.hstu_layer import HSTULayer, norm_linear_silu
from hstu.ops.jagged import positions_within

# --------------------------------------------------------------- plain-python reference


def _ln(vec: list[float], eps: float) -> list[float]:
    mean = sum(vec) / len(vec)
    var = sum((v - mean) ** 2 for v in vec) / len(vec)
    return [(v - mean) / math.sqrt(var + eps) for v in vec]


def _silu(z: float) -> float:
    return z / (1.0 + math.exp(-z))


def _matvec(w: list[list[float]], vec: list[float], bias: list[float] | None = None) -> list[float]:
    out = [sum(wi * xi for wi, xi in zip(row, vec)) for row in w]
    return [o + b for o, b in zip(out, bias)] if bias else out


def _bucket(delta: int) -> int:
    return min(max(math.floor(math.log(max(abs(delta), 1)) / 0.301), 0), 128)


def hand_layer(
    x, w_uvqk, b_uvqk, w_o, b_o, alpha, n_scale, eps, rab_pos=None, rab_ts=None, ts=None
):
    """docs/model.md "Layer math" for one causal sample, 1 head, in python floats."""
    tokens = len(x)
    d = len(w_uvqk) // 4
    parts = []
    for i in range(tokens):
        h = [_silu(z) for z in _matvec(w_uvqk, _ln(x[i], eps), b_uvqk)]
        parts.append((h[:d], h[d : 2 * d], h[2 * d : 3 * d], h[3 * d :]))
    out = []
    num_pos = (len(rab_pos) + 1) // 2 if rab_pos else 0
    for i in range(tokens):
        u_i, _, q_i, _ = parts[i]
        o = [0.0] * d
        for j in range(i + 1):  # causal
            logit = alpha * sum(a * b for a, b in zip(q_i, parts[j][3]))
            if rab_pos is not None:
                t_next = ts[min(i + 1, tokens - 1)]
                logit += rab_pos[num_pos - 1 + j - i] + rab_ts[_bucket(t_next - ts[j])]
            a_ij = _silu(logit) / n_scale
            o = [oo + a_ij * vv for oo, vv in zip(o, parts[j][1])]
        y = [a * b for a, b in zip(_ln(o, eps), u_i)]
        out.append([xi + yi for xi, yi in zip(x[i], _matvec(w_o, y, b_o))])
    return out


X = [[0.3, -1.2], [1.5, 0.4]]  # 2 tokens, D = 2
W_UVQK = [  # rows: U(2), V(2), Q(2), K(2); D = 2 inputs
    [0.5, -0.3],
    [0.2, 0.8],
    [-0.6, 0.1],
    [0.9, 0.4],
    [0.7, -0.5],
    [-0.2, 0.3],
    [0.4, 0.6],
    [-0.8, 0.2],
]
B_UVQK = [0.1, -0.1, 0.05, 0.2, -0.3, 0.0, 0.15, -0.05]
W_O = [[0.6, -0.4], [0.3, 0.9]]


def _load(layer: HSTULayer, b_uvqk, b_o) -> None:
    with torch.no_grad():
        layer.uvqk.weight.copy_(torch.tensor(W_UVQK))
        if b_uvqk is not None:
            layer.uvqk.bias.copy_(torch.tensor(b_uvqk))
        layer.output.weight.copy_(torch.tensor(W_O))
        if b_o is not None:
            layer.output.bias.copy_(torch.tensor(b_o))


def test_layer_matches_hand_computation_two_tokens_one_head():
    layer = HSTULayer(2, 1, 2, norm_eps=1e-5)
    _load(layer, B_UVQK, None)
    out = layer(torch.tensor(X), torch.tensor([0, 2]), max_seqlen=2)
    expected = hand_layer(X, W_UVQK, B_UVQK, W_O, None, alpha=1 / math.sqrt(2), n_scale=2, eps=1e-5)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_research_variant_matches_hand_computation_with_rab():
    layer = HSTULayer(
        2,
        1,
        2,
        norm_eps=1e-6,
        alpha=1.0,
        attn_scaling_seqlen=5,
        uvqk_bias=False,
        norm_affine=False,
        output_bias=True,
        relative_attention_bias=True,
        rab_num_positions=2,
    )
    b_o = [0.25, -0.5]
    _load(layer, None, b_o)
    rab_pos = [0.3, -0.2, 0.7]  # 2P - 1 with P = 2
    rab_ts = [0.01 * k for k in range(129)]
    ts = [1000, 1000 + 60]
    with torch.no_grad():
        layer.rab_pos_weights.copy_(torch.tensor(rab_pos))
        layer.rab_ts_weights.copy_(torch.tensor(rab_ts))
    assert layer.uvqk.bias is None and layer.input_norm_weight is None
    out = layer(torch.tensor(X), torch.tensor([0, 2]), max_seqlen=2, timestamps=torch.tensor(ts))
    expected = hand_layer(
        X,
        W_UVQK,
        None,
        W_O,
        b_o,
        alpha=1.0,
        n_scale=5,
        eps=1e-6,
        rab_pos=rab_pos,
        rab_ts=rab_ts,
        ts=ts,
    )
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_hand_reference_is_sensitive():
    # the hand reference itself must notice a wrong alpha (guards against a vacuous test)
    a = hand_layer(X, W_UVQK, B_UVQK, W_O, None, alpha=1 / math.sqrt(2), n_scale=2, eps=1e-5)
    b = hand_layer(X, W_UVQK, B_UVQK, W_O, None, alpha=1.0, n_scale=2, eps=1e-5)
    assert abs(a[1][0] - b[1][0]) > 1e-4


# ------------------------------------------------------------ fused norm + linear + SiLU


@pytest.mark.parametrize("affine,bias", [(True, True), (False, False)])
def test_norm_linear_silu_matches_autograd(affine: bool, bias: bool):
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(8, dtype=torch.float64, requires_grad=True) if affine else None
    lb = torch.randn(8, dtype=torch.float64, requires_grad=True) if affine else None
    w = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = [t for t in (x, lw, lb, w, b) if t is not None]
    g = torch.randn(6, 12, dtype=torch.float64)

    ref = F.silu(F.linear(F.layer_norm(x, (8,), lw, lb, 1e-5), w, b))
    ref_grads = torch.autograd.grad(ref, leaves, g)
    for rn in (False, True):
        for rs in (False, True):
            out = norm_linear_silu(x, lw, lb, w, b, 1e-5, rn, rs)
            grads = torch.autograd.grad(out, leaves, g)
            torch.testing.assert_close(out, ref)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want)


def _jagged_case():
    offsets = torch.tensor([0, 5, 8, 14])
    num_contextual = torch.tensor([1, 0, 2])
    num_targets = torch.tensor([2, 0, 3])
    timestamps = torch.arange(14) * 37
    return offsets, num_contextual, num_targets, timestamps


def _run_block(recompute_ln: bool, recompute_silu: bool):
    torch.manual_seed(3)
    block = HSTUBlock(
        2,
        16,
        2,
        8,
        num_position_buckets=32,
        relative_attention_bias=True,
        rab_num_positions=8,
        recompute_input_layernorm=recompute_ln,
        recompute_input_silu=recompute_silu,
    )
    offsets, nc, nt, ts = _jagged_case()
    x = torch.randn(14, 16, requires_grad=True, generator=torch.Generator().manual_seed(7))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        # count each storage once: a tensor saved by two ops is held once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, offsets, 8, nc, nt, ts)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    return out.detach(), x.grad.clone(), grads, sum(saved.values())


def test_recompute_flags_identical_results_and_store_less():
    base_out, base_gx, base_grads, base_bytes = _run_block(False, False)
    saved_by_flags = {}
    for flags in ((True, False), (False, True), (True, True)):
        out, gx, grads, saved = _run_block(*flags)
        assert torch.equal(out, base_out), flags
        assert torch.equal(gx, base_gx), flags
        for name, g in grads.items():
            assert torch.equal(g, base_grads[name]), (flags, name)
        saved_by_flags[flags] = saved
    # recompute_input_silu drops the [T, 4*H*d] pre-activation of every layer
    t, h, d, layers = 14, 2, 8, 2
    assert base_bytes - saved_by_flags[(False, True)] >= layers * t * 4 * h * d * 4
    # the fused op never stores LayerNorm(x) next to x: the norm flag keeps x instead of x-hat
    assert saved_by_flags[(True, False)] <= base_bytes
    assert saved_by_flags[(True, True)] <= saved_by_flags[(False, True)]
    assert all(g.abs().sum() > 0 for n, g in base_grads.items() if "bias" not in n or "rab" in n)


def test_layer_is_a_jagged_per_sample_function():
    """Sample outputs do not depend on the other samples of the batch."""
    torch.manual_seed(0)
    layer = HSTULayer(16, 2, 8)
    offsets, nc, nt, _ = _jagged_case()
    x = torch.randn(14, 16)
    full = layer(x, offsets, 8, nc, nt)
    alone = layer(x[5:8], torch.tensor([0, 3]), 8, nc[1:2], nt[1:2])
    torch.testing.assert_close(full[5:8], alone)


def test_candidates_share_the_first_candidate_position():
    offsets = torch.tensor([0, 6, 9])
    pos = positions_within(offsets, torch.tensor([3, 0]), 9)
    assert pos.tolist() == [0, 1, 2, 3, 3, 3, 0, 1, 2]


def test_bfloat16_runs():
    layer = HSTULayer(16, 2, 8, dtype=torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x, torch.tensor([0, 5]), 5)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad is not None


def _block_out_and_grads(layout: str, group: int, with_targets: bool):
    torch.manual_seed(3)
    block = HSTUBlock(
        2, 16, 2, 8, num_position_buckets=32, relative_attention_bias=True,
        rab_num_positions=9, target_group_size=group, sequence_layout=layout,
    )
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    offsets, nc, nt, ts = _jagged_case()
    x = torch.randn(14, 16, requires_grad=True, generator=torch.Generator().manual_seed(7))
    out = block(x, offsets, 9, nc, nt if with_targets else None, ts)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("group,with_targets", [(1, True), (2, True), (1, False)])
def test_padded_layout_equals_jagged(group, with_targets):
    """Padding to max_seqlen (9 > the longest sample, 6) after the real tokens changes nothing
    the real tokens see: outputs and every gradient agree with the jagged run."""
    out, gx, grads = _block_out_and_grads("jagged", group, with_targets)
    p_out, p_gx, p_grads = _block_out_and_grads("padded", group, with_targets)
    torch.testing.assert_close(p_out, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_gx, gx, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(p_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_padded_layout_needs_causal():
    with pytest.raises(ValueError, match="causal"):
        HSTUBlock(1, 16, 2, 8, sequence_layout="padded", is_causal=False)


@pytest.mark.slow  # (inductor compiles C++ for a minute on 2 cores)
def test_compile_switch_same_results_without_dropout():
    """NetworkArgs.compile: the compiled output tail gives the eager outputs and gradients
    (dropout 0; with dropout the masks come from another generator), on two batch shapes
    (dynamic shapes: no recompile needed for the second)."""
    def run(compile_tail: bool, offsets: torch.Tensor):
        torch.manual_seed(3)
        block = HSTUBlock(2, 16, 2, 8, num_position_buckets=32, compile=compile_tail)
        x = torch.randn(int(offsets[-1]), 16, requires_grad=True,
                        generator=torch.Generator().manual_seed(7))
        out = block(x, offsets, 9)
        out.pow(2).sum().backward()
        return out.detach(), x.grad, block.layers[0].output.weight.grad

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for offsets in (torch.tensor([0, 5, 8, 14]), torch.tensor([0, 2, 9])):
        for got, want in zip(run(True, offsets), run(False, offsets)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # dynamo really compiled the tail (not an eager fallback), in one piece
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_switch_refused_with_tensor_parallelism():
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        HSTULayer(16, 2, 8, compile=True, tp_group=object())


@pytest.mark.parametrize("layout", ["jagged", "padded"])
def test_query_time_is_the_last_tokens_next_time(layout):
    """NetworkArgs.rab_query_time: with query times q[b] every sample's tokens come out as if a
    token stamped q[b] followed the sample (under causal attention a later token changes no
    earlier output, only the last token's t_next = t[L]): checked against that longer input
    run without query times, for every layer (2) and both layouts; and the outputs differ
    from those without query times, so the time term does see them."""
    torch.manual_seed(3)
    block = HSTUBlock(
        2, 16, 2, 8, num_position_buckets=32, relative_attention_bias=True,
        rab_num_positions=10, attn_scaling_seqlen=9, alpha=1.0, sequence_layout=layout,
    )
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    lengths = [5, 3, 6, 1]
    offsets = torch.tensor([0, 5, 8, 14, 15])
    ts = torch.cumsum(torch.randint(0, 400, (15,), generator=torch.Generator().manual_seed(1)), 0)
    query = ts[offsets[1:] - 1] + torch.tensor([90_000, 7, 3_000_000, 200])
    x = torch.randn(15, 16, generator=torch.Generator().manual_seed(7))
    block.eval()
    got = block(x, offsets, 9, timestamps=ts, query_timestamps=query)
    plain = block(x, offsets, 9, timestamps=ts)
    # the longer input: one extra token after each sample, stamped with its query time
    rows = torch.cat([torch.arange(o, o + n) + b for b, (o, n) in enumerate(zip(offsets[:-1], lengths))])
    ext_x = torch.zeros(19, 16)
    ext_ts = torch.zeros(19, dtype=torch.int64)
    ext_x[rows], ext_ts[rows] = x, ts
    ext_ts[offsets[1:] + torch.arange(4)] = query
    ext_x[offsets[1:] + torch.arange(4)] = torch.randn(4, 16)
    ext_offsets = offsets + torch.arange(5)
    want = block(ext_x, ext_offsets, 9, timestamps=ext_ts)[rows]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    last = offsets[1:] - 1
    assert not torch.allclose(got[last], plain[last], atol=1e-4)
    others = torch.ones(15, dtype=torch.bool)
    others[last] = False
    torch.testing.assert_close(got[others], plain[others])  # only the last tokens move
