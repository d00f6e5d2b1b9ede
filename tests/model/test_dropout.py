"""hstu.model.dropout.Dropout: on CPU the mask is rand_like(x) >= p from the default generator,
scaled by 1 / (1 - p); gradients go through the same mask; eval is the identity."""

import torch

from hstu.model.dropout import Dropout


def test_cpu_mask_is_uniform_draw_above_p_scaled():
    x = torch.randn(300, 40, requires_grad=True)
    drop = Dropout(0.25).train()
    torch.manual_seed(5)
    y = drop(x)
    torch.manual_seed(5)
    keep = torch.rand_like(x) >= 0.25  # the documented mask, from the same generator state
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, torch.zeros_like(x)), rtol=1e-6, atol=0)
    assert 0.7 < keep.float().mean() < 0.8
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(keep, g / 0.75, torch.zeros_like(g)), rtol=1e-6, atol=0)


def test_eval_and_edge_probabilities_are_nn_dropout():
    x = torch.randn(50, 8)
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_half_precision_mask_is_drawn_in_float32():
    # a bfloat16 uniform has 8 bits of mantissa: its P(u >= p) would be off p; drawn in float32
    x = torch.ones(400, 100, dtype=torch.bfloat16)
    torch.manual_seed(9)
    y = Dropout(0.3).train()(x)
    torch.manual_seed(9)
    keep = torch.rand(x.shape, dtype=torch.float32) >= 0.3
    assert y.dtype == torch.bfloat16
    assert torch.equal(y != 0, keep)
    assert torch.equal(y[keep], torch.full_like(y[keep], 1 / 0.7))
