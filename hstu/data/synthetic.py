"""A dataset with planted sequential structure, generated deterministically from a seed.

Per segment, a sparse Markov chain over the items that each user of the segment walks, with
random jumps; ratings say how each step was taken. With ``num_themes`` > 0, a cue item and
theme items are planted at recall positions, from a random stream of their own (the chain's
draws stay those of the plain dataset). docs/data.md, "Synthetic data" and "Synthetic long
histories", gives the rules and figures.
"""

from __future__ import annotations

import numpy as np

from hstu.data.data_args import SyntheticDataArgs
from hstu.data.parsing import Columns
from hstu.data.sources import Parsed

_START_TIME = 1_600_000_000


def generate_synthetic(args: SyntheticDataArgs) -> Parsed:
    """Returns the interaction log and user table (shapes: N interactions, U users).

    Loops over time steps (at most max_length) only; every step is vectorised over users.
    """
    rng = np.random.default_rng(args.seed)
    num_users, num_items, num_segments, degree = (
        args.num_users,
        args.num_items,
        args.num_segments,
        args.out_degree,
    )
    item_ids = np.arange(1, num_items + 1)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity = popularity[rng.permutation(num_items)]
    popularity /= popularity.sum()
    # successors[g, i] = degree distinct items other than i: i + distinct offsets in [1, I).
    offsets = rng.integers(1, num_items, size=(num_segments, num_items, degree))
    while True:
        ordered = np.sort(offsets, axis=2)
        dup = np.zeros(offsets.shape, dtype=bool)
        dup[:, :, 1:] = ordered[:, :, 1:] == ordered[:, :, :-1]
        if not dup.any():
            break
        offsets = np.where(dup, rng.integers(1, num_items, size=offsets.shape), ordered)
    offsets = np.take_along_axis(offsets, rng.random(offsets.shape).argsort(axis=2), axis=2)
    successors = (
        np.arange(num_items)[None, :, None] + offsets
    ) % num_items  # [G, I, degree] 0-based
    # successor k taken with probability 1/(k+1), normalised (e.g. 0.55, 0.27, 0.18)
    weights = 1.0 / np.arange(1, degree + 1)
    succ_cdf = np.cumsum(weights / weights.sum())

    segment = rng.integers(0, num_segments, size=num_users)
    lengths = rng.integers(args.min_length, args.max_length + 1, size=num_users)
    max_len = int(lengths.max())
    items = np.zeros((num_users, max_len), dtype=np.int64)
    ratings = np.zeros((num_users, max_len), dtype=np.int64)
    current = rng.choice(num_items, size=num_users, p=popularity)
    items[:, 0] = current
    ratings[:, 0] = rng.integers(2, 5, size=num_users)
    for t in range(1, max_len):
        jump = rng.random(num_users) < args.noise_prob
        rank = np.minimum(
            np.searchsorted(succ_cdf, rng.random(num_users), side="right"), degree - 1
        )
        follow = successors[segment, current, rank]
        random_item = rng.choice(num_items, size=num_users, p=popularity)
        current = np.where(jump, random_item, follow)
        items[:, t] = current
        chain_rating = np.select([rank == 0, rank == 1], [4, 3], 2)
        ratings[:, t] = np.where(jump, rng.integers(0, 2, size=num_users), chain_rating)
    max_item_id = num_items
    if args.num_themes > 0:
        item_ids = np.arange(1, num_items + 2 + args.num_themes)  # + cue + themes
        max_item_id = num_items + 1 + args.num_themes
        _plant_themes(items, ratings, lengths, args)
    gaps = rng.integers(60, 3600, size=(num_users, max_len))
    times = _START_TIME + rng.integers(0, 30 * 86400, size=(num_users, 1)) + np.cumsum(gaps, axis=1)

    valid = np.arange(max_len)[None, :] < lengths[:, None]
    user_col = np.broadcast_to(np.arange(1, num_users + 1)[:, None], valid.shape)[valid]
    log = Columns(
        {
            "user": user_col.astype(np.int64),
            "item": item_ids[items[valid]],
            "time_key": times[valid].astype(np.int64),
            "action": ratings[valid],
        },
        [("synthetic", 0, 1)],
    )
    users = Columns(
        {"user": np.arange(1, num_users + 1), "segment": segment.astype(np.int64)},
        [("synthetic users", 0, 1)],
    )
    return Parsed(
        log,
        num_action_values=5,
        user_table=users,
        user_feature_names=["segment"],
        max_user_id=num_users,
        max_item_id=max_item_id,
        keep_item_ids=False,
        min_user_interactions=1,
    )


def _plant_themes(
    items: np.ndarray, ratings: np.ndarray, lengths: np.ndarray, args: SyntheticDataArgs
) -> None:
    """Writes the cue and theme items (0-based indices ``num_items`` and ``num_items + 1 + t``)
    into ``items`` [U, max_len] in place, rated 2 (cue) and 4 (theme), from a random stream of
    its own (seed, 1) so the chain's draws stay those of the plain dataset."""
    rng = np.random.default_rng([args.seed, 1])
    cue = args.num_items
    theme = args.num_items + 1 + rng.integers(0, args.num_themes, size=len(lengths))
    users = np.arange(len(lengths))
    items[:, 0], ratings[:, 0] = theme, 4
    spacing = args.recall_spacing
    for j in range(int(lengths.max()) // spacing + 1):
        r = lengths - 1 - j * spacing
        ok = r >= spacing
        if not ok.any():
            break
        u, r = users[ok], r[ok]
        items[u, r], ratings[u, r] = theme[ok], 4
        items[u, r - 1], ratings[u, r - 1] = cue, 2


__all__ = ["generate_synthetic"]
