"""Cold items: a share of the catalogue held out of training (``DatasetArgs.cold_items``), to
measure how a model recommends items it never trained on (docs/data.md "Cold items").

The cold items are drawn once per dataset and seed (``DatasetArgs.cold_items_seed``), the same
for every model and training seed. Every event of a cold item is dropped from the users'
sequences except their held-out events (the test event, and the validation one with
``holdout_validation``): no training sample holds a cold item as input or target, while the
evaluation keeps its targets as they were. The evaluation then reports, beside the metrics
over every target, the same metrics over the targets that are cold (``cold/<metric>``).
"""

from __future__ import annotations

import numpy as np

from hstu.data.store import SequenceStore


def draw_cold_items(first_item_id: int, num_items: int, share: float, seed: int) -> np.ndarray:
    """``round(share * n)`` ids of the n items [first_item_id, num_items), sorted: the same for
    a (catalogue, share, seed)."""
    ids = np.arange(first_item_id, num_items, dtype=np.int64)
    count = round(share * len(ids))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC01D]))
    return np.sort(rng.permutation(ids)[:count])


def hold_out_items(store: SequenceStore, cold: np.ndarray, keep_last: int
                   ) -> tuple[SequenceStore, int]:
    """``store`` without the events of ``cold`` items before each user's last ``keep_last``
    (in memory; the held-out events stay where they were): (the store, events dropped)."""
    items = np.asarray(store.items)
    lengths = store.lengths
    user_end = np.repeat(store.offsets[1:], lengths)
    recent = user_end - np.arange(len(items)) <= keep_last
    keep = recent | ~np.isin(items, cold)
    running = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    offsets = running[store.offsets]  # each user's kept events, in order
    actions = None if store.actions is None else np.asarray(store.actions)[keep]
    out = SequenceStore(offsets=offsets, items=items[keep],
                        timestamps=np.asarray(store.timestamps)[keep], actions=actions,
                        contextual=store.contextual, metadata=store.metadata)
    return out, int((~keep).sum())


__all__ = ["draw_cold_items", "hold_out_items"]
