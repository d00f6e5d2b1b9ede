"""Trainer-level gradient semantics under TP and DP (2 gloo processes) against one process.

For one global batch, TP=2 x DP=1, TP=1 x DP=2 and TP=1 x DP=1 must take the same step:
the same losses and the same final weights (dense and tables), with clipping on and the
options users turn on (Adam or SGD; uniform, in-batch and mixed negatives). With dropout,
the parameters replicated over a TP group must stay bitwise identical while the sharded
activations' dropout masks differ between the TP ranks; DP ranks draw their own dropout
stream (TrainerArgs.dropout_per_rank) or, with it off, the same one.
"""

from __future__ import annotations

import functools
import operator
import os
import time

import pytest
import torch
import torch.distributed as dist

from hstu.model.tensor_parallel import unshard_uvqk
from tests.dist_utils import run_multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trainer(task: str, tmp: str, tag: str, params: list[str]):
    import gin

    from hstu.config import load_config
    from hstu.training.distributed import init_distributed, set_seed
    from hstu.training.trainer import Trainer

    gin.clear_config()
    cfg = load_config(
        os.path.join(ROOT, "configs", f"debug_{task}.gin"),
        [
            f'TrainerArgs.run_dir="{os.path.join(tmp, tag)}"',
            f'DatasetArgs.dataset_path="{os.path.join(tmp, "data", "synthetic")}"',
            "TrainerArgs.log_interval=1",
            "TrainerArgs.eval_interval=1000",
            "TrainerArgs.max_eval_iters=1",
            *params,
        ],
        task=task,
        world_size=dist.get_world_size(),
    )
    env = init_distributed(cfg.tp.tensor_model_parallel_size)
    set_seed(cfg.trainer.seed)
    run_dir = os.path.join(tmp, f"{tag}_rank{env.rank}")
    return Trainer(cfg, env, run_dir, ""), env


def _full_dense(model, env) -> dict[str, torch.Tensor]:
    """The dense weights as one process would hold them (TP shards gathered)."""
    dense = model.dense_module
    out = {}
    for name, p in dense.named_parameters():
        t = p.detach().float()
        if env.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(env.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=env.tp_group)
            if name.endswith(("uvqk.weight", "uvqk.bias")):
                layer = dense.block.layers[0]
                t = unshard_uvqk(parts, layer.num_heads, layer.head_dim)
            elif name.endswith("output.weight"):
                t = torch.cat(parts, dim=1)
            else:
                t = torch.cat(parts, dim=0)
        out[name] = t
    return out


def _tables(model, info) -> dict[str, torch.Tensor]:
    """Every row of the item table, looked up through the (sharded) sparse module."""
    ids = torch.arange(info.num_items)
    return {"item": model.lookup_items(ids).detach().clone()} if hasattr(model, "lookup_items") else {}


def _train_and_dump(
    rank: int, world_size: int, tmp: str, task: str, tag: str, params: list[str],
    host_cores: list[int] | None = None,
) -> None:
    trainer, env = _trainer(task, tmp, tag, params)
    try:
        if host_cores is not None and len(host_cores) >= world_size > 1:
            # CPU ranks on one host each run on their own cores (hstu.training.cpu_placement)
            mine = sorted(os.sched_getaffinity(0))
            every = [None] * world_size
            dist.all_gather_object(every, mine)
            assert all(every) and set(functools.reduce(operator.iadd, every, [])) <= set(host_cores), every
            assert len(set(functools.reduce(operator.iadd, every, []))) == sum(len(c) for c in every), every  # disjoint
        trainer.train()
        dense = _full_dense(trainer.model, env)
        tables = _tables(trainer.model, trainer.built.info)
        # a rank's loss is its share of the global mean: the world mean is the step's loss
        losses = torch.tensor(trainer.losses, dtype=torch.float64)
        dist.all_reduce(losses)
        losses /= world_size
        # full corpus: whether this run's corpus was split over the ranks (vocab-parallel)
        source = getattr(trainer.model.dense_module, "corpus_source", None)
        with torch.no_grad():
            split = None if source is None else source().split
        if rank == 0:
            torch.save({"losses": losses.tolist(), "dense": dense, "tables": tables, "split": split},
                       os.path.join(tmp, f"{tag}.pt"))
    finally:
        trainer.close()  # the process group is torn down by the test harness, once the trainer is gone


