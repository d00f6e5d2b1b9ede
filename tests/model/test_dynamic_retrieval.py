"""Retrieval over a dynamic item table (negative_sampling="sampled_live"): the corrected
sampled softmax against a direct computation, the draws over the live rows, evaluation over
exactly the live items against a brute-force ranking, the refusals, and short trainer runs
on 1 and 2 gloo processes with a table smaller than the catalogue (evictions happen)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from hstu.embeddings.dynamic import DynamicIdRemapper
from hstu.ops.losses import LossInputs
from hstu.ops.losses.strategies import sampled_live
from tests.dist_utils import run_multiprocess

# ------------------------------------------------------------------------------ the loss


def _reference_loss(queries, pos_vectors, pos_ids, neg_vectors, neg_ids, batch_ids, draws,
                    live, temperature, correct=True, mask=True, history=None) -> float:
    """The loss written out query by query, column by column (``history``: per query, the ids
    left out of its negatives)."""
    def log_q(item: int) -> float:
        return math.log(sum(int(b) == item for b in batch_ids) + draws / live)

    total = 0.0
    for q in range(queries.shape[0]):
        pos = float(queries[q] @ pos_vectors[q]) / temperature
        if correct:
            pos -= log_q(int(pos_ids[q]))
        logits = [pos]
        for j in range(neg_vectors.shape[0]):
            if mask and int(neg_ids[j]) == int(pos_ids[q]):
                continue
            if history is not None and int(neg_ids[j]) in history[q]:
                continue
            s = float(queries[q] @ neg_vectors[j]) / temperature
            logits.append(s - log_q(int(neg_ids[j])) if correct else s)
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - pos
    return total / queries.shape[0]


def test_sampled_live_loss_is_logits_minus_log_q_with_the_positive_left_out():
    torch.manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)
    queries, pos_vectors = unit(5), unit(5)
    pos_ids = torch.tensor([3, 7, 3, 9, 2])  # slot 3 twice: counted twice in the batch
    key_ids = torch.tensor([7, 11, 11, 4])  # a draw of 7 (a positive), 11 drawn twice
    key_vectors = unit(4)
    key_vectors[1] = key_vectors[2]  # a repeated draw is the same row
    pos_vectors[2] = pos_vectors[0]
    live, temperature = 13, 0.3
    x = LossInputs(queries, pos_ids, pos_vectors, temperature, 4, True, None, 1, torch.float64,
                   key_ids=key_ids, key_vectors=key_vectors, live_rows=live)
    loss, (pos_logits, neg_logits) = sampled_live(x)
    neg_vectors, neg_ids = torch.cat([pos_vectors, key_vectors]), torch.cat([pos_ids, key_ids])
    args = (queries, pos_vectors, pos_ids, neg_vectors, neg_ids, pos_ids, 4, live, temperature)
    want = _reference_loss(*args)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    # the correction and the positive's exclusion both change the value here
    assert abs(_reference_loss(*args, correct=False) - want) > 1e-3
    assert abs(_reference_loss(*args, mask=False) - want) > 1e-3
    # every column of a query's positive id is out of its softmax (its own in-batch copy too)
    assert neg_logits.shape == (5, 9)
    assert torch.isneginf(neg_logits[1, [1, 5]]).all() and torch.isneginf(neg_logits[0, [0, 2]]).all()
    assert torch.isneginf(neg_logits[3]).tolist() == [j == 3 for j in range(9)]
    # the positive's own correction: log(2 copies in the batch + 4 draws / 13 live rows)
    raw = float(queries[0] @ pos_vectors[0]) / temperature
    assert float(pos_logits[0]) == pytest.approx(raw - math.log(2 + 4 / 13), rel=1e-12)
    # gradients reach the queries, the positives and the drawn rows
    for t in (queries, pos_vectors, key_vectors):
        t.requires_grad_(True)
    x = LossInputs(queries, pos_ids, pos_vectors, temperature, 4, True, None, 1, torch.float64,
                   key_ids=key_ids, key_vectors=key_vectors, live_rows=live)
    sampled_live(x)[0].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (queries, pos_vectors, key_vectors))


def test_sampled_live_leaves_each_querys_history_out_of_its_negatives():
    """RetrievalArgs.exclude_history_from_loss: query q (position j of its sample, predicting
    item j + 1) drops every negative column whose id is among items 0..j of the sample (repeats
    of an id in the negatives included), never its target's own column."""
    from hstu.ops.losses import HistoryWindow

    torch.manual_seed(2)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)
    # two samples of items [3, 7, 4, 7, 9] and [4, 11, 3]: queries at positions 0..3 and 0..1
    items = torch.tensor([3, 7, 4, 7, 9, 4, 11, 3])
    starts = torch.tensor([0, 0, 0, 0, 5, 5])
    positions = torch.tensor([0, 1, 2, 3, 0, 1])
    pos_ids = items[starts + positions + 1]  # [7, 4, 7, 9, 11, 3]
    queries, pos_vectors = unit(6), unit(6)
    key_ids = torch.tensor([4, 3, 13, 3])  # 3 drawn twice
    key_vectors = unit(4)
    key_vectors[3] = key_vectors[1]
    window = HistoryWindow(items, starts, positions + 1, width=5)
    x = LossInputs(queries, pos_ids, pos_vectors, 0.3, 4, True, None, 1, torch.float64,
                   key_ids=key_ids, key_vectors=key_vectors, live_rows=20, history_mask=window)
    loss, (_, neg_logits) = sampled_live(x)
    history = [set(items[s:s + p + 1].tolist()) for s, p in zip(starts.tolist(), positions.tolist())]
    neg_vectors, neg_ids = torch.cat([pos_vectors, key_vectors]), torch.cat([pos_ids, key_ids])
    args = (queries, pos_vectors, pos_ids, neg_vectors, neg_ids, pos_ids, 4, 20, 0.3)
    assert float(loss) == pytest.approx(_reference_loss(*args, history=history), rel=1e-12)
    assert abs(_reference_loss(*args) - float(loss)) > 1e-3  # the exclusion matters here
    # query 2 (history 3, 7, 4; target 7): columns of 3 and 4 out, 7 out as its positive
    want = [i in (3, 4, 7) for i in neg_ids.tolist()]
    assert torch.isneginf(neg_logits[2]).tolist() == want


