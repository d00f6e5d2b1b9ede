"""Token layout, ranking loss and candidate isolation, retrieval loss and full-corpus eval."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from hstu.args import ConfigError, NetworkArgs, RankingArgs, RetrievalArgs
from hstu.checks import check_ranking_head
from hstu.data.build import DataInfo
from hstu.model.builder import ModelDataInfo, build_model, research_options
from hstu.model.metrics import ranks_from_scores
from hstu.model.ranking import decode_task_labels, ranking_loss
from hstu.model.tokens import TokenBuilder, sequence_inputs
from hstu.ops.losses import sampled_softmax_loss
from tests.model.helpers import TinyEmbeddings, make_batch, ranking_tables, sampler

D = 8


def _net(**kw) -> NetworkArgs:
    base = {
        "num_layers": 2,
        "hidden_size": D,
        "num_attention_heads": 2,
        "kv_channels": 4,
        "hidden_dropout": 0.0,
        "dtype_str": "float32",
        "kernel_backend": "pytorch",
        "num_position_buckets": 64,
    }
    return NetworkArgs(**{**base, **kw})


# --------------------------------------------------------------------------- token layout


def test_token_layout_interleaves_items_and_actions_candidates_last():
    # embeddings that encode their own id: item id k -> [k, 0], action a -> [0, a], user u -> [u, u]
    class Encode(torch.nn.Module):
        def forward(self, kjt):
            from torchrec.sparse.jagged_tensor import JaggedTensor

            out = {}
            for name in kjt.keys():  # noqa: SIM118 (a KeyedJaggedTensor)
                v = kjt[name].values().float()
                z = torch.zeros_like(v)
                cols = {"item": (v, z), "action": (z, v), "user": (v, v)}[name]
                out[name] = JaggedTensor(values=torch.stack(cols, 1), lengths=kjt[name].lengths())
            return out

    batch = make_batch([[11, 12], [21]], [[13, 14], []], [[1, 2], [3]], {"user": [7, 8]})
    inputs = sequence_inputs(batch, Encode()(batch.features))
    builder = TokenBuilder(2, "item", "action", ["user"], {"item": 2, "action": 2, "user": 2})
    tokens = builder(inputs)
    assert tokens.values.tolist() == [
        [7, 7],
        [11, 0],
        [0, 1],
        [12, 0],
        [0, 2],
        [13, 0],
        [14, 0],  # sample 0
        [8, 8],
        [21, 0],
        [0, 3],  # sample 1
    ]
    assert tokens.offsets.tolist() == [0, 7, 10]
    assert tokens.candidate_rows.tolist() == [5, 6]
    # each history item's own token is its query (for the next item), not the action after it
    assert tokens.history_query_rows.tolist() == [1, 3, 8]
    assert tokens.num_targets.tolist() == [2, 0] and tokens.num_contextual.tolist() == [1, 1]
    # contextual tokens take the first item's time, actions their item's
    assert tokens.timestamps.tolist() == [100, 100, 100, 200, 200, 300, 400, 100, 100, 100]


# -------------------------------------------------------------------------- ranking loss


def test_bit_decoding_and_bce_vs_ce_branch():
    labels = torch.tensor([5, 2, 0])  # 101, 010, 000
    assert decode_task_labels(labels, 3).tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [0.2, 0.3, -0.1]])
    # width == num_tasks: sum over tasks of the mean BCE, written out by hand
    expected = 0.0
    for t in range(3):
        per = []
        for i in range(3):
            y = (int(labels[i]) >> t) & 1
            p = 1 / (1 + math.exp(-float(logits[i, t])))
            per.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
        expected += sum(per) / 3
    assert ranking_loss(logits, labels, num_tasks=3).item() == pytest.approx(expected, rel=1e-6)
    # width != num_tasks: the action value is a class index
    ce = ranking_loss(logits, torch.tensor([2, 1, 0]), num_tasks=1)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([2, 1, 0])).item())
    with pytest.raises(ValueError, match="cross-entropy labels"):
        ranking_loss(logits, labels, num_tasks=1)  # 5 is not a class of 3


def _action_info(num_action_values: int | None) -> DataInfo:
    return DataInfo(
        dataset_name="ml-100k", task="ranking", num_items=10, item_feature_name="item",
        action_feature_name="action", contextual_feature_names=[], contextual_vocab_sizes={},
        num_action_values=num_action_values, max_seqlen=8, num_train_samples=1,
        num_eval_samples=1,
    )


def test_bce_head_on_class_valued_actions_is_refused():
    # ratings 0..4 with a 1-wide head: BCE on bit 0, the rating's parity
    with pytest.raises(ConfigError) as info:
        check_ranking_head(_action_info(5), RankingArgs(prediction_head_arch=[16, 1]))
    assert str(info.value) == (
        "RankingArgs.prediction_head_arch: last width 1 == RankingArgs.num_tasks trains task t "
        "on bit t of the action value, but the ml-100k actions are 5 classes in [0, 5), not a "
        "bitmask (bit 0 of a class is its parity); end the head in 5 for cross-entropy over the "
        "classes"
    )
    with pytest.raises(ConfigError, match=r"10 classes in \[0, 10\)"):  # ML-20M half stars
        check_ranking_head(_action_info(10), RankingArgs(prediction_head_arch=[16, 3], num_tasks=3))
    accepted = [
        (5, [16, 5], 1),  # cross-entropy over the classes
        (256, [16, 8], 8),  # KuaiRand: the 8 flags of the bitmask
        (256, [16, 3], 3),  # ... or its lowest 3
        (2, [16, 1], 1),  # a binary label is its own bit
        (3, [16, 2], 2),  # values that fit the tasks' bits
        (None, [16, 1], 1),  # no actions
    ]
    for values, arch, tasks in accepted:
        head = RankingArgs(prediction_head_arch=arch, num_tasks=tasks)
        check_ranking_head(_action_info(values), head)
    check_ranking_head(_action_info(5), None)  # retrieval


def _ranking_model(arch=(6, 2), num_tasks=2, target_group_size=1):
    data, emb = ranking_tables(40, 4, 5, D, 4, seed=0)
    return build_model(
        "ranking",
        _net(target_group_size=target_group_size),
        RankingArgs(prediction_head_arch=list(arch), num_tasks=num_tasks),
        emb,
        data,
    ).eval()


def test_candidate_isolation_at_model_level():
    model = _ranking_model()
    base = make_batch([[1, 2, 3]], [[10, 11, 12]], [[1, 0, 3]], {"user": [2]}, labels=[1, 2, 3])
    changed = make_batch([[1, 2, 3]], [[10, 30, 12]], [[1, 0, 3]], {"user": [2]}, labels=[1, 2, 3])
    history_changed = make_batch(
        [[1, 5, 3]], [[10, 11, 12]], [[1, 0, 3]], {"user": [2]}, labels=[1, 2, 3]
    )
    with torch.no_grad():
        _, (a, _) = model(base)
        _, (b, _) = model(changed)
        _, (c, _) = model(history_changed)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]])  # other candidates unchanged
    assert not torch.allclose(a[1], b[1])  # the changed candidate itself moves
    assert not torch.allclose(a[0], c[0])  # the history is seen by every candidate


def test_target_group_shares_within_group_only():
    model = _ranking_model(target_group_size=2)
    base = make_batch([[1, 2]], [[10, 11, 12, 13]], [[1, 0]], {"user": [2]}, labels=[0, 1, 2, 3])
    changed = make_batch([[1, 2]], [[30, 11, 12, 13]], [[1, 0]], {"user": [2]}, labels=[0, 1, 2, 3])
    with torch.no_grad():
        _, (a, _) = model(base)
        _, (b, _) = model(changed)
    torch.testing.assert_close(a[2:], b[2:])  # the other group is unaffected
    assert not torch.allclose(a[1], b[1])  # candidate 1 sees candidate 0 of its group


def test_ranking_backward_reaches_all_parameters():
    model = _ranking_model(arch=(6, 4), num_tasks=2).train()  # CE over 4 classes
    batch = make_batch(
        [[1, 2], [4]], [[5, 6], [7]], [[1, 0], [2]], {"user": [1, 3]}, labels=[3, 0, 1]
    )
    loss, (logits, labels) = model(batch)
    loss.backward()
    assert logits.shape == (3, 4) and labels.tolist() == [3, 0, 1]
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], missing


def test_history_loss_adds_each_history_items_own_action_in_training_only():
    model = _ranking_model(arch=(6, 4), num_tasks=2).train()
    model.block.eval()  # no dropout, so the two passes see the same states
    batch = make_batch(
        [[1, 2, 3], [4]], [[5, 6], [7]], [[1, 0, 3], [2]], {"user": [1, 3]}, labels=[3, 0, 1]
    )
    base, _ = model(batch)
    model.dense_module.history_loss_weight = 0.5
    loss, (logits, _labels) = model(batch)
    _, _, tokens, states = _encode(model, batch)
    hist_logits = model.head(states[tokens.history_query_rows].float())
    want = base + 0.5 * F.cross_entropy(hist_logits, torch.tensor([1, 0, 3, 2]))
    torch.testing.assert_close(loss, want)
    assert logits.shape == (3, 4)  # outputs are the candidates' only
    model.eval()
    torch.testing.assert_close(model(batch)[0], base)  # evaluation loss: candidates only


def _encode(model, batch):
    from hstu.model.encode import encode_batch

    _, inputs, layout, tokens, states = encode_batch(
        batch, model.sparse(batch.features), model.token_builder, model.block, model.max_item_seqlen, None
    )
    return inputs, layout, tokens, states


# ------------------------------------------------------------------------------ retrieval


def test_sampled_softmax_masks_accidental_hits():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    pos = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    pos_ids = torch.tensor([3, 5])
    neg_ids = torch.tensor(
        [[3, 4], [6, 5]]
    )  # query 0's first and query 1's second are its positive
    neg = F.normalize(torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]), dim=-1)
    temp = 0.5
    loss, pos_logits, neg_logits = sampled_softmax_loss(q, pos, pos_ids, neg, neg_ids, temp)
    assert torch.isneginf(neg_logits[0, 0]) and torch.isneginf(neg_logits[1, 1])
    s = 1 / math.sqrt(2)
    # query 0: positive cos s, surviving negative cos 1; query 1: positive 1, negative 0
    l0 = -math.log(math.exp(s / temp) / (math.exp(s / temp) + math.exp(1 / temp)))
    l1 = -math.log(math.exp(1 / temp) / (math.exp(1 / temp) + math.exp(0.0)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # without masking the hits, the loss would differ
    unmasked = torch.cat([pos_logits[:, None], (torch.einsum("qd,qmd->qm", q, neg) / temp)], 1)
    assert -torch.log_softmax(unmasked, 1)[:, 0].mean().item() != pytest.approx(loss.item())


def test_in_batch_negatives_mask_duplicates_of_the_positive():
    q = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    pos = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    ids = torch.tensor([7, 8, 7])
    _, _, neg_logits = sampled_softmax_loss(q, pos, ids, pos, ids, 0.1)
    hits = torch.isneginf(neg_logits)
    assert hits.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def _retrieval(num_negatives: int = -1, use_collection: bool = False, sampling: str = "uniform",
               exclude_history: bool = True, exclude_history_from_loss: bool = False):
    data = ModelDataInfo(num_items=30, item_feature_name="item", max_item_seqlen=8, min_item_id=1)
    torch.manual_seed(0)
    if use_collection:
        emb = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name="item_table", embedding_dim=D, num_embeddings=30,
                    feature_names=["item", "item__negatives"],
                )
            ]
        )
    else:
        emb = TinyEmbeddings({"item": (30, D)})
    # float32 matmuls named: the checks below compare with float32 losses built by hand
    args = RetrievalArgs(
        num_negatives=num_negatives, negative_sampling=sampling, temperature=0.1,
        full_corpus_matmul_dtype="float32" if sampling == "full_corpus" else "auto",
        eval_exclude_history=exclude_history,
        exclude_history_from_loss=exclude_history_from_loss,
    )
    return build_model("retrieval", _net(), args, emb, data)


@pytest.mark.parametrize("num_negatives,use_collection", [(-1, False), (5, True)])
def test_retrieval_trains(num_negatives: int, use_collection: bool):
    model = _retrieval(num_negatives, use_collection)
    negatives = sampler(num_negatives=num_negatives) if num_negatives > 0 else None
    batch = make_batch([[1, 2, 3, 4], [5, 6], [7]], negatives=negatives)
    loss, (pos_logits, neg_logits) = model(batch)
    assert pos_logits.shape == (4,)  # 3 + 1 + 0 next-item queries
    if num_negatives == -1:
        assert neg_logits.shape == (4, 4)
    else:  # uniform negatives train through the fused loss, which keeps no [Q, M] logits
        assert neg_logits is None
    loss.backward()
    assert torch.isfinite(loss)
    assert model.block.layers[0].uvqk.weight.grad.abs().sum() > 0


def test_uniform_negatives_transpose_from_the_data_path_gives_the_same_gradients():
    """The loader ships the negative index's transpose (Batch.negative_order / offsets) so the
    step does not sort it; the model's gradients are bitwise those of sorting in the step."""
    from dataclasses import replace

    batch = make_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11]], negatives=sampler(num_negatives=8))
    assert batch.negative_order is not None and batch.negative_order.shape == (2, 8 * 8)  # 5 + 2 + 1 queries
    grads = []
    for b in (batch, replace(batch, negative_order=None, negative_offsets=None)):
        model = _retrieval(8, use_collection=True)
        loss, _ = model(b)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_negative_sampling_modes_build_the_softmax_they_name():
    """full_corpus is the exact softmax over every item; mixed = uniform + in-batch columns;
    in_batch = the batch's positives; shared = one set of draws scored by every query. Each
    checked against a loss built by hand from the same query states and item vectors."""
    losses = {}
    for sampling, m in (("full_corpus", -1), ("in_batch", -1), ("mixed", 6), ("shared", 12)):
        negatives = None if sampling in ("in_batch", "full_corpus") else sampler(sampling, max(m, 0))
        batch = make_batch([[1, 2, 3, 4], [5, 6], [7]], negatives=negatives)
        model = _retrieval(m, use_collection=False, sampling=sampling).eval()
        loss, (_pos_logits, neg_logits) = model(batch)
        # rebuild queries and positives the way the model defines them
        _own, _inputs, _layout, tokens, states = model.dense_module._states(batch, model.sparse(batch.features))
        q = model.normalise(states[tokens.history_query_rows])
        q = q[[0, 1, 2, 4]]  # history positions with a next item: 1,2,3 -> 2,3,4 and 5 -> 6
        pos = torch.tensor([2, 3, 4, 6])
        corpus = model.corpus_vectors()
        if sampling == "full_corpus":
            want = F.cross_entropy(q @ corpus[1:].t() / 0.1, pos - 1)
            assert neg_logits.shape == (4, 29)
            assert torch.isneginf(neg_logits[torch.arange(4), pos - 1]).all()
        elif sampling == "in_batch":
            logits = q @ corpus[pos].t() / 0.1  # positives on the diagonal, no repeats here
            want = F.cross_entropy(logits, torch.arange(4))
            assert neg_logits.shape == (4, 4)
        elif sampling == "shared":
            # one set for the batch: the distinct ids of 12 draws, no per-query index
            neg = batch.features["item__negatives"].values()
            assert batch.negative_index is None and 1 < neg.numel() <= m
            assert bool((neg[1:] > neg[:-1]).all()) and neg.min() >= 1 and neg.max() < 30
            assert bool((neg.unsqueeze(0) == pos.unsqueeze(1)).any())  # a hit is masked below
            shared = (q @ corpus[neg].t() / 0.1).masked_fill(neg == pos.unsqueeze(1), float("-inf"))
            logits = torch.cat([(q * corpus[pos]).sum(-1, keepdim=True) / 0.1, shared], 1)
            want = -torch.log_softmax(logits, 1)[:, 0].mean()
            assert neg_logits.shape == (4, neg.numel())
        else:
            # the batch's own draws: distinct ids on the negatives key, an index per query
            neg = batch.features["item__negatives"].values()[batch.negative_index]
            assert neg.shape == (4, m) and neg.min() >= 1 and neg.max() < 30
            uni = torch.einsum("qd,qmd->qm", q, corpus[neg]) / 0.1
            uni = uni.masked_fill(neg == pos.unsqueeze(1), float("-inf"))
            inb = (q @ corpus[pos].t() / 0.1).masked_fill(torch.eye(4, dtype=torch.bool), float("-inf"))
            logits = torch.cat([(q * corpus[pos]).sum(-1, keepdim=True) / 0.1, uni, inb], 1)
            want = -torch.log_softmax(logits, 1)[:, 0].mean()
            assert neg_logits.shape == (4, m + 4)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        losses[sampling] = loss.item()
    assert len(set(losses.values())) == 4