# (a temperature of 0.05 and large SGD steps make the runs chaotic: float noise of 3e-8
# after one step grows past 1e-5 in 20; these settings keep it near 1e-7)
_SGD = [
    'OptimizerArgs.optimizer_str="sgd"', "OptimizerArgs.learning_rate=0.1",
    'OptimizerArgs.sparse_optimizer_str="sgd"', "OptimizerArgs.sparse_learning_rate=0.02",
    "RetrievalArgs.temperature=0.2",
]
CASES = {
    # task, batch per process of the 2-process runs, extra gin
    "ranking-adam": ("ranking", 8, ['OptimizerArgs.optimizer_str="adam"']),
    "retrieval-sgd": ("retrieval", 8, [
        *_SGD, 'RetrievalArgs.negative_sampling="uniform"', "RetrievalArgs.num_negatives=8",
    ]),
    # in-batch negatives: every rank's queries score the positives of all ranks (gathered,
    # with gradients back to their rank: hstu.ops.gather), as one process scores its
    # whole batch's; a rank's own positives only would be half of them
    "retrieval-in_batch": ("retrieval", 8, [*_SGD, 'RetrievalArgs.negative_sampling="in_batch"']),
    # items narrower than hidden_size: the query projection runs on the TP group's rows
    # before each rank takes its own (its gradient then holds the group's losses)
    "retrieval-narrow_items": ("retrieval", 8, [
        *_SGD, 'RetrievalArgs.negative_sampling="in_batch"', "NetworkArgs.item_embedding_dim=8",
    ]),
    "retrieval-mixed": ("retrieval", 8, [
        *_SGD, 'RetrievalArgs.negative_sampling="mixed"', "RetrievalArgs.num_negatives=4",
    ]),
    # the full corpus over a row-wise item table: each rank scores every rank's queries against
    # its own rows (hstu.ops.losses.vocab_parallel), the history of each query left out; the
    # table's rows learn from the whole world's queries through row-wise Adagrad, once a step
    "retrieval-full_corpus": ("retrieval", 8, [
        *_SGD, 'OptimizerArgs.sparse_optimizer_str="rowwise_adagrad"',
        'RetrievalArgs.negative_sampling="full_corpus"', "RetrievalArgs.num_negatives=-1",
        "RetrievalArgs.exclude_history_from_loss=True", 'RetrievalArgs.full_corpus_matmul_dtype="float32"',
        'item/EmbeddingArgs.feature_names=["item_id"]', 'item/EmbeddingArgs.table_name="item"',
        'item/EmbeddingArgs.sharding_type="model_parallel"', 'item/EmbeddingArgs.sharding_override="row_wise"',
    ]),
}
COMMON = ["TrainerArgs.max_train_iters=20", 'TrainerArgs.pipeline_type="none"',
          "OptimizerArgs.clip_grad_norm=0.05", "NetworkArgs.hidden_dropout=0.0"]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _close_table(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """A table after 20 steps: each rank's row gradient is a sum over its own samples that
    TorchRec's all-to-all then adds and halves, where one process sums once, so the rows
    differ by float order; bounded at 1e-4 of the table's largest value (measured: at most
    3.5e-6 on a table of values up to ~3e-2, retrieval-narrow_items)."""
    _close(a, b, what, atol=max(1e-6, 1e-4 * float(b.abs().max())))


# the default tier: ranking with Adam, and retrieval with the full-corpus softmax; in-batch
# (every rank scores the world's positives), uniform and mixed negatives in the slow tier
SLOW_CASES = {"retrieval-sgd", "retrieval-mixed", "retrieval-narrow_items", "retrieval-in_batch"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in sorted(CASES)]
)
def test_tp2_dp2_and_one_process_take_the_same_steps(tmp_path, monkeypatch, case) -> None:
    task, per_rank, extra = CASES[case]
    tmp = str(tmp_path)
    # the ranks' placement is checked below: a claims file of this test's own, so that another
    # hstu job on the host (which would rightly keep both unpinned) cannot fail it
    monkeypatch.setenv("HSTU_CPU_CLAIMS_FILE", os.path.join(tmp, "cpu-claims"))
    params = COMMON + extra
    run_multiprocess(_train_and_dump, world_size=1, tmp=tmp, task=task, tag="ref",
                     params=params + [f"TrainerArgs.train_batch_size={2 * per_rank}"])
    for tag, tp in (("dp2", 1), ("tp2", 2)):
        run_multiprocess(_train_and_dump, world_size=2, tmp=tmp, task=task, tag=tag,
                         host_cores=sorted(os.sched_getaffinity(0)),
                         params=params + [f"TrainerArgs.train_batch_size={per_rank}",
                                          f"TensorModelParallelArgs.tensor_model_parallel_size={tp}"])
    ref = torch.load(os.path.join(tmp, "ref.pt"))
    assert len(ref["losses"]) == 20 and ref["losses"][-1] < ref["losses"][0]
    if "full_corpus" in case:  # one process holds the whole table; two split it
        assert ref["split"] is False
    for tag in ("dp2", "tp2"):
        got = torch.load(os.path.join(tmp, f"{tag}.pt"))
        if "full_corpus" in case:
            assert got["split"] is True, f"{tag}: the row-wise item table was not split"
        _close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), f"{tag} losses")
        assert got["dense"].keys() == ref["dense"].keys()
        for name, value in ref["dense"].items():
            _close(got["dense"][name], value, f"{tag} {name}")
        for name, value in ref["tables"].items():
            _close_table(got["tables"][name], value, f"{tag} table {name}")


