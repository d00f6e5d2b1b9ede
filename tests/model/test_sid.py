"""The semantic-id model (hstu.model.sid): its code decoder decodes with a key/value cache
exactly as without one, teacher forcing gives the decoding's log-probabilities, and beam search
over it returns the exact top-k with certification."""

from __future__ import annotations

import pytest
import torch

from hstu.model.sid import CachedDecoder, CodeDecoder, RecomputingDecoder, code_rows
from hstu.model.sid_decode import CodeTrie, beam_search
from tests.test_check_config import check_config


def _decoder(num_codes, layers=2, seed=0) -> CodeDecoder:
    torch.manual_seed(seed)
    dec = CodeDecoder(16, num_codes, layers, 2).double().eval()
    with torch.no_grad():  # logits of a useful spread (a fresh head is nearly uniform)
        for head in dec.heads:
            head.weight.mul_(20)
        dec.level_embedding.normal_()
    return dec


def _codes(num_items, num_codes, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seen, rows = set(), []
    while len(rows) < num_items:
        row = tuple(int(torch.randint(k, (1,), generator=g)) for k in num_codes)
        if row not in seen:
            seen.add(row)
            rows.append(row)
    return torch.tensor(rows)


def test_teacher_forcing_equals_decoding_level_by_level_with_and_without_the_cache():
    num_codes = [5, 4, 3]
    dec = _decoder(num_codes)
    queries = torch.randn(7, 16, dtype=torch.float64)
    codes = _codes(7, num_codes)
    forced = dec(queries, codes)
    logits, cache = dec.start(queries)
    torch.testing.assert_close(logits, forced[0])
    rows = torch.arange(7)
    for level in range(1, 3):
        logits, cache = dec.step(cache, rows, codes[:, level - 1], level)
        torch.testing.assert_close(logits, forced[level])
        torch.testing.assert_close(dec.recompute(queries, codes[:, :level], level), forced[level])


def test_beam_search_with_the_cache_equals_it_without_and_certified_is_exact():
    num_codes = [6, 5, 4]
    dec = _decoder(num_codes, seed=3)
    codes = _codes(60, num_codes, seed=3)
    trie = CodeTrie(codes, num_codes)
    queries = torch.randn(12, 16, dtype=torch.float64)
    cached = beam_search(CachedDecoder(dec, queries), trie, 12, 3, 5)
    plain = beam_search(RecomputingDecoder(dec, queries), trie, 12, 3, 5)
    assert torch.equal(cached.items, plain.items)
    torch.testing.assert_close(cached.scores, plain.scores)
    # every item's score by teacher forcing: the certified top-5 is the exact one
    with torch.no_grad():
        every = torch.stack([
            sum(torch.log_softmax(lg, 1).gather(1, codes[:, lv:lv + 1]).squeeze(1)
                for lv, lg in enumerate(dec(q.expand(60, -1), codes)))
            for q in queries
        ])
    want_scores, want_items = every.topk(5, dim=1)
    got = beam_search(CachedDecoder(dec, queries), trie, 12, 3, 5, certify=True)
    assert torch.equal(got.items, want_items)
    torch.testing.assert_close(got.scores, want_scores)


def test_code_rows_put_each_level_after_the_rows_of_the_levels_before_it():
    rows = code_rows(torch.tensor([[0, 0, 0], [3, 1, 2]]), [4, 2, 3])
    assert rows.tolist() == [[0, 4, 6], [3, 5, 8]]


# ------------------------------------------------------------------ configuration

@pytest.mark.usefixtures("plain_process")
@pytest.mark.parametrize("task,params,why", [
    ("ranking", ['NetworkArgs.architecture="hstu_sid"', 'NetworkArgs.sid_codes="x"'],
     "NetworkArgs.architecture: hstu_sid is a retrieval model"),
    ("retrieval", ['NetworkArgs.architecture="hstu_sid"'],
     "NetworkArgs.sid_codes: architecture=\"hstu_sid\" needs the items' semantic ids"),
    ("retrieval", ['NetworkArgs.sid_codes="x"'],
     "NetworkArgs.sid_codes: is read by architecture=\"hstu_sid\" only"),
    ("retrieval", ['NetworkArgs.architecture="hstu_sid"', 'NetworkArgs.sid_codes="x"',
                   "NetworkArgs.sid_decoder_heads=5"],
     "NetworkArgs.sid_decoder_heads: 5 heads do not divide hidden_size"),
    ("retrieval", ['NetworkArgs.architecture="hstu_sid"', 'NetworkArgs.sid_codes="x"',
                   "NetworkArgs.sid_decoder_dropout=1.0"],
     "NetworkArgs.sid_decoder_dropout: must be None or in [0, 1), got 1.0"),
    ("retrieval", ["NetworkArgs.sid_decoder_dropout=0.1"],
     "NetworkArgs.sid_decoder_dropout: is read by architecture=\"hstu_sid\" only"),
    ("retrieval", ['NetworkArgs.architecture="hstu_sid"', 'NetworkArgs.sid_codes="x"',
                   "NetworkArgs.sid_decoder_attention_dropout=-0.1"],
     "NetworkArgs.sid_decoder_attention_dropout: must be None or in [0, 1), got -0.1"),
    ("retrieval", ["NetworkArgs.sid_decoder_attention_dropout=0.0"],
     "NetworkArgs.sid_decoder_attention_dropout: is read by architecture=\"hstu_sid\" only"),
    ("retrieval", ["NetworkArgs.sid_decoder_ffn_multiplier=2"],
     "NetworkArgs.sid_decoder_ffn_multiplier: is read by architecture=\"hstu_sid\" only"),
    ("retrieval", ['NetworkArgs.architecture="hstu_sid"', 'NetworkArgs.sid_codes="x"',
                   "NetworkArgs.sid_decoder_ffn_multiplier=0"],
     "NetworkArgs.sid_decoder_ffn_multiplier: must be"),
    ("retrieval", ["RetrievalArgs.sid_new_item_spread=0.2"],
     "RetrievalArgs.sid_new_item_spread: is read by NetworkArgs.architecture=\"hstu_sid\" only"),
    ("retrieval", ["RetrievalArgs.sid_certify=True"],
     "RetrievalArgs.sid_certify: is read by NetworkArgs.architecture=\"hstu_sid\" only"),
    ("retrieval", ["RetrievalArgs.sid_exclude_history_from_loss=True"],
     "RetrievalArgs.sid_exclude_history_from_loss: is read by NetworkArgs.architecture="),
    ("retrieval", ['NetworkArgs.architecture="hstu_sid"', 'NetworkArgs.sid_codes="x"',
                   "RetrievalArgs.sid_new_item_spread=1.5"],
     "RetrievalArgs.sid_new_item_spread: must lie in [0, 1], got 1.5"),
])
def test_check_config_refuses_in_one_line(capsys, task, params, why) -> None:
    args = [a for p in params for a in ("--gin-param", p)]
    code, _, err = check_config(capsys, task, f"debug_{task}.gin", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], err


@pytest.mark.usefixtures("plain_process")
def test_tensor_parallel_is_refused(capsys) -> None:
    code, _, err = check_config(capsys, "retrieval", "debug_retrieval.gin", "--world-size", "2",
                                "--gin-param", 'NetworkArgs.architecture="hstu_sid"',
                                "--gin-param", 'NetworkArgs.sid_codes="x"',
                                "--gin-param", "TensorModelParallelArgs.tensor_model_parallel_size=2")
    assert code == 2 and 'tensor_model_parallel_size: 2: NetworkArgs.architecture="hstu_sid"' in err


def test_decoder_dropout_is_its_own_or_the_encoders():
    """sid_decoder_dropout reaches every decoder layer; None takes hidden_dropout."""
    from hstu.args import RetrievalArgs
    from hstu.model.builder import ModelDataInfo, build_model
    from tests.embeddings.common import build, optimizer, tables
    from tests.model.test_models import _net

    emb, _ = build(tables(), optimizer("rowwise_adagrad"), sharded=False)
    data = ModelDataInfo(num_items=4, item_feature_name="a", max_item_seqlen=8, min_item_id=1,
                         sid_codes=torch.tensor([[-1, -1], [0, 0], [0, 1], [1, 0]]),
                         sid_num_codes=[2, 2])
    for own, want in ((None, 0.2), (0.3, 0.3), (0.0, 0.0)):
        net = _net(architecture="hstu_sid", sid_codes="x", hidden_dropout=0.2,
                   sid_decoder_dropout=own, sid_decoder_layers=2)
        model = build_model("retrieval", net, RetrievalArgs(), emb, data)
        assert [layer.dropout for layer in model.dense.decoder.layers] == [want, want]
        assert [layer.attention_dropout for layer in model.dense.decoder.layers] == [want, want]
    net = _net(architecture="hstu_sid", sid_codes="x", hidden_dropout=0.2,
               sid_decoder_attention_dropout=0.0, sid_decoder_ffn_multiplier=2)
    layer = build_model("retrieval", net, RetrievalArgs(), emb, data).dense.decoder.layers[0]
    assert (layer.dropout, layer.attention_dropout) == (0.2, 0.0)
    assert layer.ff[0].weight.shape == (2 * layer.ff[0].in_features, layer.ff[0].in_features)


def test_attention_dropout_is_apart_from_the_residual_branches():
    """Only the attention weights' dropout on: training is random; both off: it is not."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    for attention, random in ((0.5, True), (0.0, False)):
        dec = CodeDecoder(16, [4, 4, 4], 1, 2, dropout=0.0, attention_dropout=attention).train()
        q, codes = x[:, 0], torch.zeros(5, 3, dtype=torch.int64)
        first, second = dec(q, codes)[2], dec(q, codes)[2]
        assert (not torch.equal(first, second)) == random


def test_allowed_codes_leave_out_the_codes_that_lead_only_into_the_history():
    """RetrievalArgs.sid_exclude_history_from_loss: each query's allowed codes per level against
    the enumeration (repeats and not-admitted ids in the histories, a target that is also in
    its history, blocks of a few entries)."""
    from hstu.args import RetrievalArgs
    from hstu.model.builder import ModelDataInfo, build_model
    from hstu.ops.losses import HistoryWindow
    from tests.embeddings.common import build, optimizer, tables
    from tests.model.test_models import _net

    num_codes = [3, 2, 2]
    codes = torch.cat([torch.full((1, 3), -1), _codes(12, num_codes, seed=4)])  # id 0: padding
    emb, _ = build(tables(), optimizer("rowwise_adagrad"), sharded=False)
    data = ModelDataInfo(num_items=13, item_feature_name="a", max_item_seqlen=9, min_item_id=1,
                         sid_codes=codes, sid_num_codes=num_codes)
    net = _net(architecture="hstu_sid", sid_codes="x")
    dense = build_model("retrieval", net, RetrievalArgs(sid_exclude_history_from_loss=True),
                        emb, data).dense
    rows = {i: tuple(codes[i].tolist()) for i in range(1, 13)}
    same_first = [i for i in rows if rows[i][0] == rows[1][0]]
    histories = [same_first + [2, 2, 5], [3, -1, 3, 7, 3, 8, 1], [4, 9]]
    item_ids = torch.tensor([i for h in histories for i in h])
    starts, seg, idx, tgt = [], [], [], []
    at = 0
    for b, h in enumerate(histories):
        starts.append(at)
        for j in range(len(h) - 1):
            if h[j + 1] > 0:  # (a not-admitted target is never a query's target)
                seg.append(b)
                idx.append(j)
                tgt.append(h[j + 1])
        at += len(h)
    window = HistoryWindow(ids=item_ids, starts=torch.tensor(starts)[torch.tensor(seg)],
                           lengths=torch.tensor(idx) + 1,
                           width=max(len(h) for h in histories) - 1)
    target_ids = torch.tensor(tgt)
    samples = torch.tensor([b for b, h in enumerate(histories) for _ in h])
    for block, dense_children in ((1 << 18, 1 << 22), (5, 0)):  # (0: the searched tables)
        dense._WINDOW_ELEMENTS, dense._DENSE_CHILDREN = block, dense_children
        dense._code_tables = None
        allowed = dense._allowed_codes(window, samples, target_ids)
        masked = 0
        for n, (b, j, t) in enumerate(zip(seg, idx, tgt)):
            hist = {i for i in histories[b][:j + 1] if i > 0 and i != t}
            for level in range(3):
                prefix = rows[t][:level]
                want = [c for c in range(num_codes[level])
                        if any(rows[i][:level + 1] == prefix + (c,) and i not in hist
                               for i in rows)]
                assert torch.nonzero(allowed[level][n]).flatten().tolist() == want, (n, level)
                assert allowed[level][n, rows[t][level]]  # never the target's own code
                valid = {rows[i][level] for i in rows if rows[i][:level] == prefix}
                masked += len(valid) - len(want)
        assert masked > 0  # some code led only into a history
