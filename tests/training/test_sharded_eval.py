"""Full-corpus retrieval evaluation with the catalogue sharded over the ranks: 2 gloo
processes give the metrics of 1 process exactly, and 1 process gives the ranks of the
model's own batch-by-batch ranking (RetrievalModel.evaluate), top-k included, with small
item blocks (many blocks per rank) and the history excluded."""

from __future__ import annotations

import os

import torch

from tests.dist_utils import run_multiprocess
from tests.training.test_distributed import _trainer

PARAMS = [
    "TrainerArgs.eval_batch_size=16",
    # blocks of ~100 items for the ~200 gathered queries: many blocks on every rank
    "RetrievalArgs.eval_memory_mb=1",
    'RetrievalArgs.eval_metrics=("HR@10", "HR@50", "NDCG@10", "MRR")',
]


def _eval_and_dump(rank: int, world_size: int, tmp: str, tag: str, params: list[str]) -> None:
    from hstu.model import MetricAccumulator, retrieval_metrics
    from hstu.training.evaluate import _own_queries, evaluate, rank_corpus

    trainer, env = _trainer("retrieval", tmp, tag, params)
    try:
        cfg, model, loader = trainer.cfg, trainer.model, trainer.built.eval_loader
        out = {"metrics": evaluate(model, loader, cfg, env, None)}
        if world_size == 1:
            names = list(cfg.retrieval.eval_metrics)
            acc = MetricAccumulator(names)
            ranks, top_ids = [], []
            loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batch_index": 0})
            for batch in loader:
                res = model.evaluate(batch, top_k=10)
                keep = batch.sample_mask if batch.sample_mask is not None else slice(None)
                ranks.append(res.target_ranks[keep])
                top_ids.append(res.top_ids[keep])
                acc.update(retrieval_metrics(res.target_ranks[keep], names))
            out["reference_metrics"] = acc.compute()
            out["reference_ranks"] = torch.cat(ranks)
            out["reference_top"] = torch.cat(top_ids)
            loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batch_index": 0})
            own = _own_queries(model, loader, env, None, True)
            out["ranks"], top = rank_corpus(model, own, 1 << 20, env.device, top_k=10)
            out["top"] = top[1]
        weights = model.lookup_items(torch.arange(model.dense_module.num_items)).detach()
        if rank == 0:
            out["weights"] = weights
            torch.save(out, os.path.join(tmp, f"{tag}.pt"))
    finally:
        trainer.close()


def test_two_ranks_evaluate_exactly_as_one(tmp_path, monkeypatch) -> None:
    tmp = str(tmp_path)
    monkeypatch.setenv("HSTU_CPU_CLAIMS_FILE", os.path.join(tmp, "cpu-claims"))
    run_multiprocess(_eval_and_dump, world_size=1, tmp=tmp, tag="one", params=PARAMS)
    run_multiprocess(_eval_and_dump, world_size=2, tmp=tmp, tag="two", params=PARAMS)
    one, two = torch.load(os.path.join(tmp, "one.pt")), torch.load(os.path.join(tmp, "two.pt"))
    assert torch.equal(one["weights"], two["weights"])  # the same model in both layouts
    # the sharded path against the model's own batch-by-batch ranking, sample by sample
    ranked = torch.isfinite(one["reference_ranks"])
    assert int(ranked.sum()) > 10 and bool((one["reference_ranks"][ranked] > 1).any())
    assert torch.equal(one["ranks"], one["reference_ranks"])
    assert torch.equal(one["top"], one["reference_top"])
    assert one["metrics"] == one["reference_metrics"]
    assert one["metrics"]["MRR"] > 0
    assert two["metrics"] == one["metrics"]


def test_popularity_ranks_without_the_item_matrix_equal_the_dense_ones() -> None:
    """count_ranks (sorted scores, no [B, N] matrix) gives ranks_from_scores' ranks: ties
    pessimistic, repeated excluded items counted once, an excluded target unranked, a target
    out of range unranked."""
    from hstu.model.metrics import ranks_from_scores
    from hstu.training.evaluate import count_ranks

    gen = torch.Generator().manual_seed(0)
    n, b = 50, 40
    scores = torch.randint(0, 6, (n,), generator=gen).double()  # many ties
    scores[0] = -1.0
    targets = torch.randint(0, n, (b,), generator=gen)
    targets[:2] = torch.tensor([n, -1])
    rows = torch.randint(0, b, (300,), generator=gen)
    ids = torch.randint(0, n, (300,), generator=gen)
    excluded = torch.zeros(b, n, dtype=torch.bool)
    excluded[rows, ids] = True
    want = ranks_from_scores(scores.expand(b, -1), targets, excluded)
    got = count_ranks(scores, targets, rows, ids)
    assert torch.isinf(want).any() and torch.isfinite(want).sum() > 10
    assert torch.equal(got, want)