def test_exclude_history_from_loss_leaves_each_query_s_history_out_of_its_softmax():
    """RetrievalArgs.exclude_history_from_loss reaches the training loss through build_model:
    the loss is the cross-entropy with each query's own history (its position and before)
    at -inf, built by hand; without the switch it is the plain full softmax."""
    batch = make_batch([[1, 2, 3, 4], [5, 6], [7]])
    losses = {}
    for exclude in (False, True):
        model = _retrieval(-1, sampling="full_corpus", exclude_history_from_loss=exclude).train()
        loss, _ = model(batch)
        _own, _inputs, _layout, tokens, states = model.dense_module._states(batch, model.sparse(batch.features))
        q = model.normalise(states[tokens.history_query_rows])[[0, 1, 2, 4]]
        logits = q @ model.corpus_vectors()[1:].t() / 0.1
        if exclude:  # queries 1->2, 1,2->3, 1,2,3->4 and 5->6: their histories' columns (id - 1)
            for row, ids in enumerate(([1], [1, 2], [1, 2, 3], [5])):
                logits[row, [i - 1 for i in ids]] = float("-inf")
        want = F.cross_entropy(logits, torch.tensor([2, 3, 4, 6]) - 1)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        losses[exclude] = loss.item()
    assert losses[True] < losses[False]


