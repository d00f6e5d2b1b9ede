"""Regression: the retrieval model must LEARN a planted next-item structure, in-process.

Users walk a sparse Markov chain (each item has 2 successors) over a small corpus, with
interleaved, uninformative action tokens (random ratings). A model whose query for item j+1
is the right state (it has seen item j) beats the popularity ranking by a wide margin after a
few dozen Adam steps; the earlier layout (query = the action token after item j, which sees
item j only through attention) stayed near popularity for hundreds of steps.
"""

from __future__ import annotations

import numpy as np
import torch

from hstu.args import NetworkArgs, RetrievalArgs
from hstu.model.builder import ModelDataInfo, build_model
from hstu.model.metrics import retrieval_metrics
from tests.model.helpers import TinyEmbeddings, make_batch, popularity_hr10

NUM_ITEMS = 201  # ids 1..200, 0 is padding
NUM_USERS = 512
SEQ_LEN = 16
D = 16


def _markov_users(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    items = np.arange(1, NUM_ITEMS)
    successors = {int(i): rng.choice(items[items != i], size=2, replace=False) for i in items}
    users = []
    for _ in range(NUM_USERS):
        cur = int(rng.choice(items))
        seq = [cur]
        for _ in range(SEQ_LEN):
            if rng.random() < 0.1:
                cur = int(rng.choice(items))
            else:
                cur = int(successors[cur][0 if rng.random() < 0.7 else 1])
            seq.append(cur)
        users.append(seq)
    return users


def _batch(users: list[list[int]], rng: np.random.Generator, labels: list[int] | None = None):
    actions = [[int(a) for a in rng.integers(0, 4, size=len(u))] for u in users]
    return make_batch(users, actions=actions, labels=labels, max_seqlen=SEQ_LEN + 1)


def _model() -> torch.nn.Module:
    net = NetworkArgs(
        num_layers=1,
        hidden_size=D,
        num_attention_heads=2,
        kv_channels=8,
        hidden_dropout=0.0,
        dtype_str="float32",
        kernel_backend="pytorch",
        num_position_buckets=64,
    )
    data = ModelDataInfo(
        num_items=NUM_ITEMS,
        item_feature_name="item",
        max_item_seqlen=SEQ_LEN + 1,
        action_feature_name="action",
        min_item_id=1,
    )
    torch.manual_seed(0)
    emb = TinyEmbeddings({"item": (NUM_ITEMS, D), "action": (4, D)})
    for table in emb.tables.values():
        torch.nn.init.normal_(table.weight, std=0.1)
    return build_model("retrieval", net, RetrievalArgs(num_negatives=-1, temperature=0.1), emb, data)


def test_retrieval_beats_popularity_on_markov_data():
    users = _markov_users()
    # leave-one-out: train on all but the last item, evaluate the last item
    train = [u[:-1] for u in users]
    history, targets = [u[:-1] for u in users], [u[-1] for u in users]
    rng = np.random.default_rng(1)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        pick = rng.choice(len(train), size=64, replace=False)
        loss, _ = model(_batch([train[i] for i in pick], rng))
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()
    batch = _batch(history, np.random.default_rng(2), labels=targets)
    hr = retrieval_metrics(model.evaluate(batch, top_k=10).target_ranks, ["HR@10"])["HR@10"]
    model_hr = float(hr.mean())

    pop_hr = popularity_hr10(train, history, targets, NUM_ITEMS)
    print(f"model HR@10 {model_hr:.3f}, popularity HR@10 {pop_hr:.3f}")
    assert model_hr > 3 * pop_hr and model_hr > 0.5, (model_hr, pop_hr)