def test_targets_not_admitted_are_neither_targets_nor_negatives():
    """Admission (DynamicEmbeddingArgs.admit_min_count): a target without a row has id -1 and
    target_kept False: its query adds nothing (the mean is over the others) and its in-batch
    column is no one's negative; the loss is that of the other queries alone, with no column
    of id -1, and the left-out rows get no gradient. Under sampled_live and in_batch."""
    from hstu.ops.losses.strategies import in_batch

    torch.manual_seed(3)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)
    queries, pos_vectors = unit(6), unit(6)
    pos_ids = torch.tensor([3, -1, 7, 3, -1, 9])
    pos_vectors[pos_ids < 0] = 0.0  # a miss's embedding: zeroed
    key_ids, key_vectors = torch.tensor([7, 11, 4]), unit(3)
    kept = pos_ids >= 0
    for t in (queries, pos_vectors, key_vectors):
        t.requires_grad_(True)
    x = LossInputs(queries, pos_ids, pos_vectors, 0.3, 3, True, None, 1, torch.float64,
                   key_ids=key_ids, key_vectors=key_vectors, live_rows=17, target_kept=kept)
    loss, (_, neg_logits) = sampled_live(x)
    q, p = queries.detach()[kept], pos_vectors.detach()[kept]
    neg_vectors = torch.cat([pos_vectors, key_vectors]).detach()
    neg_ids = torch.cat([pos_ids, key_ids])
    real = neg_ids >= 0
    want = _reference_loss(q, p, pos_ids[kept], neg_vectors[real], neg_ids[real], pos_ids, 3, 17,
                           0.3)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    assert torch.isneginf(neg_logits[kept][:, ~real]).all()
    loss.backward()
    assert float(queries.grad[~kept].abs().sum()) == 0.0 and queries.grad[kept].abs().sum() > 0
    assert float(pos_vectors.grad[~kept].abs().sum()) == 0.0
    # in-batch negatives only (sampled_softmax_loss): the same rule
    x = LossInputs(queries.detach(), pos_ids, pos_vectors.detach(), 0.3, -1, True, None, 1,
                   torch.float64, target_kept=kept)
    loss, _ = in_batch(x)
    want = _reference_loss(q, p, pos_ids[kept], p, pos_ids[kept], pos_ids, 0, 1, 0.3, correct=False)
    assert float(loss) == pytest.approx(want, rel=1e-12)