def test_full_corpus_bfloat16_matmuls_from_the_args(monkeypatch):
    """RetrievalArgs.full_corpus_matmul_dtype reaches the loss through build_model: the same
    weights give the float32 loss within bfloat16 rounding (not bitwise: it did run in
    bfloat16) and the same gradient direction on the block's first weight."""
    def run(dtype: str):
        data = ModelDataInfo(num_items=30, item_feature_name="item", max_item_seqlen=8, min_item_id=1)
        torch.manual_seed(0)
        args = RetrievalArgs(negative_sampling="full_corpus", temperature=0.1,
                             full_corpus_matmul_dtype=dtype)
        model = build_model("retrieval", _net(), args, TinyEmbeddings({"item": (30, D)}), data)
        batch = make_batch([[1, 2, 3, 4], [5, 6], [7]])
        loss, (_pos_logits, _neg_logits) = model(batch)
        loss.backward()
        return model, loss.detach(), model.block.layers[0].uvqk.weight.grad
    model32, loss32, grad32 = run("float32")
    model16, loss16, grad16 = run("bfloat16")
    assert model32.dense_module.full_corpus_matmul_dtype == torch.float32
    assert model16.dense_module.full_corpus_matmul_dtype == torch.bfloat16
    torch.testing.assert_close(loss16, loss32, rtol=2e-3, atol=0.0)
    assert not torch.equal(grad16, grad32)
    assert F.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.999
    # "auto" runs whichever the device does natively: bitwise one of the two above
    for native, want_loss, want_grad in ((True, loss16, grad16), (False, loss32, grad32)):
        with _cpu_capabilities(monkeypatch, avx512_bf16=native):
            _, loss_auto, grad_auto = run("auto")
        assert torch.equal(loss_auto, want_loss) and torch.equal(grad_auto, want_grad), native


