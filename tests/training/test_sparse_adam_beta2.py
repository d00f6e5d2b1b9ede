"""OptimizerArgs.sparse_adam_beta2: the tables' Adam beta2, apart from the dense weights'.

The first step of replicated (data_parallel) tables under lazy Adam sets each touched
row's second moment to (1 - beta2) g^2; two runs from the same seed take the same first-step
gradients, so the tables' second moments must differ by exactly (1 - 0.999) / (1 - 0.98) while
the dense optimizer keeps 0.98 in both. A field that silently did not reach the table would
leave the ratio at 1.
"""

from __future__ import annotations

import os

import pytest
import torch

from hstu.args import OptimizerArgs
from hstu.embeddings import sparse_optimizer_spec
from hstu.validation import ConfigError
from tests.dist_utils import run_multiprocess
from tests.training.test_distributed import _trainer

ADAM = ['OptimizerArgs.sparse_optimizer_str="adam"', "OptimizerArgs.sparse_learning_rate=0.01",
        "OptimizerArgs.adam_beta2=0.98", 'item/EmbeddingArgs.feature_names=["item_id"]',
        'item/EmbeddingArgs.table_name="item"', 'item/EmbeddingArgs.sharding_type="data_parallel"',
        'RetrievalArgs.negative_sampling="full_corpus"', "RetrievalArgs.num_negatives=-1",
        'TrainerArgs.pipeline_type="none"', "TrainerArgs.max_train_iters=1",
        "TrainerArgs.train_batch_size=8", "DatasetArgs.contextual_features=[]"]


def test_spec_takes_the_tables_beta2_and_refuses_what_it_cannot_apply() -> None:
    base = {"optimizer_str": "adam", "learning_rate": 1e-3, "adam_beta2": 0.98}
    for fused, key in ((False, "betas"), (True, "beta2")):
        _, kw = sparse_optimizer_spec(OptimizerArgs(**base, sparse_adam_beta2=0.999), fused=fused)
        assert (kw[key][1] if key == "betas" else kw[key]) == 0.999
        _, kw = sparse_optimizer_spec(OptimizerArgs(**base), fused=fused)
        assert (kw[key][1] if key == "betas" else kw[key]) == 0.98
    with pytest.raises(ConfigError, match=r"sparse_adam_beta2.*\[0, 1\)"):
        OptimizerArgs(**base, sparse_adam_beta2=1.0)
    with pytest.raises(ConfigError, match=r"sparse_adam_beta2.*Adam tables only.*rowwise_adagrad"):
        OptimizerArgs(**base, sparse_adam_beta2=0.999, sparse_optimizer_str="rowwise_adagrad")


def _first_step(rank: int, world_size: int, tmp: str, tag: str, params: list[str]) -> None:
    trainer, _env = _trainer("retrieval", tmp, tag, [*ADAM, *params])
    try:
        trainer.train()
        opts = trainer.optimizer.sparse_replicated  # one per replicated table
        sq = torch.cat([s["exp_avg_sq"].reshape(-1) for o in opts for s in o.state.values()])
        dense_betas = {g["betas"] for g in trainer.optimizer.dense.param_groups}
        torch.save({"sq": sq.clone(), "betas": {o.param_groups[0]["betas"] for o in opts},
                    "dense": dense_betas, "tables": len(opts)}, os.path.join(tmp, f"{tag}.pt"))
    finally:
        trainer.close()


def test_the_tables_second_moment_follows_sparse_adam_beta2(tmp_path) -> None:
    tmp = str(tmp_path)
    run_multiprocess(_first_step, world_size=1, tmp=tmp, tag="shared", params=[])
    run_multiprocess(_first_step, world_size=1, tmp=tmp, tag="own",
                     params=["OptimizerArgs.sparse_adam_beta2=0.999"])
    shared, own = (torch.load(os.path.join(tmp, f"{t}.pt")) for t in ("shared", "own"))
    assert shared["tables"] == own["tables"] >= 1
    assert shared["betas"] == {(0.9, 0.98)} and own["betas"] == {(0.9, 0.999)}
    assert shared["dense"] == own["dense"] == {(0.9, 0.98)}
    touched = shared["sq"] > 0
    assert touched.sum() >= 50 and torch.equal(touched, own["sq"] > 0)
    torch.testing.assert_close(own["sq"][touched], shared["sq"][touched] * (0.001 / 0.02),
                               rtol=1e-4, atol=0.0)
