"""Full-corpus training wired to the table's own rows (issue 39, item 6): no step's input
carries the catalogue's ids, and the item table's rows take the step today's single lookup
gave them.

- 2 processes, a row-wise item table: the sharded EmbeddingCollection receives, every step,
  a KeyedJaggedTensor whose item values are exactly the batch's ids (no corpus key, no id
  list of the catalogue), and the loss still scores the whole corpus (split over the ranks).
- 1 process: a row-wise (TorchRec, fused row-wise Adagrad in backward) and a data_parallel
  (plain autograd over the weight, the row-sparse Adagrad of hstu.embeddings.optim) item
  table train the same 20 steps. The data_parallel table's corpus is its weight itself, the
  semantics of the earlier path; the row-wise one gets the batch's and the corpus's gradient
  of a row in one fused update only because the batch rows route their gradient into the
  shard's lookup (two updates a step, row-wise Adagrad's accumulator would move twice).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_multiprocess
from tests.training.test_distributed import _tables, _trainer

FULL = ['RetrievalArgs.negative_sampling="full_corpus"', "RetrievalArgs.num_negatives=-1",
        "RetrievalArgs.exclude_history_from_loss=True", 'RetrievalArgs.full_corpus_matmul_dtype="float32"',
        "RetrievalArgs.temperature=0.2", 'TrainerArgs.pipeline_type="none"',
        'OptimizerArgs.sparse_optimizer_str="rowwise_adagrad"', "OptimizerArgs.sparse_learning_rate=0.05",
        'item/EmbeddingArgs.feature_names=["item_id"]', 'item/EmbeddingArgs.table_name="item"']
ROW_WISE = ['item/EmbeddingArgs.sharding_type="model_parallel"', 'item/EmbeddingArgs.sharding_override="row_wise"']
REPLICATED = ['item/EmbeddingArgs.sharding_type="data_parallel"']


def _inputs_of_a_step(rank: int, world_size: int, tmp: str) -> None:
    trainer, _env = _trainer("retrieval", tmp, "kjt", [*FULL, *ROW_WISE, "TrainerArgs.max_train_iters=3",
                                                      "TrainerArgs.train_batch_size=8"])
    try:
        model = trainer.model
        seen, batches, splits = [], [], []
        # training steps only (evaluation looks items up through the same module)
        model.sparse.ec.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if model.training else None)
        model.register_forward_pre_hook(lambda m, args: batches.append(args[0]) if model.training else None)
        source = model.dense_module.corpus_source
        model.dense_module.register_forward_pre_hook(lambda m, args: splits.append(source().split))
        trainer.train()
        num_items = trainer.built.info.num_items
        assert (len(batches), len(seen), splits) == (3, 3, [True] * 3)
        for kjt, batch in zip(seen, batches, strict=True):
            assert list(kjt.keys()) == list(batch.features.keys())
            assert not any(k.endswith("__negatives") for k in kjt.keys()), kjt.keys()  # noqa: SIM118 (a KJT)
            items = kjt["item_id"].values()
            # the batch's tokens of the item feature, nothing else: far fewer than the catalogue
            assert torch.equal(items.cpu(), batch.features["item_id"].values().cpu())
            assert items.numel() == int(batch.features["item_id"].lengths().sum())
            assert items.numel() < num_items - 1
    finally:
        trainer.close()


def test_no_catalogue_ids_in_any_step_input(tmp_path) -> None:
    run_multiprocess(_inputs_of_a_step, world_size=2, tmp=str(tmp_path))


def _one_process(rank: int, world_size: int, tmp: str, tag: str, params: list[str]) -> None:
    trainer, _env = _trainer("retrieval", tmp, tag, [*FULL, *params, "TrainerArgs.max_train_iters=20",
                                                    "TrainerArgs.train_batch_size=16"])
    try:
        tables = _tables(trainer.model, trainer.built.info)
        trainer.train()
        after = _tables(trainer.model, trainer.built.info)
        split = trainer.model.dense_module.corpus_source().split
        tbe = trainer.model.dense_module.corpus_source().tbe
        torch.save({"losses": trainer.losses, "start": tables["item"], "end": after["item"], "tbe": tbe,
                    "split": split}, os.path.join(tmp, f"{tag}.pt"))
    finally:
        trainer.close()
    assert dist.get_world_size() == 1


def test_row_wise_table_takes_the_replicated_table_s_steps(tmp_path) -> None:
    tmp = str(tmp_path)
    run_multiprocess(_one_process, world_size=1, tmp=tmp, tag="rw", params=ROW_WISE)
    run_multiprocess(_one_process, world_size=1, tmp=tmp, tag="dp", params=REPLICATED)
    rw, dp = torch.load(os.path.join(tmp, "rw.pt")), torch.load(os.path.join(tmp, "dp.pt"))
    assert rw["tbe"] and not dp["tbe"] and not rw["split"] and not dp["split"]
    torch.testing.assert_close(rw["start"], dp["start"], rtol=0, atol=0)
    assert not torch.equal(rw["end"], rw["start"])
    torch.testing.assert_close(torch.tensor(rw["losses"]), torch.tensor(dp["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rw["end"], dp["end"], rtol=1e-5, atol=1e-6)


def test_full_corpus_with_a_dynamic_item_table_is_refused_in_one_line():
    """A dynamic item table's rows are slots, not the catalogue: building a full-corpus model on
    it is refused naming the field; on a static item table of the same collection it builds."""
    import pytest

    from hstu.args import RetrievalArgs
    from hstu.model.builder import ModelDataInfo, build_model
    from hstu.validation import ConfigError
    from tests.embeddings.common import build, optimizer, tables
    from tests.model.test_models import _net

    emb, _ = build(tables(dynamic_capacity=16), optimizer("rowwise_adagrad"), sharded=False)
    args = RetrievalArgs(negative_sampling="full_corpus", temperature=0.1)
    for item, refused in (("c", True), ("a", False)):
        data = ModelDataInfo(num_items=20, item_feature_name=item, max_item_seqlen=8, min_item_id=1)
        if refused:
            with pytest.raises(ConfigError, match=r"RetrievalArgs\.negative_sampling.*dynamic item table 'tc'") as info:
                build_model("retrieval", _net(), args, emb, data)
            assert "\n" not in str(info.value)
        else:
            model = build_model("retrieval", _net(), args, emb, data)
            shard = model.dense_module.corpus_source()
            assert (shard.start, shard.rows.shape[0], shard.split, shard.tbe) == (1, 19, False, False)


def test_fused_adam_with_a_split_corpus_is_refused_in_one_line() -> None:
    """Several ranks, a model_parallel item table: the batch's item rows would take a second,
    zero-gradient update from TorchRec's lookup; a no-op for row-wise Adagrad, not for Adam."""
    from hstu.args import OptimizerArgs, RetrievalArgs
    from hstu.checks import check_full_corpus_optimizer
    from hstu.validation import ConfigError

    full = RetrievalArgs(negative_sampling="full_corpus", num_negatives=-1)
    adam = OptimizerArgs(optimizer_str="adam", learning_rate=1e-3, sparse_optimizer_str="adam")
    adagrad = OptimizerArgs(optimizer_str="adam", learning_rate=1e-3,
                            sparse_optimizer_str="rowwise_adagrad")
    with pytest.raises(ConfigError, match="sparse_optimizer_str.*'adam'.*full_corpus"):
        check_full_corpus_optimizer(full, adam, "model_parallel", 2)
    check_full_corpus_optimizer(full, adagrad, "model_parallel", 2)
    check_full_corpus_optimizer(full, adam, "data_parallel", 2)
    check_full_corpus_optimizer(full, adam, "model_parallel", 1)
    with pytest.raises(ConfigError, match="sharding_override.*'column_wise'"):
        check_full_corpus_optimizer(full, adagrad, "model_parallel", 2, "column_wise")
    sampled = RetrievalArgs(negative_sampling="uniform", num_negatives=8)
    check_full_corpus_optimizer(sampled, adam, "model_parallel", 2)
