"""A finished dataset replayed as a stream (docs/online.md "Replay"): its events in time
order (ties in file order), cut into windows of one UTC day, one UTC hour or N events.

The windows play the partitions' part: each is named (``1997-09-20``, ``1997-09-20T05``,
``events-000000012``; names sort in time order), and a :class:`StreamPosition` is (window
name, rows consumed), as for a stream folder. Deterministic: the same dataset and window
give the same windows, ids and positions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hstu.data.data_args import CustomDataArgs, StreamArgs, replay_window_events
from hstu.data.errors import DataError
from hstu.data.parsing import Columns
from hstu.data.sources import Parsed
from hstu.data.stream.core import IdMap, Lag, StreamPosition, Window


@dataclass
class Events:
    """A finished events table in file order. Legend: N events.

    user, item: [N] raw ids (int64 or str); timestamp: int64 [N] seconds; rating: float64
    [N] or None. Own data: the number in its action column (as a stream folder's rating);
    built-in datasets: their action as preprocessing gives it (MovieLens stars 1..5 -> class
    0..4, KuaiRand's bitmask)."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray | None
    source: str = ""
    """What it was read from (for messages)."""


def events_of_parsed(parsed: Parsed, source: str) -> Events:
    """The log of a parsed raw dataset (hstu.data.sources / hstu.data.custom), file order."""
    log = Columns.concat(list(parsed.blocks()))
    t = log.data["time_key"].astype(np.int64) // parsed.time_key_per_second
    action = log.data.get("action")
    rating = None
    if action is not None:
        rating = action.astype(np.float64)
        if parsed.action_values is not None:  # own data binned per distinct value: the values
            rating = np.asarray(parsed.action_values, dtype=np.float64)[action]
    return Events(log.data["user"], log.data["item"], t, rating, source)


def events_of_dataset(dataset: str, raw: str | Path) -> Events:
    """A built-in dataset (hstu.registry.DATASETS) read from its raw archive or folder."""
    from hstu.data.raw import RawSource
    from hstu.registry import DATASETS, load

    if dataset not in DATASETS or DATASETS[dataset].reader is None:
        raise DataError(
            "StreamArgs.replay_dataset",
            f"{dataset!r} is not a dataset with raw files ({DATASETS.unknown(dataset)})",
        )
    src = RawSource(raw)
    try:
        return events_of_parsed(load(DATASETS[dataset].reader)(src), str(raw))
    finally:
        src.close()


def events_of_custom(args: CustomDataArgs) -> Events:
    """Users' own data (CustomDataArgs), file order."""
    from hstu.data.custom import read_custom

    return events_of_parsed(read_custom(args), str(args.path))


def events_of_processed(folder: str | Path) -> Events:
    """A preprocessed dataset: its users' sequences one after the other (user ids are the
    preprocessor's dense ids; ties in time keep that order, not the raw file's)."""
    from hstu.data.store import SequenceStore

    store = SequenceStore.load(folder, verbose=False)
    users = np.repeat(np.arange(1, store.num_users + 1, dtype=np.int64), store.lengths)
    return Events(
        users,
        np.asarray(store.items, dtype=np.int64),
        np.asarray(store.timestamps, dtype=np.int64),
        None if store.actions is None else np.asarray(store.actions, dtype=np.float64),
        str(folder),
    )


def _window_names(keys: np.ndarray, window: str) -> list[str]:
    """Names of the windows with keys ``keys`` [W]: days or hours since 1970, or the window
    numbers of ``window == "events"``."""
    if window == "events":
        return [f"events-{k:09d}" for k in keys.tolist()]
    seconds, fmt = (86400, "%Y-%m-%d") if window == "day" else (3600, "%Y-%m-%dT%H")
    utc = dt.timezone.utc
    return [dt.datetime.fromtimestamp(k * seconds, tz=utc).strftime(fmt) for k in keys.tolist()]


class ReplayStream:
    """Windows of a finished events table (see the module docstring).

    Args:
        events: the table, in file order.
        window: "day", "hour" or "events:N".
        max_window_events: cut each window further into slices of at most this many events.
    """

    def __init__(
        self, events: Events, window: str = "day", max_window_events: int | None = None
    ) -> None:
        per = replay_window_events(window)
        order = np.argsort(events.timestamp, kind="stable")  # time order, ties in file order
        self.source = events.source
        self.user = events.user[order]
        self.item = events.item[order]
        if self.user.dtype.kind not in "iu":
            self.user = self.user.astype(str)
        if self.item.dtype.kind not in "iu":
            self.item = self.item.astype(str)
        self.timestamp = events.timestamp[order].astype(np.int64)
        self.rating = None if events.rating is None else events.rating[order]
        n = len(order)
        if per is not None:
            key = np.arange(n, dtype=np.int64) // per
        else:
            key = self.timestamp // (86400 if window == "day" else 3600)
        starts = np.flatnonzero(np.diff(key)) + 1
        self.bounds = np.concatenate([[0], starts, [n]]).astype(np.int64)
        """Window w holds events bounds[w]:bounds[w+1] (time order)."""
        window_keys = key[self.bounds[:-1]] if n else key[:0]
        self.names = _window_names(window_keys, "events" if per else window)
        self.max_window_events = max_window_events
        self.users = IdMap("user")
        self.items = IdMap("item")
        self._lag = Lag(0, 0.0)

    @classmethod
    def from_args(cls, args: StreamArgs, custom: CustomDataArgs | None = None) -> ReplayStream:
        """The replay StreamArgs describes (replay_dataset, replay_raw, replay_window)."""
        name = args.replay_dataset
        assert name is not None, "StreamArgs.replay_dataset is not set"
        if name == "custom":
            events = events_of_custom(custom or CustomDataArgs(path=args.replay_raw))
        elif name == "processed":
            if args.replay_raw is None:
                raise DataError(
                    "StreamArgs.replay_raw", "replay of a processed dataset needs its folder"
                )
            events = events_of_processed(args.replay_raw)
        else:
            if args.replay_raw is None:
                raise DataError("StreamArgs.replay_raw", f"replay of {name} needs its raw files")
            events = events_of_dataset(name, args.replay_raw)
        return cls(events, args.replay_window, args.max_window_events)

    @property
    def num_events(self) -> int:
        return len(self.timestamp)

    def state_dict(self) -> dict[str, Any]:
        return {"users": self.users.state_dict(), "items": self.items.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.users.load_state_dict(state["users"])
        self.items.load_state_dict(state["items"])

    def lag(self) -> Lag:
        return self._lag

    def _index(self, start: StreamPosition) -> int:
        """Event index of ``start``."""
        if start.partition == "":
            return 0
        w = int(np.searchsorted(np.asarray(self.names), start.partition))
        if w >= len(self.names) or self.names[w] != start.partition:
            raise DataError(
                self.source or "replay",
                f"the stream position names window {start.partition!r}, which this replay does "
                "not have",
            )
        size = int(self.bounds[w + 1] - self.bounds[w])
        if start.row > size:
            raise DataError(
                self.source or "replay",
                f"window {start.partition} has {size} events, fewer than the position's row "
                f"{start.row}",
            )
        return int(self.bounds[w]) + start.row

    def windows(self, start: StreamPosition = StreamPosition.start(),  # noqa: B008
                ) -> Iterator[Window]:
        first = self._index(start)
        n = self.num_events
        last_t = int(self.timestamp[-1]) if n else 0
        w0 = int(np.searchsorted(self.bounds, first, side="right")) - 1
        for w in range(max(w0, 0), len(self.names)):
            lo, hi = int(self.bounds[w]), int(self.bounds[w + 1])
            step = self.max_window_events or (hi - lo)
            for a in range(max(lo, first), hi, step):
                b = min(a + step, hi)
                self._lag = Lag(n - b, float(last_t - int(self.timestamp[b - 1])))
                yield Window.cut(
                    self.names[w], a - lo, (a, b) == (lo, hi), self.users, self.items,
                    self.user[a:b], self.item[a:b], self.timestamp[a:b],
                    None if self.rating is None else self.rating[a:b], self._lag,
                )


__all__ = [
    "Events",
    "ReplayStream",
    "events_of_custom",
    "events_of_dataset",
    "events_of_parsed",
    "events_of_processed",
]