@contextlib.contextmanager
def _cpu_capabilities(monkeypatch, **flags):
    """torch.cpu.get_capabilities() as a CPU with (or without) the given flags reports it."""
    from hstu.ops.losses import native_bfloat16_matmul

    real = torch.cpu.get_capabilities()
    fake = {**{k: False for k in real if "bf16" in k}, "cpu_name": "Test CPU", **flags}
    native_bfloat16_matmul.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(torch.cpu, "get_capabilities", lambda: fake)
        yield
    native_bfloat16_matmul.cache_clear()


@pytest.mark.parametrize("flags,want", [
    ({"avx512_bf16": True}, "bfloat16"), ({"amx_bf16": True}, "bfloat16"), ({}, "float32"),
])
def test_auto_matmul_dtype_follows_the_cpu_and_the_run_says_so(monkeypatch, flags, want):
    """An AVX2-only CPU emulates bfloat16 products at ~1/8 of float32's rate: "auto" keeps
    float32 there, and the run's first lines name the choice and why."""
    from types import SimpleNamespace as NS

    from hstu.ops.losses import resolve_matmul_dtype
    from hstu.training.builder import full_corpus_note

    cpu = torch.device("cpu")
    with _cpu_capabilities(monkeypatch, **flags):
        assert resolve_matmul_dtype("auto", cpu)[0] == getattr(torch, want)
        # an explicit choice is never overridden
        assert resolve_matmul_dtype("bfloat16", cpu)[0] == torch.bfloat16
        assert resolve_matmul_dtype("float32", cpu)[0] == torch.float32
        cfg = NS(task="retrieval", retrieval=RetrievalArgs(negative_sampling="full_corpus"))
        note = full_corpus_note(cfg, cpu)
    assert f"matmuls in {want} (auto: Test CPU" in note
    assert ("no native bfloat16" in note) == (want == "float32")
    cfg = NS(task="retrieval", retrieval=RetrievalArgs(negative_sampling="uniform", num_negatives=4))
    assert full_corpus_note(cfg, cpu) is None


