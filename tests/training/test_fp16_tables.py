"""float16 with embedding tables, at trainer level: the tables' optimizers (TorchRec's fused
FBGEMM one for the sharded item table, the in-backward one of the replicated action table)
must step on the gradient of the unscaled loss, and an overflowing step must leave the
tables as they were (no inf written into rows) while the dense step is skipped."""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist_utils import run_multiprocess
from tests.training.helpers import debug_trainer

# plain SGD everywhere: a step is lr * gradient, so a gradient 65,536x too large shows as such
# (rowwise Adagrad would hide it: its first step barely depends on the gradient's scale)
PARAMS = [
    "TrainerArgs.max_train_iters=1", "TrainerArgs.log_interval=1",
    "TrainerArgs.eval_interval=1000", "TrainerArgs.max_eval_iters=1",
    'TrainerArgs.pipeline_type="none"', "NetworkArgs.hidden_dropout=0.0",
    'OptimizerArgs.optimizer_str="sgd"', "OptimizerArgs.learning_rate=0.1",
    'OptimizerArgs.sparse_optimizer_str="sgd"', "OptimizerArgs.sparse_learning_rate=0.5",
    "OptimizerArgs.clip_grad_norm=0.0",
]


def _tables(model) -> dict[str, torch.Tensor]:
    """Every table's weight (one process: the whole table), as float32 copies."""
    from hstu.embeddings import embedding_state_dict

    out = {}
    for key, value in embedding_state_dict(model).items():
        if not key.endswith(".weight"):
            continue
        shards = value.local_shards() if hasattr(value, "local_shards") else None
        t = torch.cat([s.tensor.flatten() for s in shards]) if shards else value.flatten()
        out[key] = t.detach().float().clone()
    return out


def _run(rank: int, world_size: int, tmp: str, tag: str, dtype: str, scale: float | None) -> None:
    trainer = debug_trainer(
        "ranking", tmp, os.path.join(tmp, tag), [f'NetworkArgs.dtype_str="{dtype}"', *PARAMS]
    )
    try:
        opt = trainer.optimizer
        if scale is not None:
            opt.scaler.scale = scale
        dense = {n: p.detach().float().clone() for n, p in trainer.model.dense_module.named_parameters()}
        before = _tables(trainer.model)
        trainer.train()
        after = _tables(trainer.model)
        moved = {n: (p.detach().float() - dense[n]) for n, p in trainer.model.dense_module.named_parameters()}
        out = {
            "tables": {k: after[k] - before[k] for k in before},
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "dense": moved,
            "scale": opt.scaler.scale if opt.scaler is not None else None,
            "skipped": opt.scaler.skipped_steps if opt.scaler is not None else None,
        }
        torch.save(out, os.path.join(tmp, f"{tag}.pt"))
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("fp16"))
    out = {}
    for tag, dtype, scale in (("f32", "float32", None), ("f16", "float16", None),
                              ("overflow", "float16", 2.0**100)):
        run_multiprocess(_run, world_size=1, tmp=tmp, tag=tag, dtype=dtype, scale=scale)
        out[tag] = torch.load(os.path.join(tmp, f"{tag}.pt"))
    return out


def test_float16_tables_step_on_the_unscaled_gradient(runs) -> None:
    f32, f16 = runs["f32"], runs["f16"]
    names = sorted(f32["tables"])
    assert any("item" in n for n in names) and any("action" in n for n in names), names
    for name in names:
        want, got = f32["tables"][name], f16["tables"][name]
        assert want.norm() > 0, f"{name}: the float32 step did not move the table"
        ratio = float(got.norm() / want.norm())
        # float16 activations change the gradient by ~1e-3; the loss scale is 65,536
        assert 0.97 < ratio < 1.03, f"{name}: float16 step is {ratio:.4g}x the float32 one"
        cos = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
        assert cos > 0.995, f"{name}: float16 step points elsewhere (cosine {cos:.4f})"
    assert f16["skipped"] == 0 and f16["finite"]


