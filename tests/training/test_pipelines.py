"""Train pipelines that really overlap (2 gloo processes, the trainer itself).

For the ranking and retrieval debug presets with row-wise sharded tables (uniform and
in-batch negatives) and for a dynamic item table, ``native`` must pipeline the sharded
collection (TorchRec runs its input distribution for the next batch during this step) and
give the losses of ``none`` exactly. The prefetch pipeline must find the sharding plan of a
model whose table uses a caching kernel.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_multiprocess
from tests.training.test_distributed import _trainer

DYNAMIC_ITEM = [
    'item/DynamicEmbeddingArgs.table_name="item"',
    'item/DynamicEmbeddingArgs.feature_names=["item_id"]',
    "item/DynamicEmbeddingArgs.item_vocab_size_or_capacity=100000",
    "item/DynamicEmbeddingArgs.item_vocab_gpu_capacity=4096",
]

CASES = {
    "ranking": ("ranking", []),
    "retrieval-uniform": ("retrieval", ['RetrievalArgs.negative_sampling="uniform"',
                                        "RetrievalArgs.num_negatives=16"]),
    "retrieval-in-batch": ("retrieval", ['RetrievalArgs.negative_sampling="in_batch"']),
    "retrieval-dynamic-item": ("retrieval", ['RetrievalArgs.negative_sampling="uniform"',
                                             "RetrievalArgs.num_negatives=16", *DYNAMIC_ITEM]),
}


def _run(rank: int, world_size: int, tmp: str, task: str, tag: str, params: list[str]) -> None:
    from hstu.training.pipeline import pipelined_module_names

    trainer, _env = _trainer(task, tmp, tag, [
        "TrainerArgs.max_train_iters=20", "TrainerArgs.eval_interval=10",
        "TrainerArgs.train_batch_size=8", *params,
    ])
    try:
        trainer.train()
        losses = torch.tensor(trainer.losses, dtype=torch.float64)
        dist.all_reduce(losses)
        names = pipelined_module_names(trainer.pipeline)
        stats = {}
        for m in trainer.model.sparse.modules():
            for name, remapper in getattr(m, "remappers", {}).items():
                stats[name] = remapper.stats()
        # after training the tables answer other lookups (the final evaluation's, an export's):
        # the pipeline has given the sharded modules their own forwards back
        items = None
        if task == "retrieval":
            trainer.model.eval()
            with torch.no_grad():
                items = trainer.model.lookup_items(torch.arange(1, 41))
            assert items.shape[0] == 40, items.shape
        if rank == 0:
            torch.save({"losses": losses.tolist(), "pipelined": names, "remap": stats,
                        "items": items}, os.path.join(tmp, f"{tag}.pt"))
    finally:
        trainer.close()  # the process group is torn down by the test harness, once the trainer is gone


# the default tier pipelines ranking and uniform-negative retrieval; the other retrieval
# cases (in-batch, dynamic item table) run in the slow tier
SLOW_CASES = {"retrieval-in-batch", "retrieval-dynamic-item"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in sorted(CASES)]
)
def test_native_pipelines_the_sharded_tables_and_matches_none(tmp_path, case) -> None:
    task, params = CASES[case]
    tmp = str(tmp_path)
    out = {}
    for pipeline in ("none", "native"):
        run_multiprocess(_run, world_size=2, tmp=tmp, task=task, tag=pipeline,
                         params=[*params, f'TrainerArgs.pipeline_type="{pipeline}"'])
        out[pipeline] = torch.load(os.path.join(tmp, f"{pipeline}.pt"))
    assert out["none"]["pipelined"] == []
    assert out["native"]["pipelined"], "native pipelined no sharded module"
    assert all(n.startswith("sparse.") for n in out["native"]["pipelined"])
    assert len(out["none"]["losses"]) == 20
    assert out["native"]["losses"] == out["none"]["losses"]
    if task == "retrieval":
        assert torch.equal(out["native"]["items"], out["none"]["items"])
    if case == "retrieval-dynamic-item":
        stats = out["native"]["remap"]["item"]
        assert stats["admitted_total"] > 0
        # only real history ids are admitted: never more than the dataset's items (800),
        # whereas 16 uniform negatives per query over 100k raw ids would flood the table
        assert stats["occupied"] <= 801, stats
        # native has read (and remapped) two batches beyond the last step; none has not
        assert out["native"]["remap"]["item"]["step"] == out["none"]["remap"]["item"]["step"] + 2


def test_prefetch_finds_the_plan_of_a_caching_kernel() -> None:
    """The sharding plan lives on each HstuEmbeddings' DistributedModelParallel (.ec.plan);
    built here for a GPU topology on CPU (the kernel itself does not run)."""
    from torch import nn
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    from hstu.embeddings.collection import HstuEmbeddings, TableSpec
    from hstu.model.model import GenerativeRecommender
    from hstu.training.pipeline import _prefetch_supported, sharding_kernels

    def model_with(kernel: str) -> nn.Module:
        ec = EmbeddingCollection(tables=[EmbeddingConfig(
            name="item", embedding_dim=8, num_embeddings=1000, feature_names=["item"])])
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=2, compute_device="cuda"),
            constraints={"item": ParameterConstraints(
                sharding_types=["row_wise"], compute_kernels=[kernel])},
        )
        plan = planner.plan(ec, [EmbeddingCollectionSharder()])

        class Planned(nn.Module):  # what DistributedModelParallel exposes: .plan
            def __init__(self) -> None:
                super().__init__()
                self.plan = plan

        spec = TableSpec("item", ("item",), 1000, 8, False, "model_parallel")
        emb = HstuEmbeddings(Planned(), None, [spec], {}, seed=0)
        return GenerativeRecommender(emb, nn.Linear(1, 1))

    cached = model_with("fused_uvm_caching")
    assert sharding_kernels(cached) == {"item": "fused_uvm_caching"}
    assert _prefetch_supported(cached, cuda=True) == (True, "")
    ok, why = _prefetch_supported(cached, cuda=False)
    assert not ok and "no GPU" in why
    plain = model_with("fused")
    ok, why = _prefetch_supported(plain, cuda=True)
    assert not ok and "no table uses a caching kernel" in why and "fused" in why
