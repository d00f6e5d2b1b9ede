"""Names of the columns of an events file, one definition for training's own data
(:mod:`hstu.data.custom`, ``--dataset custom``) and for serving (:mod:`hstu.recommend`).

Each role lists its default name first (``CustomDataArgs``' default), then the aliases read
when the default is absent. A column named explicitly (``CustomDataArgs.user_column =
"visitor"``) is taken as given, without aliases. Plain Python: imported by the torch-only
serving path too.
"""

from __future__ import annotations

USER_FEATURE = "user_id"
"""The model's user-id feature (a contextual feature: the dense id 1..U the preprocessor gave)."""

EVENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "user": ("user_id", "user", "userId"),
    "item": ("item_id", "item", "movieId"),
    "timestamp": ("timestamp", "time", "ts"),
}
"""role -> accepted column names, the default first (``userId`` / ``movieId``: MovieLens'
own ``ratings.csv`` header, whose ``timestamp`` is the default already; its ``rating`` is an
action only when named, ``CustomDataArgs.action_column = "rating"``)."""


def pick_column(role: str, have: list[str], configured: str | None = None) -> str | None:
    """The column of ``have`` holding ``role``: ``configured`` if it is set to something other
    than the default (exactly that name), else the first of the role's names present; None if
    none is there."""
    names = EVENT_COLUMNS[role]
    if configured is not None and configured != names[0]:
        return configured if configured in have else None
    return next((n for n in names if n in have), None)


def accepted(role: str) -> str:
    """``user_id / user``: the names read for ``role``, for messages."""
    return " / ".join(EVENT_COLUMNS[role])


__all__ = ["EVENT_COLUMNS", "USER_FEATURE", "accepted", "pick_column"]