def test_the_model_leaves_targets_not_admitted_out_of_the_global_mean():
    """RetrievalModel.forward with a miss mask on the item feature in training (what
    admission gives): the loss is the mean over the other queries (the count of the global
    mean leaves them out), their columns are no one's negative, and they are counted."""
    from dataclasses import replace

    from tests.model.helpers import make_batch
    from tests.model.test_models import _retrieval

    model = _retrieval(-1).train()  # in-batch negatives
    batch = make_batch([[1, 2, 3, 4], [5, 6], [7]])
    # items 3 and 6 not admitted: the targets of queries 1 and 3 (of 0..3)
    miss = torch.tensor([False, False, True, False, False, True, False])
    loss, (pos_logits, neg_logits) = model(replace(batch, lookup_misses={"item": miss}))
    kept = torch.tensor([True, False, True, False])
    per_query = torch.logsumexp(torch.cat([pos_logits.unsqueeze(1), neg_logits], 1), 1) - pos_logits
    assert float(loss.detach()) == pytest.approx(float(per_query[kept].mean()), rel=1e-6)
    assert torch.isneginf(neg_logits[kept][:, ~kept]).all()
    assert model.take_not_admitted_targets() == 2 and model.take_not_admitted_targets() == 0
    loss.backward()
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------ the draws


def _filled_remapper() -> DynamicIdRemapper:
    r = DynamicIdRemapper("item", capacity=8)
    r.train()
    r(torch.tensor([5, 1, 900, 42]))
    r(torch.tensor([7, 8, 9, 10, 11, 12]))  # 10 ids for 8 rows: two evicted
    return r


def test_live_draws_are_uniform_over_occupied_rows_read_only_and_seeded():
    r = _filled_remapper()
    assert int(r.num_evicted) == 2 and int(r.occupied.sum()) == 8
    before = {k: v.clone() for k, v in r.state_dict().items()}
    held = r.slot_ids[r.occupied]
    assert sorted(held.tolist()) == [7, 8, 9, 10, 11, 12, 42, 900]  # LRU evicted 1 and 5
    slots, ids, live = r.draw_live(4000, seed=3, min_id=9)
    assert live == 6  # 7 and 8 are below min_id
    assert torch.equal(r.slot_ids[slots], ids) and bool(r.occupied[slots].all())
    assert set(ids.tolist()) == {9, 10, 11, 12, 42, 900}
    counts = torch.bincount(slots, minlength=8)[r.occupied & (r.slot_ids >= 9)].double()
    assert float(counts.min()) > 4000 / 6 * 0.85 and float(counts.max()) < 4000 / 6 * 1.15
    for k, v in r.state_dict().items():  # nothing admitted, nothing touched
        assert torch.equal(v, before[k]), k
    again = r.draw_live(4000, seed=3, min_id=9)
    assert torch.equal(again[0], slots)
    assert not torch.equal(r.draw_live(4000, seed=4, min_id=9)[0], slots)
    assert r.live_ids(9).tolist() == [9, 10, 11, 12, 42, 900]
    r(torch.tensor([9]))  # the next step (same live set) draws other rows
    assert not torch.equal(r.draw_live(4000, seed=3, min_id=9)[0], slots)


# -------------------------------------------------------------- evaluation over live items


def test_rank_corpus_over_given_items_equals_brute_force():
    """rank_corpus(items=...) against the direct ranking over exactly those items: a target
    outside them is a miss (inf), the history (excluded) never counts, the top-k are ids."""
    from types import SimpleNamespace

    from hstu.training.evaluate import rank_corpus

    torch.manual_seed(1)
    table = torch.nn.functional.normalize(torch.randn(60, 5), dim=1)
    table[17] = table[23]  # a tie with another live item
    items = torch.tensor([2, 5, 9, 17, 23, 31, 40, 41, 44, 58])
    dense = SimpleNamespace(num_items=60, min_item_id=1,
                            normalise=lambda x: torch.nn.functional.normalize(x, dim=-1))
    model = SimpleNamespace(dense_module=dense, lookup_items=lambda ids: table[ids])
    queries = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    targets = torch.tensor([17, 3, 44, 23, 58, 9])  # 3 is not live
    hist_ids = torch.tensor([5, 9, 23, 2, 40, 9, 12])  # query 5's target is in its history
    hist_rows = torch.tensor([0, 0, 0, 2, 2, 5, 5])
    ranks, (top_scores, top_ids) = rank_corpus(
        model, (queries, targets, hist_ids, hist_rows), 1 << 10, torch.device("cpu"), top_k=3,
        items=items)
    def score(q: int, i: int) -> float:
        # each row copied to its own aligned buffer: the planted tie stays an exact tie (a dot
        # product over rows at different alignments may sum in another order on some CPUs)
        return float(queries[q].clone() @ table[i].clone())

    want = []
    for q in range(6):
        excluded = set(hist_ids[hist_rows == q].tolist())
        t = int(targets[q])
        if t not in items.tolist() or t in excluded:
            want.append(math.inf)
            continue
        s_t = score(q, t)
        ahead = sum(1 for i in items.tolist()
                    if i != t and i not in excluded and score(q, i) >= s_t)
        want.append(1.0 + ahead)
        order = sorted((i for i in items.tolist() if i not in excluded),
                       key=lambda i: (-score(q, i), i))
        assert top_ids[q].tolist() == order[:3], q
        want_top = torch.stack([queries[q] @ table[i] for i in order[:3]])
        torch.testing.assert_close(top_scores[q], want_top)
    assert ranks.tolist() == want
    assert math.isinf(want[1]) and math.isinf(want[5]) and want[0] >= 2  # the tie counts


