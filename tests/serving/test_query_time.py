"""Retrieval with the query time in the relative attention bias (NetworkArgs.rab_query_time):
the exported forward program, fed the request times through ``pad_inputs``, gives the trainer's
evaluation queries; training's loss and gradients do not move; ``python -m hstu.recommend``
picks the request time as documented."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hstu.model.hstu_block import HSTUBlock
from hstu.model.hstu_layer import LayerOptions
from hstu.model.retrieval import RetrievalModel
from hstu.model.tokens import TokenBuilder
from hstu.serving.artifact import ArtifactError, Tables, pad_inputs
from hstu.serving.model import InferenceHSTU
from tests.model.helpers import TinyEmbeddings, make_batch

MAX_ITEMS = 9


def _trainer_model(query_time: bool) -> RetrievalModel:
    torch.manual_seed(3)
    options = LayerOptions(relative_attention_bias=True, rab_num_positions=MAX_ITEMS, alpha=1.0,
                           attn_scaling_seqlen=MAX_ITEMS, uvqk_bias=False, norm_affine=False,
                           output_bias=True)
    block = HSTUBlock(2, 16, 1, 16, options, num_position_buckets=16)
    tokens = TokenBuilder(16, "item", None, [], {"item": 16}, query_time=query_time)
    dense = RetrievalModel(tokens, block, num_items=30, min_item_id=1, max_item_seqlen=MAX_ITEMS)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return dense.eval()


def _cfg(dense: RetrievalModel) -> dict:
    return {
        "task": "retrieval", "hidden_size": 16, "num_layers": 2, "num_heads": 1, "head_dim": 16,
        "alpha": 1.0, "scaling_seqlen": MAX_ITEMS, "norm_eps": dense.block.layers[0].norm_eps,
        "norm_affine": False, "uvqk_bias": False, "output_bias": True, "is_causal": True, "mask_convention": "hstu",
        "target_group_size": 1, "num_position_buckets": 16, "use_position_embedding": True,
        "relative_attention_bias": True, "rab_num_positions": MAX_ITEMS, "rab_use_time": True,
        "rab_query_time": dense.token_builder.query_time, "num_contextual": 0, "has_action": False,
        "projections": {}, "item_feature_name": "item", "action_feature_name": None,
        "contextual_feature_names": [], "max_item_seqlen": MAX_ITEMS, "l2_norm_eps": dense.l2_norm_eps,
        "num_items": 30, "min_item_id": 1, "feature_dims": {"item": 16},
    }


def test_exported_program_gives_the_trainers_evaluation_queries_with_query_times(tmp_path) -> None:
    from hstu.export import export_programs

    dense = _trainer_model(query_time=True)
    emb = TinyEmbeddings({"item": (30, 16)})
    history = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17]]
    g = torch.Generator().manual_seed(5)
    stamps = [torch.cumsum(torch.randint(1, 4000, (len(h),), generator=g), 0).tolist() for h in history]
    batch = make_batch(history, timestamps=stamps, labels=[20, 21, 22, 23], max_seqlen=MAX_ITEMS,
                       training=False)
    # the request comes 2.5 hours to a month after each user's last event
    query = torch.tensor([s[-1] for s in stamps]) + torch.tensor([2_600_000, 100_000, 9_000, 400_000])
    batch.query_timestamps = query
    embeddings = emb(batch.features)
    with torch.no_grad():
        want, _, _ = dense.last_queries(batch, embeddings)
        off = _trainer_model(query_time=False)
        off.load_state_dict(dense.state_dict())
        without, _, _ = off.last_queries(batch, embeddings)
    # the query time moves every user's query: it reaches the last token's bucket
    assert ((want - without).abs().amax(1) > 1e-4).all()
    with pytest.raises(ValueError, match="no query_timestamps"):
        dense.last_queries(make_batch(history, timestamps=stamps, max_seqlen=MAX_ITEMS), embeddings)

    cfg = _cfg(dense)
    inference = InferenceHSTU(cfg)
    inference.load_state_dict(dense.state_dict())
    inference.eval()
    tables = Tables({"item": {"ids": torch.arange(30), "vectors": emb.tables["item"].weight.detach()}})
    items = [torch.tensor(h) for h in history]
    stamps_t = [torch.tensor(s) for s in stamps]
    inputs = pad_inputs(tables, cfg, items, stamps_t, torch.zeros(4, dtype=torch.int64), request_times=query)
    with torch.no_grad():
        torch.testing.assert_close(inference(*inputs), want, rtol=1e-5, atol=1e-5)
    export_programs(inference, cfg, tmp_path, aoti=False, log=lambda *_: None)
    program = torch.export.load(str(tmp_path / "dense.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(*inputs), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ArtifactError, match="request time"):
        pad_inputs(tables, cfg, items, stamps_t, torch.zeros(4, dtype=torch.int64))


def test_recommend_request_time_defaults() -> None:
    from hstu.recommend import InputError, request_times

    events = SimpleNamespace(timestamps=np.array([10, 20, 35, 5, 50], dtype=np.int64))
    reads = SimpleNamespace(uses_request_time=True)
    # --holdout-last 1: a history ending before row e is asked at the held-out row's time
    assert request_times(reads, events, 1, None)[[2, 4]].tolist() == [35, 50]
    # raw events, no holdout: the newest timestamp of the input, for everyone
    assert set(request_times(reads, events, 0, None).tolist()) == {50}
    assert set(request_times(reads, events, 1, 77).tolist()) == {77}  # --request-time wins
    plain = SimpleNamespace(uses_request_time=False)
    assert request_times(plain, events, 1, None) is None
    with pytest.raises(InputError, match="--request-time"):
        request_times(plain, events, 0, 77)


def test_training_loss_and_gradients_do_not_change() -> None:
    """In training the query time is the next interaction's timestamp; it reaches only the last
    token, which is no training query and which, causally, no other token reads: the loss and
    every gradient equal those without the switch (docs/model.md), while the last token's
    state itself moves."""
    history = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    g = torch.Generator().manual_seed(6)
    stamps = [torch.cumsum(torch.randint(1, 40_000, (len(h),), generator=g), 0).tolist() for h in history]
    batch = make_batch(history, timestamps=stamps, max_seqlen=MAX_ITEMS)
    batch.query_timestamps = torch.tensor([s[-1] + 500_000 for s in stamps])
    runs = {}
    for on in (False, True):
        dense = _trainer_model(query_time=on).train()
        emb = TinyEmbeddings({"item": (30, 16)})
        torch.manual_seed(0)
        with torch.no_grad():
            emb.tables["item"].weight.copy_(torch.randn(30, 16))
        loss, _ = dense(batch, emb(batch.features))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in [*dense.named_parameters(), *emb.named_parameters()]}
        with torch.no_grad():
            dense.eval()
            states = dense._states(batch, emb(batch.features))
        runs[on] = (loss.detach(), grads, states[4], states[3].offsets)
    (loss0, grads0, states0, offsets), (loss1, grads1, states1, _) = runs[False], runs[True]
    assert torch.equal(loss0, loss1)
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=0, atol=0, msg=name)
    last = offsets[1:] - 1
    assert ((states1[last] - states0[last]).abs().amax(1) > 1e-4).all()
    others = torch.ones(states0.shape[0], dtype=torch.bool)
    others[last] = False
    assert torch.equal(states1[others], states0[others])
