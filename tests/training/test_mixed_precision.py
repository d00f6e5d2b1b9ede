"""Mixed precision: float32 master weights and optimizer state under bf16/fp16 parameters,
float16 loss scaling, and the LR schedule reaching the sparse optimizers."""

from __future__ import annotations

import os

import pytest
import torch

from hstu.args import OptimizerArgs
from hstu.training.optimizer import OptimizerContainer, lr_at
from tests.dist_utils import run_multiprocess
from tests.training.helpers import debug_trainer


def _step(opt: OptimizerContainer, params: list[torch.nn.Parameter], grad: float) -> None:
    opt.zero_grad()
    for p in params:
        p.grad = torch.full_like(p, grad)
    opt.step()


def test_updates_below_bf16_resolution_move_the_master() -> None:
    # bf16 has 8 significant bits: next to 1.0 its spacing is 2**-7 = 0.0078; the update is 1e-4
    args = OptimizerArgs(optimizer_str="sgd", learning_rate=1e-4)
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = OptimizerContainer([p], args, total_steps=None)
    assert opt.master_of(p) is not None and opt.master_of(p).dtype == torch.float32
    _step(opt, [p], 1.0)
    master = opt.master_of(p)
    assert torch.all(master < 1.0) and torch.allclose(master, torch.full((4,), 1 - 1e-4))
    assert torch.all(p == 1.0), "one sub-resolution step cannot show in bf16"
    for _ in range(99):
        _step(opt, [p], 1.0)
    torch.testing.assert_close(opt.master_of(p), torch.full((4,), 0.99), rtol=0, atol=1e-5)
    assert torch.all(p < 1.0), "accumulated in the master, the updates reach the bf16 weight"

    # the same steps straight on the bf16 weight are all lost
    q = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = torch.optim.SGD([q], lr=1e-4)
    for _ in range(100):
        q.grad = torch.ones_like(q)
        plain.step()
    assert torch.all(q == 1.0)


def test_adam_state_is_float32_and_fp32_params_are_their_own_masters() -> None:
    args = OptimizerArgs(optimizer_str="adam", learning_rate=1e-3)
    half = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    full = torch.nn.Parameter(torch.randn(3))
    opt = OptimizerContainer([half, full], args, total_steps=None)
    assert opt.master_of(full) is None
    _step(opt, [half, full], 0.5)
    for state in opt.dense.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert opt.scaler is None


def test_float16_dynamic_loss_scaling_skips_overflow_and_unscales() -> None:
    args = OptimizerArgs(optimizer_str="sgd", learning_rate=0.1)
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    opt = OptimizerContainer([p], args, total_steps=None)
    assert opt.scaler is not None
    scale = opt.scaler.scale
    torch.testing.assert_close(opt.scale_loss(torch.tensor(2.0)), torch.tensor(2.0 * scale))
    # a gradient of scale * 0.5 (what backward of the scaled loss gives) steps by 0.1 * 0.5
    opt.zero_grad()
    p.grad = torch.full_like(p, 0.5 * min(scale, 60000.0))
    opt.scaler.scale = min(scale, 60000.0)
    opt.step()
    torch.testing.assert_close(opt.master_of(p), torch.full((2,), 0.95))
    before = opt.master_of(p).clone()
    opt.zero_grad()
    p.grad = torch.tensor([float("inf"), 1.0], dtype=torch.float16)
    s = opt.scaler.scale
    opt.step()
    assert opt.scaler.scale == s / 2 and opt.scaler.skipped_steps == 1
    assert torch.equal(opt.master_of(p), before), "an overflowing step must not move the weights"


# ------------------------------------------------------------------- trainer level


