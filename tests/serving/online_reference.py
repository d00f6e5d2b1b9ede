"""The trained model's own top-K for raw-id histories, for the online serving tests (run as a
subprocess: it builds the trainer's model in a world of one process):

    python -m tests.serving.online_reference CKPT EVENTS.csv K OUT.json

Loads the checkpoint's model with its stored configuration, maps each user's raw item ids
through the checkpoint's item id map (``item_ids.npy`` cut to ``stream.json``'s num_items, as
the online loop's resume does), scores the user's history with the trainer's retrieval
evaluation (``model.evaluate``) over the items the stream knows (dense ids 1..K, as the
online loop's test step), and writes {raw user id: [raw item id of each of the top K]}.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(ckpt: str, events: str, k: str, out: str) -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from hstu.data.batch import Batch
    from hstu.data.stream.core import HashedIds, IdMap
    from hstu.export import _first_eval_batch, load_for_export
    from hstu.training.distributed import destroy_distributed

    saved = json.loads((Path(ckpt) / "stream.json").read_text())
    table = np.load(Path(ckpt) / "item_ids.npy", allow_pickle=False)
    hashed = table.ndim == 2  # StreamArgs.ids="hashed": keys, no map
    items = HashedIds("item", keep_names=True) if hashed else IdMap("item")
    items.load(Path(ckpt) / "item_ids.npy")
    items.truncate(saved["num_items"])
    with open(events, newline="") as fh:
        rows = list(csv.DictReader(fh))
    per_user: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        per_user.setdefault(r["user_id"], []).append((int(r["timestamp"]), r["item_id"]))
    try:
        model, _cfg, built, _, _, _ = load_for_export(ckpt, None, [], log=lambda *a: None)
        template = _first_eval_batch(built)
        keys = list(template.features.keys())
        name = template.item_feature_name
        dense = model.dense_module
        if hashed:  # the corpus: the items the dynamic table's rows hold
            live = model.live_items()
            live_vectors = dense.normalise(model.lookup_items(live))
        else:
            dense.num_items = len(items) + 1  # the corpus: the items the stream knows
        result = {}
        torch.set_grad_enabled(False)
        for user, events_ in per_user.items():
            events_.sort(key=lambda e: e[0])  # stable: ties keep the file's order
            raw = np.asarray([e[1] for e in events_])
            if items.kind == "int":  # the csv's text of an integer id
                raw = raw.astype(np.int64)
            ids = torch.from_numpy(items.keys(raw) if hashed else items.lookup(raw))
            assert bool((ids > 0).all()), f"user {user}: an item the stream does not know"
            lengths = torch.tensor([ids.numel() if key == name else 0 for key in keys])
            kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids, lengths=lengths)
            batch = Batch(features=kjt, batch_size=1, item_feature_name=name,
                          timestamps=torch.tensor([e[0] for e in events_], dtype=torch.int64),
                          sample_mask=torch.ones(1, dtype=torch.bool),
                          max_seqlen=template.max_seqlen)
            if hashed:  # the query against every live item, the history left out
                query = model.last_queries(batch)[0][0]
                scores = live_vectors @ query
                scores[torch.isin(live, ids)] = float("-inf")
                top = live[scores.topk(int(k)).indices].numpy()
            else:
                top = model.evaluate(batch, top_k=int(k)).top_ids[0].numpy()
            result[user] = [str(x) for x in items.raw(top)]
        Path(out).write_text(json.dumps(result))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
