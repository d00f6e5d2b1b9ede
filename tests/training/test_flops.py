"""The step FLOPs formula counts the attention pairs the mask keeps (window included) and the
layers attention truncation shortens, and equals torch's FLOP counter on the HSTU and SASRec
blocks (forward and backward) once the counter's attention is brought to the kept pairs."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hstu.model.hstu_block import HSTUBlock
from hstu.model.sasrec import SASRecBlock, sasrec_step_flops
from hstu.ops.masks import dense_mask
from hstu.training.flops import attention_pairs, hstu_step_flops, step_flops


@pytest.mark.parametrize("window, full", [(0, 0), (1, 0), (3, 0), (5, 2), (3, 7), (40, 0)])
def test_attention_pairs_count_the_mask(window, full) -> None:
    lengths = torch.tensor([1, 2, 5, 9, 17, 30])
    mask = dense_mask(lengths, None, None, 1, True, 30, "hstu", window, full)
    torch.testing.assert_close(attention_pairs(lengths, window, full), mask.sum(dim=(1, 2)).double())


def _net(**fields) -> SimpleNamespace:
    """NetworkArgs' fields hstu_step_flops reads (the window and truncation ones optional)."""
    shape = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 2, "kv_channels": 32}
    return SimpleNamespace(**{**shape, **fields})


def test_window_and_truncation_lower_the_step_flops() -> None:
    lengths = torch.tensor([4096, 1000])
    full = hstu_step_flops(lengths, _net())
    windowed = hstu_step_flops(lengths, _net(max_attn_len=256))
    attention = 3 * 4 * 4 * 64  # 3 (fwd + bwd) x layers x 4 H d per pair
    pairs = attention_pairs(lengths) - attention_pairs(lengths, 256)
    assert full - windowed == pytest.approx(attention * float(pairs.sum()))
    # truncation: the top 3 layers over the last 512 tokens = 1 full layer + 3 layers of
    # the truncated lengths
    truncated = hstu_step_flops(lengths, _net(attn_truncation_layers=1, attn_truncation_len=512))
    one = _net(num_layers=1)
    assert truncated == pytest.approx(
        hstu_step_flops(lengths, one) + 3 * hstu_step_flops(torch.tensor([512, 512]), one))


def test_step_flops_follow_the_architecture() -> None:
    lengths = torch.tensor([30, 7])
    assert step_flops(lengths, _net(architecture="hstu")) == hstu_step_flops(lengths, _net())
    assert step_flops(lengths, _net(architecture="mlp_baseline")) == 0.0
    sasrec = _net(architecture="sasrec")
    assert step_flops(lengths, sasrec) == sasrec_step_flops(lengths, sasrec)
    assert step_flops(lengths, sasrec) != step_flops(lengths, _net())


def _counted(block: torch.nn.Module, lengths: torch.Tensor) -> dict[str, int]:
    """FLOPs torch's FlopCounterMode counts per aten op over one forward and backward of
    ``block`` on random tokens (their gradient included, as the embeddings' in training)."""
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    x = torch.randn(int(lengths.sum()), block.hidden_size, requires_grad=True)
    # the math backend: the counter has no formula for CPU's fused attention kernel, which it
    # would leave out; the math one is plain bmm (scores, then A V)
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        out = block(x, offsets, int(lengths.max()))
        out.backward(torch.randn_like(out))
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("architecture, options", [
    ("hstu", {}),
    ("sasrec", {}),
    ("sasrec", {"ffn_activation": "gelu", "gated_residual": False, "ffn_multiplier": 2}),
])
def test_step_flops_match_torch_flop_counter(architecture, options) -> None:
    """step_flops against torch.utils.flop_counter on the block itself, forward and backward.
    The counter counts matmuls only (so does the formula: norms, SiLU and softmax are left out
    of both), the attention's over the whole [L, L] square the kernels compute before masking;
    the formula counts the pairs the causal mask keeps, L (L + 1) / 2 of the L^2. Equal
    lengths: no padding in either count."""
    seqlen, num_layers, hidden, heads, head_dim = 24, 3, 32, 2, 16
    lengths = torch.full((3,), seqlen)
    torch.manual_seed(0)
    if architecture == "hstu":
        block = HSTUBlock(num_layers, hidden, heads, head_dim, **options)
        net = _net(architecture="hstu")
    else:
        block = SASRecBlock(num_layers, hidden, heads, head_dim, **options)
        net = _net(architecture="sasrec", **{f"sasrec_{k}": v for k, v in options.items()})
    net.num_layers, net.hidden_size, net.num_attention_heads, net.kv_channels = (
        num_layers, hidden, heads, head_dim)
    counted = _counted(block, lengths)
    assert set(counted) == {"aten.mm", "aten.addmm", "aten.bmm"}, counted
    attention = counted["aten.bmm"]  # Q K^T and A V (forward and backward)
    kept = (seqlen + 1) / (2 * seqlen)
    want = sum(counted.values()) - attention * (1 - kept)
    assert step_flops(lengths, net) == pytest.approx(want, rel=1e-9)