def test_full_corpus_eval_with_the_history_rankable():
    """RetrievalArgs.eval_exclude_history=False: a target inside the history is ranked like
    any item (the brute-force rank without the history mask), and the top-k may hold history
    items."""
    model = _retrieval(exclude_history=False).eval()
    batch = make_batch([[1, 2, 3, 4], [5, 6], [7, 8, 9]])
    batch.labels = torch.tensor([10, 6, 8])  # 6 and 8 are in their samples' histories
    queries, _, _ = model.last_queries(batch)
    corpus = model.corpus_vectors(chunk_size=7)
    scores = queries @ corpus.t()
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    excluded[:, 0] = True
    want_ranks = ranks_from_scores(scores, batch.labels, excluded)
    assert want_ranks.isfinite().all()
    want_top = scores.masked_fill(excluded, float("-inf")).topk(5, dim=1)
    for chunk in (4, 1000):
        result = model.evaluate(batch, top_k=5, chunk_size=chunk, corpus=corpus)
        assert torch.equal(result.target_ranks, want_ranks), chunk
        torch.testing.assert_close(result.top_scores, want_top.values)
    excluding = _retrieval().eval()  # the same weights (seeded), the default protocol
    assert excluding.evaluate(batch, top_k=5, corpus=corpus).target_ranks[1:].isinf().all()