# ------------------------------------------------------------------------------ refusals


def test_full_corpus_refusal_names_sampled_live_and_a_static_table_is_refused_for_it():
    from hstu.args import RetrievalArgs
    from hstu.model.builder import ModelDataInfo, build_model
    from hstu.validation import ConfigError
    from tests.embeddings.common import build, optimizer, tables
    from tests.model.test_models import _net

    emb, _ = build(tables(dynamic_capacity=16), optimizer("rowwise_adagrad"), sharded=False)
    dynamic = ModelDataInfo(num_items=20, item_feature_name="c", max_item_seqlen=8, min_item_id=1)
    static = ModelDataInfo(num_items=20, item_feature_name="a", max_item_seqlen=8, min_item_id=1)
    full = RetrievalArgs(negative_sampling="full_corpus", temperature=0.1)
    with pytest.raises(ConfigError) as info:
        build_model("retrieval", _net(), full, emb, dynamic)
    line = str(info.value)
    assert "\n" not in line and "RetrievalArgs.negative_sampling" in line
    assert "negative_sampling='sampled_live'" in line and "dynamic item table 'tc'" in line
    live = RetrievalArgs(negative_sampling="sampled_live", num_negatives=4, temperature=0.1)
    with pytest.raises(ConfigError, match=r"RetrievalArgs\.negative_sampling.*'ta' is static") as info:
        build_model("retrieval", _net(), live, emb, static)
    assert "\n" not in str(info.value)
    model = build_model("retrieval", _net(), live, emb, dynamic)
    assert model.item_remapper() is emb.remappers["tc"]
    with pytest.raises(ConfigError, match="must be > 0 with negative_sampling='sampled_live'"):
        RetrievalArgs(negative_sampling="sampled_live", num_negatives=-1)


# ------------------------------------------------------------------------ trainer runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPACITY = 720
PARAMS = [
    'item/DynamicEmbeddingArgs.feature_names=["item_id"]', 'item/DynamicEmbeddingArgs.table_name="item"',
    f"item/DynamicEmbeddingArgs.item_vocab_size_or_capacity={CAPACITY}",
    'item/DynamicEmbeddingArgs.evict_strategy="lru"',
    'RetrievalArgs.negative_sampling="sampled_live"', "RetrievalArgs.num_negatives=32",
    "TrainerArgs.max_train_iters=80", "TrainerArgs.eval_interval=1000", "TrainerArgs.log_interval=1",
    'TrainerArgs.pipeline_type="none"', "TrainerArgs.max_eval_iters=2",
    "RetrievalArgs.temperature=0.1",
]


