"""hstu.ops.dropout: torch's dropout semantics with a mask from 16 random bits per element on CPU."""

import pytest
import torch
import torch.nn.functional as F

from hstu.ops.dropout import Dropout, dropout, keep_threshold


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keeps_each_element_with_probability_one_minus_p_and_rescales(p):
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    y = dropout(x, p, True)
    kept = y != 0
    # 200,000 draws: the kept fraction is within 5 standard deviations of 1 - p
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    # scaled by the inverse of the keep probability the 16-bit threshold gives
    scale = 65536 / keep_threshold(1 - p)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], scale))
    assert abs(scale * (1 - p) - 1) < 2e-5


def test_each_16_bit_lane_is_uniform():
    """Every one of the four lanes of a 64-bit draw keeps at the rate (a lane stuck or biased
    would show at elements i, i + 4, i + 8, ...), and at a threshold far from 1/2."""
    torch.manual_seed(2)
    x = torch.ones(4 * 100_000)
    y = dropout(x, 0.9, True)
    sd = (0.9 * 0.1 / 100_000) ** 0.5
    for lane in range(4):
        assert abs((y[lane::4] != 0).float().mean().item() - 0.1) < 5 * sd, lane


def test_threshold_is_the_nearest_16_bit_level():
    assert keep_threshold(0.5) == 32768 and keep_threshold(0.75) == 49152
    assert keep_threshold(0.9) == 58982  # 0.9 * 65536 = 58982.4
    # a keep probability within 1 / 131,072 of 1 goes to torch's dropout: scaled by exactly
    # 1 / (1 - p) (the 16-bit path would scale by 65536 / 65536 = 1)
    x = torch.ones(1000, 100, dtype=torch.float64)
    y = dropout(x, 1e-6, True)
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - 1e-6)))


def test_gradient_is_the_forward_mask_scaled():
    torch.manual_seed(1)
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.3, True)
    g = torch.randn_like(y)
    y.backward(g)
    mask = (y != 0).to(x.dtype)
    scale = 65536 / keep_threshold(0.7)
    torch.testing.assert_close(x.grad, g * mask * scale)
    # and the mask is the one the forward used: y == x * mask * scale
    torch.testing.assert_close(y, x.detach() * mask * scale)


def test_masks_follow_the_default_generator():
    x = torch.randn(50, 40)
    torch.manual_seed(7)
    a = dropout(x, 0.5, True)
    b = dropout(x, 0.5, True)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.5, True), a)
    assert not torch.equal(a, b)  # each call draws a new mask
    state = torch.get_rng_state()
    c = dropout(x, 0.5, True)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.5, True), c)


def test_identity_in_eval_and_at_zero_and_torch_at_one():
    x = torch.randn(10, 10, requires_grad=True)
    assert dropout(x, 0.5, False) is x
    assert dropout(x, 0.0, True) is x
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5, True)


def test_module_is_a_torch_dropout_with_the_same_expectation():
    m = Dropout(0.25)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.25
    torch.manual_seed(3)
    x = torch.rand(300, 300, dtype=torch.float64) + 1
    # the mean of the output is the input's in expectation, as for torch's dropout
    ours, theirs = m(x).mean().item(), F.dropout(x, 0.25, True).mean().item()
    assert abs(ours - x.mean().item()) < 0.01 and abs(theirs - x.mean().item()) < 0.01
    m.eval()
    assert m(x) is x


def test_bfloat16_input_keeps_its_dtype_and_rate():
    torch.manual_seed(5)
    x = torch.ones(500, 400, dtype=torch.bfloat16)
    y = dropout(x, 0.1, True)
    assert y.dtype == torch.bfloat16
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 5 * (0.09 / x.numel()) ** 0.5
