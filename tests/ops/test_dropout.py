"""hstu.ops.dropout: torch's dropout semantics with a mask drawn by ``rand`` on CPU."""

import pytest
import torch
import torch.nn.functional as F

from hstu.ops.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keeps_each_element_with_probability_one_minus_p_and_rescales(p):
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    y = dropout(x, p, True)
    kept = y != 0
    # 200,000 draws: the kept fraction is within 5 standard deviations of 1 - p
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))


def test_gradient_is_the_forward_mask_scaled():
    torch.manual_seed(1)
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.3, True)
    g = torch.randn_like(y)
    y.backward(g)
    mask = (y != 0).to(x.dtype)
    torch.testing.assert_close(x.grad, g * mask / 0.7)
    # and the mask is the one the forward used: y == x * mask / keep
    torch.testing.assert_close(y, x.detach() * mask / 0.7)


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