def _run(rank: int, world_size: int, tmp: str, tag: str, params: list[str]) -> None:
    trainer = debug_trainer(
        "retrieval", tmp, os.path.join(tmp, tag),
        [
            "TrainerArgs.log_interval=1", "TrainerArgs.eval_interval=1000",
            "TrainerArgs.max_eval_iters=1", 'TrainerArgs.pipeline_type="none"',
            *params,
        ],
    )
    try:
        trainer.train()
        out: dict = {"losses": trainer.losses}
        opt = trainer.optimizer
        out["masters"] = {
            name: opt.master_of(p).clone()
            for name, p in trainer.model.dense_module.named_parameters()
            if opt.master_of(p) is not None
        }
        out["sparse_lr"] = [g["lr"] for o in opt.sparse for g in o.param_groups]
        out["replicated_lr"] = [g["lr"] for o in opt.sparse_replicated for g in o.param_groups]
        out["dense_lr"] = opt.lr
        out["step"] = opt.num_steps
        torch.save(out, os.path.join(tmp, f"{tag}.pt"))
    finally:
        trainer.close()  # the process group is torn down by the test harness, once the trainer is gone


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("mp"))
    out = {}
    for dt in ("float32", "bfloat16"):
        run_multiprocess(_run, world_size=1, tmp=tmp, tag=dt, params=[
            f'NetworkArgs.dtype_str="{dt}"', "TrainerArgs.ckpt_save_interval=20",
            f'TrainerArgs.ckpt_save_dir="{os.path.join(tmp, "ckpt_" + dt)}"',
        ])
        out[dt] = torch.load(os.path.join(tmp, f"{dt}.pt"))
    out["tmp"] = tmp
    return out


def test_bf16_run_tracks_float32_and_checkpoints_masters(runs) -> None:
    f32, b16 = runs["float32"], runs["bfloat16"]
    assert len(b16["losses"]) == len(f32["losses"]) == 20
    rel = [abs(a - b) / abs(a) for a, b in zip(f32["losses"], b16["losses"])]
    assert max(rel) < 0.02, f"bf16 losses drift from float32: {rel}"
    assert b16["losses"][-1] < 0.8 * b16["losses"][0], "the bf16 run must learn"
    assert b16["masters"], "bf16 block weights must have float32 masters"
    assert not f32["masters"]
    dense = torch.load(os.path.join(runs["tmp"], "ckpt_bfloat16", "iter_20", "dense_tp0.pt"),
                       weights_only=False)
    for name, master in b16["masters"].items():
        child, key = name.split(".", 1)
        saved = dense["model"][child][key]
        assert saved.dtype == torch.float32, f"{name} saved as {saved.dtype}"
        assert torch.equal(saved, master), f"{name}: the checkpoint must hold the master"


def test_lr_schedule_reaches_the_sparse_optimizers(tmp_path) -> None:
    tmp = str(tmp_path)
    base = ["TrainerArgs.max_train_iters=6", "OptimizerArgs.lr_warmup_iters=10",
            "OptimizerArgs.sparse_learning_rate=0.05", "OptimizerArgs.learning_rate=1e-3"]
    run_multiprocess(_run, world_size=1, tmp=tmp, tag="follow", params=base)
    run_multiprocess(_run, world_size=1, tmp=tmp, tag="constant",
                     params=base + ['OptimizerArgs.sparse_lr_schedule="constant"'])
    follow = torch.load(os.path.join(tmp, "follow.pt"))
    constant = torch.load(os.path.join(tmp, "constant.pt"))
    args = OptimizerArgs(optimizer_str="adam", learning_rate=1e-3, lr_warmup_iters=10)
    factor = lr_at(follow["step"], args, 6) / 1e-3
    assert factor < 1.0
    assert follow["sparse_lr"] and follow["replicated_lr"]
    for lr in follow["sparse_lr"] + follow["replicated_lr"]:
        assert lr == pytest.approx(0.05 * factor)
    for lr in constant["sparse_lr"] + constant["replicated_lr"]:
        assert lr == pytest.approx(0.05)
    assert follow["losses"] != constant["losses"], "the sparse LR must change the training"
