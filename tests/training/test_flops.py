"""The step FLOPs formula counts the attention pairs the mask keeps (window included) and the
layers attention truncation shortens."""

from types import SimpleNamespace

import pytest
import torch

from hstu.model.sasrec import sasrec_step_flops
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
