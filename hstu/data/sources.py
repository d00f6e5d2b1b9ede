"""Readers of each raw dataset format into typed columns (one reader per dataset family;
each dataset name is registered with its reader and archive in hstu.registry.DATASETS).

Every reader returns a :class:`Parsed`: the interaction log (user, item, time, action) in
file order, the per-user feature table, and what the output's features are called. The
shared grouping/sorting/writing lives in :mod:`hstu.data.preprocess`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from hstu.columns import USER_FEATURE  # one definition, shared with serving
from hstu.data.parsing import Columns, TextFormat, iter_delimited, read_delimited
from hstu.data.raw import RawSource

ITEM_FEATURE = "item_id"
ACTION_FEATURE = "action"

KUAIRAND_ACTION_BITS: tuple[tuple[str, int], ...] = (
    ("is_click", 1),
    ("is_like", 2),
    ("is_follow", 4),
    ("is_comment", 8),
    ("is_forward", 16),
    ("is_hate", 32),
    ("long_view", 64),
    ("is_profile_enter", 128),
)
KUAIRAND_USER_RANGES = (
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
)
# MovieLens-1M age groups (README of ml-1m); ML-100K's ages are mapped onto them.
ML_AGE_GROUPS = np.array([1, 18, 25, 35, 45, 50, 56])


@dataclass
class Parsed:
    """One raw dataset, parsed but not yet grouped.

    log columns: ``user`` [N], ``item`` [N], ``time_key`` [N] int64 (full precision, the
    sort key), optional ``action`` [N] int64. ``user_table`` columns: ``user`` [U'] plus
    one column per name in ``user_feature_names``.
    """

    log: Columns | None
    """The whole log in memory, or None when the reader streams it (``log_blocks``)."""
    time_key_per_second: int = 1
    """time_key // this = unix seconds (1000 for millisecond logs)."""
    num_action_values: int | None = None
    user_table: Columns | None = None
    user_feature_names: list[str] = field(default_factory=list)
    max_user_id: int | None = None
    """Declared user vocabulary (ids must be <= this); None: any id (built-in datasets accept
    their newer releases, whose ids go beyond the historic maximum: sizes come from the data)."""
    max_item_id: int | None = None
    """Declared item vocabulary (custom data with item_vocab_size); None: any id."""
    action_kind: str = "classes"
    """What an action value is: "classes" (a rating class) or "bitmask" (one bit per binary
    task)."""
    action_values: list | None = None
    """Raw value of each action class when the raw values were binned (custom float ratings)."""
    keep_item_ids: bool = False
    """Keep item ids as they are (declared vocabulary) instead of remapping densely."""
    min_user_interactions: int = 2
    members: list[str] = field(default_factory=list)
    """Raw files read (for the folder checksum)."""
    column_names: dict[str, str] = field(default_factory=dict)
    """Internal log column (user, item, time_key, action) -> the name the user's file gives it, for
    messages."""
    log_blocks: Callable[[], Iterator[Columns]] | None = None
    """Streaming readers: yields the log in file order as blocks of the same columns as
    ``log`` (bounded memory); each block's segments name its file and lines."""

    def blocks(self) -> Iterator[Columns]:
        """The log in file order, block by block (the whole log is one block when in memory)."""
        if self.log is not None:
            yield self.log
        else:
            assert self.log_blocks is not None
            yield from self.log_blocks()


def _check_range(cols: Columns, name: str, lo: int, hi: int, what: str) -> None:
    values = cols.data[name]
    bad = (values < lo) | (values > hi)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise cols.error(row, name, f"{what} {values[row].item()!r} outside [{lo}, {hi}]")


def _check_bound(
    cols: Columns, name: str, bound: int | None, what: str, shown: str | None = None
) -> None:
    """Non-negative ids, and <= the declared vocabulary when there is one."""
    values = cols.data[name]
    if values.dtype.kind not in "iu":
        return
    if (values < 0).any():
        row = int(np.flatnonzero(values < 0)[0])
        raise cols.error(row, shown or name, f"negative {what} id {values[row]}")
    if bound is not None and len(values) and values.max() > bound:
        row = int(np.flatnonzero(values > bound)[0])
        raise cols.error(
            row,
            shown or name,
            f"{what} id {values[row]} overflows the declared vocabulary (max {bound})",
        )


# ------------------------------------------------------------------------- MovieLens


def _ml_ratings_to_classes(cols: Columns, scale: int) -> None:
    """rating -> class index: 1..5 -> 0..4 (scale 1) or 0.5..5.0 -> 0..9 (scale 2)."""
    rating = cols.data.pop("rating")
    x = rating * scale if scale != 1 else rating
    scaled = x.astype(np.int64)
    bad = (scaled != x) | (scaled < 1) | (scaled > 5 * scale)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise cols.error(
            row, "rating", f"rating {rating[row].item():g} is not one of the MovieLens values"
        )
    cols.data["action"] = scaled - 1


# the ratings and users of ML-1M and ML-100K: columns and types in file order, no header
_ML_RATINGS = {"user": "int", "item": "int", "rating": "int", "time_key": "int"}
_ML_1M_USERS = {"user": "int", "sex": "str", "age_group": "int", "occupation": "int",
                "zip_code": "str"}
_ML_100K_USERS = {"user": "int", "age": "int", "sex": "str", "occupation": "str", "zip_code": "str"}


def _movielens(
    log: Columns | None,
    users: Columns,
    members: list[str],
    log_blocks: Callable[[], Iterator[Columns]] | None = None,
) -> Parsed:
    """ML-1M or ML-100K: five rating classes and the four user features."""
    return Parsed(log, num_action_values=5, user_table=users,
                  user_feature_names=["sex", "age_group", "occupation", "zip_code"],
                  members=members, log_blocks=log_blocks)


def read_ml_1m(src: RawSource) -> Parsed:
    ratings_m, users_m = src.require_one("ratings.dat"), src.require_one("users.dat")
    log = read_delimited(
        src.read_bytes(ratings_m),
        src.display(ratings_m),
        _ML_RATINGS,
        TextFormat(delimiter="::", header=False, names=list(_ML_RATINGS)),
    )
    _ml_ratings_to_classes(log, 1)
    users = read_delimited(
        src.read_bytes(users_m),
        src.display(users_m),
        _ML_1M_USERS,
        TextFormat(delimiter="::", header=False, names=list(_ML_1M_USERS)),
    )
    bad = ~np.isin(users.data["age_group"], ML_AGE_GROUPS)
    if bad.any():
        raise users.error(
            int(np.flatnonzero(bad)[0]),
            "age_group",
            f"age code {users.data['age_group'][bad][0]} is not one of {ML_AGE_GROUPS.tolist()}",
        )
    return _movielens(log, users, [ratings_m, users_m])


def read_ml_100k(src: RawSource) -> Parsed:
    data_m, user_m = src.require_one("u.data"), src.require_one("u.user")

    def log_blocks() -> Iterator[Columns]:
        for block in iter_delimited(
            lambda: src.open_binary(data_m),
            src.display(data_m),
            _ML_RATINGS,
            TextFormat(delimiter="\t", header=False, names=list(_ML_RATINGS)),
        ):
            _ml_ratings_to_classes(block, 1)
            yield block

    users = read_delimited(
        src.read_bytes(user_m),
        src.display(user_m),
        _ML_100K_USERS,
        TextFormat(delimiter="|", header=False, names=list(_ML_100K_USERS)),
    )
    _check_range(users, "age", 0, 150, "age")
    age = users.data.pop("age")
    # the largest group lower bound <= age; ages under 18 fall in group 1
    group = np.maximum(np.searchsorted(ML_AGE_GROUPS, age, side="right") - 1, 0)
    users.data["age_group"] = ML_AGE_GROUPS[group].astype(np.int64)
    return _movielens(None, users, [data_m, user_m], log_blocks=log_blocks)


def read_ml_20m(src: RawSource) -> Parsed:
    ratings_m = src.require_one("ratings.csv")

    def log_blocks() -> Iterator[Columns]:
        for block in iter_delimited(
            lambda: src.open_binary(ratings_m),
            src.display(ratings_m),
            {"userId": "int", "movieId": "int", "rating": "float", "timestamp": "int"},
            TextFormat(delimiter=",", header=True),
        ):
            block.data = {
                "user": block.data["userId"],
                "item": block.data["movieId"],
                "rating": block.data["rating"],
                "time_key": block.data["timestamp"],
            }
            _ml_ratings_to_classes(block, 2)
            yield block

    return Parsed(None, num_action_values=10, members=[ratings_m], log_blocks=log_blocks)


# --------------------------------------------------------------------------- KuaiRand


def read_kuairand(src: RawSource) -> Parsed:
    """Standard logs merged in file (date) order; action = bitmask of the feedback columns."""
    log_members = src.require("log_standard_*.csv")
    user_m = src.require_one("user_features_*.csv")
    wanted = {"user_id": "int", "video_id": "int", "time_ms": "int"}
    wanted.update({name: "int" for name, _ in KUAIRAND_ACTION_BITS})

    def log_blocks() -> Iterator[Columns]:
        for m in log_members:
            for cols in iter_delimited(
                lambda m=m: src.open_binary(m),
                src.display(m),
                wanted,
                TextFormat(delimiter=",", header=True, quoted=True),
            ):
                action = np.zeros(cols.num_rows, dtype=np.int64)
                for name, bit in KUAIRAND_ACTION_BITS:
                    _check_range(cols, name, 0, 1, "flag")
                    action |= cols.data.pop(name) * bit
                cols.data = {
                    "user": cols.data["user_id"],
                    "item": cols.data["video_id"],
                    "time_key": cols.data["time_ms"],
                    "action": action,
                }
                yield cols

    users = read_delimited(
        src.read_bytes(user_m),
        src.display(user_m),
        {"user_id": "int", **{c: "str" for c in KUAIRAND_USER_RANGES}},
        # the official file quotes its range fields ("[10,50)")
        TextFormat(delimiter=",", header=True, quoted=True),
    )
    users.data["user"] = users.data.pop("user_id")
    return Parsed(
        None,
        time_key_per_second=1000,
        num_action_values=256,
        action_kind="bitmask",
        user_table=users,
        user_feature_names=list(KUAIRAND_USER_RANGES),
        members=[*log_members, user_m],
        log_blocks=log_blocks,
    )


__all__ = [
    "ACTION_FEATURE",
    "ITEM_FEATURE",
    "KUAIRAND_ACTION_BITS",
    "USER_FEATURE",
    "Parsed",
    "_check_bound",
    "_check_range",
]