def test_full_corpus_eval_matches_brute_force_with_history_excluded():
    model = _retrieval().eval()
    batch = make_batch([[1, 2, 3, 4], [5, 6], [7, 8, 9]])
    batch.labels = torch.tensor([10, 6, 0])  # 6 is in sample 1's history; 0 is padding (< min id)
    queries, _, _ = model.last_queries(batch)
    corpus = model.corpus_vectors(chunk_size=7)
    scores = queries @ corpus.t()
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    for b, hist in enumerate([[1, 2, 3, 4], [5, 6], [7, 8, 9]]):
        excluded[b, hist] = True
    excluded[:, 0] = True
    want_ranks = ranks_from_scores(scores, batch.labels, excluded)
    assert want_ranks[0].isfinite() and want_ranks[1:].isinf().all()
    for chunk in (4, 1000):
        result = model.evaluate(batch, top_k=5, chunk_size=chunk, corpus=corpus)
        assert torch.equal(result.target_ranks, want_ranks), chunk
        want_top = scores.masked_fill(excluded, float("-inf")).topk(5, dim=1)
        torch.testing.assert_close(result.top_scores, want_top.values)
        assert torch.equal(result.top_ids, want_top.indices)
        assert not any(
            i in hist
            for row, hist in zip(result.top_ids.tolist(), [[1, 2, 3, 4], [5, 6], [7, 8, 9]])
            for i in row
        )