def test_float16_overflow_skips_the_step_and_leaves_tables_untouched(runs) -> None:
    run = runs["overflow"]
    assert run["skipped"] == 1 and run["scale"] == 2.0**99
    assert run["finite"], "an overflowing step wrote a non-finite value into a table"
    for name, delta in run["tables"].items():
        assert torch.count_nonzero(delta) == 0, f"{name}: moved on an overflowing step"
    for name, delta in run["dense"].items():
        assert torch.count_nonzero(delta) == 0, f"dense {name}: moved on an overflowing step"


# ------------------------------------------- an overflow in the dense part only, per sharding
# Each case places the item and user tables (the ranking preset's action and segment tables
# stay data_parallel in every case); the fused CPU optimizer is row-wise Adagrad (FBGEMM has
# no CPU Adam), so each table has optimizer state to check.
SHARDING_CASES = {
    "data_parallel": {"item": "data_parallel", "user_id": "data_parallel"},
    "table_wise": {"item": "table_wise", "user_id": "table_wise"},
    "row_wise": {"item": "row_wise", "user_id": "row_wise"},
    "column_wise": {"item": "column_wise", "user_id": "column_wise"},
    "dynamic": {},
}


def _local_state(trainer) -> dict[str, torch.Tensor]:
    """This rank's part of every table, its optimizer state and step counters (copies)."""
    from hstu.embeddings import embedding_state_dict
    from hstu.training.checkpoint import state_tensors

    out = {}
    for key, value in embedding_state_dict(trainer.model).items():
        for i, t in enumerate(state_tensors(value)):
            out[f"{key}#{i}"] = t.detach().clone()
    for i, part in enumerate(trainer.optimizer.table_guard.kernels):
        out[f"fused_iter#{i}"] = part.tbe.iter.detach().clone()
    return out


