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
    base = {"optimizer_str": "adam", "learning_rate": 1.0}
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
    opt = OptimizerContainer([p], args, total_steps=10)
    assert opt.lr == 0.5
    p.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 1
    opt.step()
    assert float(opt.last_grad_norm) == pytest.approx(5.0)
    assert torch.allclose(p.detach(), torch.tensor([-0.3, -0.4, 0.0]))  # lr 0.5 x clipped grad
    assert opt.lr == 1.0 and opt.num_steps == 1
    state = opt.state_dict()
    fresh = OptimizerContainer([p], args, total_steps=10)
    fresh.load_state_dict(state)
    assert fresh.num_steps == 1 and fresh.lr == 1.0


def test_weight_decay_reaches_the_optimizer():
    p = torch.nn.Parameter(torch.ones(2))
    args = _args(optimizer_str="adamw", weight_decay=0.1)
    opt = build_dense_optimizer([p], args)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1


def _ddp_world_mean(rank: int, world_size: int) -> None:
    """The dense DDP hook: sum over the DP group divided by the world size."""
    from hstu.training.ddp import wrap_dense

    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 1, bias=False)
    ddp = wrap_dense(lin, dist.group.WORLD, world_size)
    x = torch.full((1, 2), float(rank + 1))  # grads: ranks 1 and 2 -> mean 1.5
    ddp(x).sum().backward()
    assert torch.allclose(lin.weight.grad, torch.full((1, 2), 1.5)), lin.weight.grad


def test_ddp_hook_averages_gradients_over_the_world():
    run_multiprocess(_ddp_world_mean, world_size=2)


def _tp_clip(rank: int, world_size: int) -> None:
    """One norm over the TP group: shards on every rank, replicated parameters once."""
    shard = torch.nn.Parameter(torch.zeros(2))
    shard.tensor_model_parallel = True
    replicated = torch.nn.Parameter(torch.zeros(1))
    args = _args(optimizer_str="sgd", clip_grad_norm=1.0)
    opt = OptimizerContainer([shard, replicated], args, 10, tp_group=dist.group.WORLD)
    shard.grad = torch.tensor([3.0, 0.0]) if rank == 0 else torch.tensor([0.0, 4.0])
    replicated.grad = torch.tensor([12.0])  # the same on both ranks: counted once
    opt.step()
    assert float(opt.last_grad_norm) == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    assert torch.allclose(replicated.detach(), torch.tensor([-12.0 / 13.0]), atol=1e-6)


def test_clipping_uses_one_norm_over_the_tensor_parallel_group():
    run_multiprocess(_tp_clip, world_size=2)


@pytest.mark.parametrize("schedule", ["constant", "follow"])
def test_lr_scale_multiplies_dense_and_table_rates(schedule):
    """set_lr_scale (online training's StreamArgs.stream_lr_scale): the dense LR and every
    table's LR times the factor from the next step on, with either table schedule; the
    schedule itself (warm-up) still applies."""
    from hstu.embeddings.optim import RowSparseOptimizer

    p = torch.nn.Parameter(torch.zeros(3))
    table = torch.nn.Parameter(torch.zeros(4, 2))
    rows = RowSparseOptimizer([table], "adam", lr=0.2)
    args = _args(optimizer_str="sgd", lr_warmup_iters=2, sparse_lr_schedule=schedule)
    opt = OptimizerContainer([p], args, total_steps=10, sparse_replicated=[rows])
    table_lr = (lambda lr: 0.2 * lr) if schedule == "follow" else (lambda lr: 0.2)
    assert opt.lr == 0.5 and rows.param_groups[0]["lr"] == pytest.approx(table_lr(0.5))
    opt.set_lr_scale(0.25)
    assert opt.lr == pytest.approx(0.125)
    assert rows.param_groups[0]["lr"] == pytest.approx(table_lr(0.5) * 0.25)
    p.grad = torch.ones(3)
    opt.step()  # the update used the scaled rate
    assert torch.allclose(p.detach(), torch.full((3,), -0.125))
    assert opt.lr == pytest.approx(0.25)  # past the warm-up: 1.0 x 0.25
    assert rows.param_groups[0]["lr"] == pytest.approx(table_lr(1.0) * 0.25)
    opt.set_lr_scale(1.0)
    assert opt.lr == 1.0 and rows.param_groups[0]["lr"] == pytest.approx(table_lr(1.0))