def test_eval_target_score_comes_from_the_same_matmul_as_the_others():
    """The target's rank is counted against the score matrix itself (pessimistic ties over
    the very numbers the top-k sees). Items repeat 10 vectors three times, so every target
    has exact or last-bit near ties; an elementwise product summed for the target's score
    rounds differently from the matmul and miscounts them."""
    model = _retrieval().eval()
    num_items, bsz, dim = model.num_items, 512, 64
    gen = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(10, dim, generator=gen), dim=-1)
    corpus = base[torch.arange(num_items) % 10]
    queries = F.normalize(torch.randn(bsz, dim, generator=gen), dim=-1)
    targets = torch.randint(1, num_items, (bsz,), generator=gen)
    targets[:4] = torch.tensor([0, num_items, -1, 5])  # padding id, outside the corpus
    history = torch.randint(1, num_items, (bsz, 2), generator=gen)
    history_seg = torch.arange(bsz).repeat_interleave(2)
    dense = model.dense_module
    dense.last_queries = lambda batch, embeddings: (queries, history.reshape(-1), history_seg)
    batch = SimpleNamespace(labels=targets)
    excluded = torch.zeros(bsz, num_items, dtype=torch.bool)
    excluded[history_seg, history.reshape(-1)] = True
    excluded[:, 0] = True
    for chunk in (num_items, 7):  # one chunk (one matmul), and several
        scores = torch.cat(
            [queries @ corpus[s : s + chunk].t() for s in range(0, num_items, chunk)], 1
        )
        want = ranks_from_scores(scores, targets, excluded)
        result = dense.evaluate(batch, None, corpus, top_k=5, chunk_size=chunk)
        assert torch.equal(result.target_ranks, want), chunk
        assert result.target_ranks[:3].isinf().all() and result.target_ranks.isfinite().sum() > 400


def test_retrieval_with_narrow_items_scores_projected_queries_against_the_table():
    data = ModelDataInfo(
        num_items=30, item_feature_name="item", max_item_seqlen=8, feature_dims={"item": 4}
    )
    torch.manual_seed(0)
    emb = TinyEmbeddings({"item": (30, 4)})
    model = build_model("retrieval", _net(), RetrievalArgs(temperature=0.1), emb, data)
    proj = model.dense_module.query_projection
    assert tuple(proj.weight.shape) == (4, D)
    loss, (pos_logits, _) = model(make_batch([[1, 2, 3, 4], [5, 6], [7]]))
    assert pos_logits.shape == (4,)
    loss.backward()
    assert proj.weight.grad.abs().sum() > 0
    model.eval()
    queries, _, _ = model.last_queries(make_batch([[1, 2, 3, 4]]))
    assert queries.shape == (1, 4)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(1))
    # the corpus is the table as stored (normalised), never projected
    corpus = model.corpus_vectors()
    torch.testing.assert_close(corpus, F.normalize(emb.tables["item"].weight.detach(), dim=-1))


def test_research_variant_builds_and_runs():
    data = ModelDataInfo(num_items=30, item_feature_name="item", max_item_seqlen=8)
    net = _net(norm_epsilon=1e-6)
    model = build_model(
        "retrieval",
        net,
        RetrievalArgs(),
        TinyEmbeddings({"item": (30, D)}),
        data,
        variant=research_options(padded_width=19),
    )
    layer = model.block.layers[0]
    assert layer.alpha == 1.0 and layer.uvqk.bias is None and layer.output.bias is not None
    assert layer.input_norm_weight is None and layer.rab_pos_weights.numel() == 2 * 8 - 1
    loss, _ = model(make_batch([[1, 2, 3], [4, 5]]))
    loss.backward()
    assert layer.rab_pos_weights.grad.abs().sum() > 0 and layer.rab_ts_weights.grad.abs().sum() > 0


def test_exclude_history_from_loss_needs_the_full_corpus():
    from hstu.validation import ConfigError

    with pytest.raises(ConfigError, match="exclude_history_from_loss.*full_corpus"):
        RetrievalArgs(negative_sampling="uniform", num_negatives=5, exclude_history_from_loss=True)
