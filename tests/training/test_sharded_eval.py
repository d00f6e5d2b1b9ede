"""Full-corpus retrieval evaluation with the catalogue sharded over the ranks: 2 gloo
processes give the metrics of 1 process exactly, and 1 process gives the ranks of the
model's own batch-by-batch ranking (RetrievalModel.evaluate), top-k included, with small
item blocks (many blocks per rank) and the history excluded."""

from __future__ import annotations

import os

import pytest
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
            out["reference_metrics"] = acc.compute(stderr=True)
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


@pytest.mark.slow  # 2-process trainer runs: about a minute on 2 shared cores
def _means(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("stderr/")}


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
    # means exactly; standard errors (sums of squares added in another order) to rounding
    assert _means(one["metrics"]) == _means(one["reference_metrics"])
    assert one["metrics"] == pytest.approx(one["reference_metrics"], rel=1e-12)
    assert set(one["metrics"]) == set(one["reference_metrics"])
    assert one["metrics"]["MRR"] > 0
    assert _means(two["metrics"]) == _means(one["metrics"])
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-12)


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


@pytest.mark.slow  # 2-process trainer runs: about a minute on 2 shared cores
def test_eval_subset_is_a_fixed_seeded_set_of_users(tmp_path) -> None:
    """eval_num_users: exactly N of the split's users, the same on every rank and at every call
    for one seed, another set for another seed; each rank's loader serves its share of them
    only, every one once; 0 or N >= the split keeps the loader."""
    from hstu.args import DatasetArgs
    from hstu.data import build_data
    from hstu.data.data_args import SyntheticDataArgs
    from hstu.data.preprocess import preprocess
    from hstu.training.evaluate import eval_subset

    preprocess("synthetic", out=tmp_path, verbose=False,
               synthetic=SyntheticDataArgs(num_users=103, num_items=60, min_length=3, max_length=30))
    data = DatasetArgs(dataset_name="synthetic", max_sequence_length=8,
                       dataset_path=str(tmp_path / "synthetic"), shuffle=False)

    def users(rank, world, n, seed):
        _, ev, _ = build_data(data, "retrieval", 16, 16, rank, world, 0)
        loader, used, total = eval_subset(ev, n, seed)
        seen = []
        for batch in loader:
            keep = batch.sample_mask if batch.sample_mask is not None else torch.ones(batch.batch_size, dtype=torch.bool)
            seen += [1] * int(keep.sum())
        return loader.samples.user.tolist(), seen, used, total

    a, seen, used, total = users(0, 1, 20, 7)
    assert (used, total) == (20, 103) and len(set(a)) == 20 and len(seen) == 20
    assert users(0, 1, 20, 7)[0] == a and users(0, 1, 20, 8)[0] != a
    r0, s0, _, _ = users(0, 2, 20, 7)
    r1, s1, _, _ = users(1, 2, 20, 7)
    assert r0 == r1 == a and len(s0) + len(s1) == 20  # each user once over the ranks
    _, ev, _ = build_data(data, "retrieval", 16, 16, 0, 1, 0)
    assert eval_subset(ev, 0, 7)[0] is ev and eval_subset(ev, 500, 7)[0] is ev


def _streamed_and_held(rank: int, world_size: int, tmp: str) -> None:
    import hstu.training.evaluate as ev

    trainer, env = _trainer("retrieval", tmp, "streamed", PARAMS)
    try:
        model, loader = trainer.model, trainer.built.eval_loader
        own = ev._own_queries(model, loader, env, None, True)
        budget = 4096  # below a slice's vectors (the same block grid in both runs)
        lookups: list[int] = []
        real = model.lookup_items
        model.lookup_items = lambda ids: lookups.append(ids.numel()) or real(ids)
        ev._LOOKUP_CHUNK = 7  # several lookups per block, uneven counts across the ranks
        ev._streams = lambda items, dim, budget_bytes: False
        held, held_top = ev.rank_corpus(model, own, budget, env.device, top_k=10)
        held_lookups, lookups[:] = len(lookups), []
        ev._streams = lambda items, dim, budget_bytes: items * dim * 4 > budget_bytes
        # each block looked up when it is scored: once per pass (target scores, then counts)
        streamed, streamed_top = ev.rank_corpus(model, own, budget, env.device, top_k=10)
        assert torch.equal(streamed, held)
        assert torch.equal(streamed_top[0], held_top[0]) and torch.equal(streamed_top[1], held_top[1])
        assert max(lookups) <= 7 and len(lookups) >= 2 * held_lookups > 4, (len(lookups), held_lookups)
        counts = [None] * world_size
        torch.distributed.all_gather_object(counts, len(lookups))
        assert len(set(counts)) == 1, counts  # collective: the same number on every rank
    finally:
        trainer.close()


def test_a_slice_over_the_budget_is_streamed_with_the_same_ranks(tmp_path) -> None:
    """RetrievalArgs.eval_memory_mb below a rank's slice of the catalogue: its blocks are looked
    up as they are scored (no copy of the slice), with the same ranks and top-k."""
    run_multiprocess(_streamed_and_held, world_size=2, tmp=str(tmp_path))