def _overflow_cases(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.pipeline import build_pipeline
    from tests.training.test_checkpoint_sharding import WIDE, _table_params, offered
    from tests.training.test_distributed import _trainer
    from tests.training.test_pipelines import DYNAMIC_ITEM

    results = {}
    for case, shardings in SHARDING_CASES.items():
        if case == "column_wise" and "column_wise" not in offered():
            results[case] = "not offered"
            continue
        params = [
            'NetworkArgs.dtype_str="float16"', 'OptimizerArgs.sparse_optimizer_str="rowwise_adagrad"',
            "NetworkArgs.hidden_dropout=0.0", *_table_params(shardings),
            *(WIDE if case == "column_wise" else []), *(DYNAMIC_ITEM if case == "dynamic" else []),
        ]
        trainer, env = _trainer("ranking", tmp, f"overflow-{case}", params)
        try:
            guard = trainer.optimizer.table_guard
            assert guard is not None and (guard.kernels or case == "data_parallel"), case
            assert guard.replicated, "the preset's action table is data_parallel"
            pipeline = build_pipeline("none", trainer.model, trainer.optimizer, env.device)
            trainer.model.train()
            # the input stage (dynamic tables: ids -> slots, admitting new ids and writing
            # their fresh rows) runs before the step, as the trainer's Feed runs it: what it
            # admitted stays, the step's update is what a skip undoes
            batches = (trainer.model.prepare(b) for _, b in zip(range(2), trainer.built.train_loader))
            first = next(batches)
            dense = [p for p in trainer.model.dense_module.parameters() if p.requires_grad]
            head = dense[-1]
            handle = head.register_hook(lambda g: torch.full_like(g, float("inf")))
            before = _local_state(trainer)
            dense_before = [p.detach().clone() for p in dense]
            pipeline.progress(iter([first]))  # the dense part overflows: the step is skipped
            handle.remove()
            skipped = _local_state(trainer)
            changed = [k for k in before if not torch.equal(before[k], skipped[k])]
            assert not changed, f"{case}: a skipped step changed {changed}"
            assert all(torch.equal(a, p) for a, p in zip(dense_before, dense))
            assert trainer.optimizer.scaler.skipped_steps == 1
            pipeline.progress(batches)  # a clean step does move them (the check can tell)
            clean = _local_state(trainer)
            moved = [k for k in before if not torch.equal(before[k], clean[k])]
            assert any("tables." in k for k in moved), f"{case}: a clean step moved no table"
            assert any("dense_optim" in k and k.split("#")[0].endswith(".step") for k in moved)
            if guard.kernels:
                assert any(k.startswith("fused_iter") for k in moved), moved
                assert any(".momentum1" in k or "sum" in k for k in moved), moved
            results[case] = "ok"
        finally:
            trainer.close()
    if rank == 0:
        torch.save(results, os.path.join(tmp, "overflow.pt"))


@pytest.fixture(scope="module")
def overflow_cases(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("fp16-overflow"))
    run_multiprocess(_overflow_cases, world_size=2, tmp=tmp)
    return torch.load(os.path.join(tmp, "overflow.pt"))


@pytest.mark.parametrize("case", list(SHARDING_CASES))
def test_dense_overflow_skips_every_table_bitwise(overflow_cases, case) -> None:
    """2 processes, float16, an inf in one dense gradient only: the step leaves every table,
    its optimizer state and the step counters (the fused kernels' device counter, the
    replicated tables' step) as they were, under each sharding type."""
    from tests.training.test_checkpoint_sharding import _skip_reason

    if overflow_cases[case] == "not offered":
        pytest.skip(_skip_reason(case))
    assert overflow_cases[case] == "ok"


# ------------------------------------------------ Adam-family tables: the skip and the count
# Adam's update reads its step count (bias correction), so a skipped step must leave the
# count as it was, or every later update of the table differs. The replicated tables'
# RowSparseOptimizer keeps the count on the device (the skip restores it with torch.where,
# no host read); FBGEMM's fused Adam takes it from a host counter (GPU only: one named read).
ADAM_REPLICATED = [
    'NetworkArgs.dtype_str="float16"', 'OptimizerArgs.sparse_optimizer_str="adam"',
    "NetworkArgs.hidden_dropout=0.0",
    'item/EmbeddingArgs.feature_names=["item_id"]', 'item/EmbeddingArgs.table_name="item"',
    'item/EmbeddingArgs.sharding_type="data_parallel"',
    'user/EmbeddingArgs.feature_names=["user_id"]', 'user/EmbeddingArgs.table_name="user_id"',
    'user/EmbeddingArgs.sharding_type="data_parallel"',
]


def _adam_runs(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.pipeline import build_pipeline
    from tests.training.test_distributed import _trainer

    out = {}
    for run in ("overflow_then_clean", "clean_only"):
        trainer, env = _trainer("ranking", tmp, run, ADAM_REPLICATED)
        try:
            guard = trainer.optimizer.table_guard
            kinds = {r.opt.param_groups[0]["kind"] for r in guard.replicated}
            assert kinds == {"adam"} and not guard.kernels and not guard.host_step, kinds
            pipeline = build_pipeline("none", trainer.model, trainer.optimizer, env.device)
            trainer.model.train()
            loader = iter(trainer.built.train_loader)
            first, second = (trainer.model.prepare(next(loader)) for _ in range(2))
            scaler = trainer.optimizer.scaler
            if run == "overflow_then_clean":
                head = [p for p in trainer.model.dense_module.parameters() if p.requires_grad][-1]
                handle = head.register_hook(lambda g: torch.full_like(g, float("inf")))
                pipeline.progress(iter([first]))  # skipped: tables, states and counts as before
                handle.remove()
                assert scaler.skipped_steps == 1
            else:
                scaler.scale = scaler.scale / 2  # the scale the skip leaves behind
            pipeline.progress(iter([second]))
            state = _local_state(trainer)
            state.update({f"dense.{n}": p.detach().clone()
                          for n, p in trainer.model.dense_module.named_parameters()})
            out[run] = state
        finally:
            trainer.close()
    torch.save(out, os.path.join(tmp, "adam.pt"))


def test_adam_tables_after_a_skipped_step_equal_a_run_without_it(tmp_path) -> None:
    """float16, Adam on replicated tables: an overflowing batch then a clean one gives every
    table, its Adam moments and step count, and the dense weights bitwise what the clean batch
    alone gives (at the loss scale the skip left): the skip undid the step count too."""
    run_multiprocess(_adam_runs, world_size=1, tmp=str(tmp_path))
    runs = torch.load(os.path.join(tmp_path, "adam.pt"))
    skipped, clean = runs["overflow_then_clean"], runs["clean_only"]
    assert sorted(skipped) == sorted(clean)
    # the replicated tables' optimizer state ("dense_optim": their dense kernel)
    steps = [k for k in clean if k.split("#")[0].endswith(".step") and "dense_optim" in k]
    assert len(steps) == 4 and all(int(clean[k]) == 1 for k in steps), {k: clean[k] for k in steps}
    assert any(".exp_avg_sq" in k for k in clean), sorted(clean)
    differ = [k for k in clean if not torch.equal(skipped[k], clean[k])]
    assert not differ, f"a skipped step left a trace in {differ}"


class _FusedAdamKernel(torch.nn.Module):
    """What the table guard reads of an FBGEMM kernel with fused Adam (FBGEMM builds no Adam
    kernel on a CPU): one table's weight and moments, the device counter ``iter`` and the host
    counter ``iter_cpu`` its forward reads the step from."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = "adam"
        self.feature_table_map = [0]
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.randn(10, 4, generator=gen)
        self.moments = [torch.zeros(10, 4), torch.zeros(10, 4)]
        self.iter = torch.zeros(1, dtype=torch.int64)
        self.iter_cpu = torch.zeros(1, dtype=torch.int64)

    def split_embedding_weights(self) -> list[torch.Tensor]:
        return [self.weight]

    def split_optimizer_states(self) -> list[list[torch.Tensor]]:
        return [self.moments]

    def forward_and_backward(self, rows: torch.Tensor) -> None:
        """FBGEMM's order: the forward counts the step on both counters, the backward
        updates the looked-up rows."""
        self.iter_cpu.add_(1)
        self.iter.add_(1)
        for x in (self.weight, *self.moments):
            x.index_add_(0, rows, torch.ones(rows.numel(), 4))


@pytest.mark.parametrize("overflow", [True, False])
def test_fused_adam_skip_winds_the_host_counter_back_with_its_one_named_read(overflow) -> None:
    from hstu.sync_audit import sync_audit
    from hstu.training.optimizer import FUSED_ADAM_SKIP, TableStepGuard, _TbeRows
    from tests.training.test_sync_audit import KNOWN_SITES

    kernel = _FusedAdamKernel()
    guard = TableStepGuard.__new__(TableStepGuard)  # its __init__ finds TorchRec's kernels
    guard.kernels, guard.replicated, guard._handles = [_TbeRows(kernel)], [], []
    guard.host_step = guard.kernels[0].host_step
    assert guard.host_step
    before = [t.clone() for t in (kernel.weight, *kernel.moments, kernel.iter, kernel.iter_cpu)]
    rows = torch.tensor([1, 4, 4, 7])
    guard.kernels[0].take(rows, torch.tensor([0, 4]))
    kernel.forward_and_backward(rows)
    with sync_audit(sites=KNOWN_SITES) as audit:
        guard.restore(torch.tensor([1.0 if overflow else 0.0]))
    assert [e.reason for e in audit.events] == [FUSED_ADAM_SKIP]
    after = [kernel.weight, *kernel.moments, kernel.iter, kernel.iter_cpu]
    same = [torch.equal(a, b) for a, b in zip(before, after)]
    assert same == [overflow] * 5, same