def _dropout_case(rank: int, world_size: int, tmp: str) -> None:
    trainer, env = _trainer("ranking", tmp, "drop", COMMON[:-1] + [
        "NetworkArgs.hidden_dropout=0.2", "TrainerArgs.train_batch_size=8",
        "TensorModelParallelArgs.tensor_model_parallel_size=2", "NetworkArgs.num_layers=2",
    ])
    masks: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    block = trainer.model.dense_module.block
    block.layers[0].dropout.register_forward_hook(lambda m, i, o: masks.append((o == 0) & (i[0] != 0)))
    block.input_dropout.register_forward_hook(lambda m, i, o: inputs.append((o == 0) & (i[0] != 0)))
    try:
        trainer.train()
        group = env.tp_group
        dense = trainer.model.dense_module
        for name, p in dense.named_parameters():
            if getattr(p, "tensor_model_parallel", False):
                continue
            parts = [torch.empty_like(p) for _ in range(2)]
            dist.all_gather(parts, p.detach().contiguous(), group=group)
            assert torch.equal(parts[0], parts[1]), f"replicated {name} differs across the TP group"
        assert masks and inputs
        for what, seen in (("sharded", masks), ("replicated", inputs)):
            mine = torch.cat([m.reshape(-1) for m in seen]).to(torch.uint8)
            parts = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(parts, mine, group=group)
            same = torch.equal(parts[0], parts[1])
            if what == "sharded":
                assert not same, "both TP ranks drew the same dropout mask for their head shards"
                assert 0.1 < mine.float().mean() < 0.3, "the sharded dropout did not drop ~20%"
            else:
                assert same, "the replicated input dropout differs across the TP group"
    finally:
        trainer.close()  # the process group is torn down by the test harness, once the trainer is gone


def test_tp_dropout_masks_differ_per_shard_and_replicas_stay_identical(tmp_path) -> None:
    run_multiprocess(_dropout_case, world_size=2, tmp=str(tmp_path))


def _dp_dropout_case(rank: int, world_size: int, tmp: str, per_rank: bool) -> None:
    """DP=2 without TP: the dropout stream each rank draws its first mask from."""
    trainer, env = _trainer("ranking", tmp, f"dpdrop{per_rank}", COMMON[:-1] + [
        "NetworkArgs.hidden_dropout=0.2", "TrainerArgs.train_batch_size=8",
        "TrainerArgs.max_train_iters=2", f"TrainerArgs.dropout_per_rank={per_rank}",
    ])
    states: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    block = trainer.model.dense_module.block
    # the generator's state as the first dropout of the step draws (the ranks' token counts
    # differ, so their masks have different shapes: the stream itself is compared)
    block.input_dropout.register_forward_pre_hook(
        lambda m, i: states.append(torch.get_rng_state()) if m.training else None
    )
    block.input_dropout.register_forward_hook(
        lambda m, i, o: masks.append((o == 0) & (i[0] != 0)) if m.training else None
    )
    try:
        assert env.dp_size == 2 and env.tp_size == 1
        trainer.train()
        assert len(states) == 2 and masks
        rate = torch.cat([m.reshape(-1) for m in masks]).float().mean()
        assert 0.1 < rate < 0.3, f"the input dropout dropped {rate:.3f}, not ~20%"
        parts = [torch.empty_like(states[0]) for _ in range(2)]
        dist.all_gather(parts, states[0])
        same = torch.equal(parts[0], parts[1])
        if per_rank:
            assert not same, "dropout_per_rank: both DP ranks drew from the same stream"
        else:
            assert same, "dropout_per_rank=False: the DP ranks drew from different streams"
    finally:
        trainer.close()  # the process group is torn down by the test harness, once the trainer is gone