def _train_and_dump(rank: int, world_size: int, tmp: str, tag: str, params: list[str]) -> None:
    import torch.distributed as dist

    from hstu.training.evaluate import _own_queries, evaluate, rank_corpus
    from tests.training.test_distributed import _trainer

    trainer, env = _trainer("retrieval", tmp, tag, params)
    try:
        model = trainer.model
        remapper = model.item_remapper()
        assert remapper is not None and remapper.capacity == CAPACITY
        trainer.train()
        losses = torch.tensor(trainer.losses, dtype=torch.float64)
        dist.all_reduce(losses)
        losses /= world_size
        live = model.live_items()
        every = [None] * world_size
        dist.all_gather_object(every, live)
        assert all(torch.equal(e, live) for e in every)  # the table's state is replicated
        cfg, loader = trainer.cfg, trainer.built.eval_loader
        metrics = evaluate(model, loader, cfg, env, None)  # the whole split: the same samples
        out = {"losses": losses.tolist(), "live": live, "metrics": metrics,
               "evicted": int(remapper.num_evicted), "num_items": trainer.built.info.num_items,
               "slot_ids": remapper.slot_ids.clone()}
        if world_size == 1:  # evaluation against a brute-force ranking over the live items
            loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batch_index": 0})
            model.eval()
            queries, targets, hist_ids, hist_rows = _own_queries(
                model, loader, env, None, True)
            ranks, _ = rank_corpus(model, (queries, targets, hist_ids, hist_rows), 1 << 20,
                                   env.device, items=live)
            vectors = model.dense_module.normalise(model.lookup_items(live))
            scores = queries @ vectors.t()  # [n, L]
            want = torch.full((queries.shape[0],), math.inf)
            for q in range(queries.shape[0]):
                t = int(targets[q])
                excluded = torch.isin(live, hist_ids[hist_rows == q])
                if t not in live.tolist() or bool(torch.isin(torch.tensor([t]), hist_ids[hist_rows == q])):
                    continue
                s_t = scores[q, int(torch.searchsorted(live, t))]
                want[q] = 1 + int(((scores[q] >= s_t) & ~excluded).sum()) - 1
            out["ranks"], out["brute_ranks"] = ranks, want
            out["outside"] = int((~torch.isin(targets, live)).sum())
            with pytest.raises(ValueError, match="not live rows of the dynamic item table"):
                model.catalogue(torch.tensor([int(live[0]), 10**9]))
        if rank == 0:
            torch.save(out, os.path.join(tmp, f"{tag}.pt"))
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dynret"))
    os.environ.setdefault("HSTU_CPU_CLAIMS_FILE", os.path.join(tmp, "cpu-claims"))
    run_multiprocess(_train_and_dump, world_size=1, tmp=tmp, tag="one",
                     params=[*PARAMS, "TrainerArgs.train_batch_size=8"])
    run_multiprocess(_train_and_dump, world_size=2, tmp=tmp, tag="two",
                     params=[*PARAMS, "TrainerArgs.train_batch_size=4"])
    return {t: torch.load(os.path.join(tmp, f"{t}.pt")) for t in ("one", "two")}


def test_one_process_trains_and_evaluates_over_the_live_items(runs):
    one = runs["one"]
    assert one["num_items"] > CAPACITY and one["evicted"] > 0
    losses = one["losses"]
    assert len(losses) == 80
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5, losses
    assert 0 < one["live"].numel() <= CAPACITY
    ranked = torch.isfinite(one["brute_ranks"])
    assert int(ranked.sum()) > 5 and one["outside"] > 0  # some targets are not live
    assert torch.equal(one["ranks"], one["brute_ranks"])
    m = one["metrics"]
    assert 0 < m["HR@10"] <= 1 and m["MRR"] > 0
    # a missed target counts in the denominator: HR@10 is over every evaluated query
    n = one["ranks"].numel()
    assert m["HR@10"] == pytest.approx(float((one["ranks"] <= 10).sum()) / n, abs=1e-6)


def test_two_processes_take_the_one_process_steps(runs):
    """2 ranks of 8 samples against 1 of 16: the same global batches, the same replicated
    table (admissions of the global batch), the same draws (a function of the table's state
    and the seed), in-batch negatives gathered from both ranks: the same losses up to float
    order, the same live items, and evaluation over them equal up to float order."""
    one, two = runs["one"], runs["two"]
    assert torch.equal(one["slot_ids"], two["slot_ids"]) and torch.equal(one["live"], two["live"])
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert two["metrics"].keys() == one["metrics"].keys()
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, abs=1e-6), k


# ------------------------------------------------------------------------ the online loop


@pytest.mark.slow
def test_online_windows_are_evaluated_over_the_live_items(tmp_path):
    """The stream (60 items, a 48-row table, LRU): each window's queries are ranked over the
    items the table holds when the window arrives. Before the first window the table is
    empty: every target is a miss (HR 0, the window's events still counted); afterwards the
    table is full and evicting, and the model finds targets among its rows."""
    from hstu.data.data_args import SyntheticDataArgs
    from hstu.data.preprocess import preprocess
    from tests.training.test_online import DYNAMIC, run, stream_by_window

    preprocess("synthetic", out=tmp_path, verbose=False, synthetic=SyntheticDataArgs(
        num_users=40, num_items=60, min_length=10, max_length=30, seed=3))
    (tmp_path / "synthetic").rename(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    run(tmp_path / "tiny", run_dir, "retrieval", [
        *DYNAMIC, 'RetrievalArgs.negative_sampling="sampled_live"', "RetrievalArgs.num_negatives=16"])
    windows = stream_by_window(run_dir)
    first, *later = (windows[k] for k in sorted(windows))
    assert first["eval_events"] > 0 and first["HR@10"] == 0.0 and first["NDCG@10"] == 0.0
    assert len(later) >= 3 and all(w["item_occupied"] == 48 for w in later)
    assert later[-1]["item_evicted"] > 0
    assert max(w["HR@10"] for w in later) > 0.1
