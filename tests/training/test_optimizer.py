"""LR schedule, clipping and data-parallel averaging of the optimizer container."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from hstu.args import OptimizerArgs
from hstu.training.optimizer import OptimizerContainer, build_dense_optimizer, lr_at
from tests.dist_utils import run_multiprocess


def _args(**kw) -> OptimizerArgs:
    base = dict(optimizer_str="adam", learning_rate=1.0)
    base.update(kw)
    return OptimizerArgs(**base)


def test_constant_by_default():
    args = _args()
    assert [lr_at(s, args, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_linear_warmup_then_cosine_to_floor():
    args = _args(lr_warmup_iters=4, lr_decay_style="cosine", min_learning_rate=0.1)
    assert [lr_at(s, args, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, args, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, args, 14) == pytest.approx(0.1)
    assert lr_at(40, args, 14) == pytest.approx(0.1)


def test_linear_decay_uses_lr_decay_iters_over_total():
    args = _args(lr_decay_style="linear", lr_decay_iters=10)
    assert lr_at(5, args, 1000) == pytest.approx(0.5)
    assert lr_at(10, args, 1000) == pytest.approx(0.0)


def test_container_steps_schedule_and_clips():
    p = torch.nn.Parameter(torch.zeros(3))
    args = _args(optimizer_str="sgd", lr_warmup_iters=2, clip_grad_norm=1.0)
    opt = OptimizerContainer(build_dense_optimizer([p], args), args, total_steps=10)
    assert opt.lr == 0.5
    p.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 1
    opt.step()
    assert opt.last_grad_norm == pytest.approx(5.0)
    assert torch.allclose(p.detach(), torch.tensor([-0.3, -0.4, 0.0]))  # lr 0.5 x clipped grad
    assert opt.lr == 1.0 and opt.num_steps == 1
    state = opt.state_dict()
    fresh = OptimizerContainer(build_dense_optimizer([p], args), args, total_steps=10)
    fresh.load_state_dict(state)
    assert fresh.num_steps == 1 and fresh.lr == 1.0


def test_weight_decay_reaches_the_optimizer():
    p = torch.nn.Parameter(torch.ones(2))
    args = _args(optimizer_str="adamw", weight_decay=0.1)
    opt = build_dense_optimizer([p], args)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1


def _dp_average(rank: int, world_size: int) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    args = _args(optimizer_str="sgd")
    opt = OptimizerContainer(build_dense_optimizer([p], args), args, 10,
                             allreduce_groups=[([p], dist.group.WORLD, world_size)])
    p.grad = torch.full((2,), float(rank + 1))  # ranks: 1 and 2 -> mean 1.5
    opt.step()
    assert torch.allclose(p.detach(), torch.full((2,), -1.5)), p


def test_gradients_are_averaged_over_the_data_parallel_group():
    run_multiprocess(_dp_average, world_size=2)