@pytest.mark.parametrize("per_rank", [True, False])
def test_dp_dropout_streams_per_rank_or_shared(tmp_path, per_rank) -> None:
    run_multiprocess(_dp_dropout_case, world_size=2, tmp=str(tmp_path), per_rank=per_rank)


def _overlap_case(rank: int, world_size: int, tmp: str) -> None:
    """Buckets of the dense all-reduce are launched while backward still runs."""
    trainer, _env = _trainer("ranking", tmp, "overlap", COMMON[:-1] + [
        "TrainerArgs.train_batch_size=8", "TrainerArgs.ddp_bucket_cap_mb=0.001",
        "NetworkArgs.num_layers=3", "TrainerArgs.max_train_iters=3",
    ])
    try:
        ddp = trainer.model.dense
        state = ddp.hstu_hook_state
        state.record = True
        # the first layer's input norm gets its gradient last in backward
        last = trainer.model.dense_module.block.layers[0].uvqk.weight
        ready: list[float] = []
        last.register_post_accumulate_grad_hook(lambda p: ready.append(time.perf_counter()))
        trainer.train()
        # DDP's first iteration uses one first bucket; buckets of bucket_cap_mb from then on
        assert len(ready) == 3
        last_step = [(t, b) for t, b in state.launches if t > ready[1]]
        assert len({b for _, b in last_step}) >= 2, "expected several gradient buckets"
        first_launch = min(t for t, _ in last_step)
        assert first_launch < ready[2], (
            "no bucket was launched before backward reached the first layer"
        )
    finally:
        trainer.close()  # the process group is torn down by the test harness, once the trainer is gone


def test_ddp_launches_buckets_during_backward(tmp_path) -> None:
    run_multiprocess(_overlap_case, world_size=2, tmp=str(tmp_path))


_IMPORTS_AFTER_A_RUN = """
import sys
from hstu.cli import main
code = main("retrieval", sys.argv[1:])
print("exit", code)
print("megatron modules:", sorted(m for m in sys.modules if m.split(".")[0] == "megatron"))
"""


def test_a_run_without_tensor_parallelism_never_imports_megatron(tmp_path) -> None:
    # Megatron's package import takes seconds (it compiles its fused helpers); at
    # tensor_model_parallel_size 1 nothing of it is used, so a run must not pay for it.
    import subprocess
    import sys

    argv = [
        "--gin-config-file", os.path.join(ROOT, "configs", "debug_retrieval.gin"),
        "--gin-param", f'TrainerArgs.run_dir="{tmp_path / "run"}"',
        "--gin-param", f'DatasetArgs.dataset_path="{tmp_path / "data" / "synthetic"}"',
        "--gin-param", "TrainerArgs.max_train_iters=2",
    ]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_AFTER_A_RUN, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "exit 0" in proc.stdout, text[-3000:]
    assert "megatron modules: []" in proc.stdout, text[-3000:]


def _megatron_state_of_another_tp_size(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state as ps

    from hstu.training.distributed import init_distributed

    # state left by an earlier run in this process (a notebook, a sweep) with TP 1
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    env = init_distributed(tp_size=2)
    assert (env.tp_size, env.dp_size) == (2, 1)
    assert ps.get_tensor_model_parallel_world_size() == 2, ps.get_tensor_model_parallel_world_size()
    assert (env.tp_rank, env.dp_rank) == (rank, 0)
    t = torch.ones(1)
    dist.all_reduce(t, group=env.tp_group)
    assert t.item() == 2.0


def test_init_distributed_rebuilds_megatron_groups_made_for_another_tp_size() -> None:
    run_multiprocess(_megatron_state_of_another_tp_size, world_size=2)
