"""Online training's data side: a stream of events as windows (docs/online.md; its section
"For the training loop" shows the calls in order).

Sources: :class:`FolderStream` (a folder that partitions land in; bad partitions are set
aside with a reason, and put back by :func:`reingest`, ``python -m hstu.data.stream
reingest``) and :class:`ReplayStream` (a finished dataset cut into windows). Ids arrive dense
through growing :class:`IdMap` s, or keyed by :class:`HashedIds` (no map). Users' histories:
:mod:`hstu.data.user_store`.
"""

from __future__ import annotations

from hstu.data.data_args import CustomDataArgs, StreamArgs
from hstu.data.stream.core import (
    HashedIds,
    IdMap,
    Lag,
    StreamPosition,
    StreamSource,
    Window,
    load_stream,
    save_stream,
)
from hstu.data.stream.folder import (
    COUNTS,
    QUARANTINE,
    REASON,
    REINGEST,
    SUCCESS,
    FolderStream,
    Quarantined,
    ReadFailed,
    Stop,
    reingest,
)
from hstu.data.stream.replay import Events, ReplayStream


def make_source(
    args: StreamArgs, stop: Stop = None, columns: CustomDataArgs | None = None
) -> FolderStream | ReplayStream:
    """The source StreamArgs describes: the folder at ``path``, or the replay of
    ``replay_dataset``. ``columns``: the own-data column mapping (CustomDataArgs) when the
    names are not the defaults (also the custom replay's input)."""
    source: FolderStream | ReplayStream | None = None
    if args.path is not None:
        source = FolderStream.from_args(args, stop=stop, columns=columns)
    elif args.replay_dataset is not None:
        source = ReplayStream.from_args(args, custom=columns)
    if source is not None:
        if args.ids == "hashed":  # no map that grows with the ids seen (docs/online.md "Ids")
            source.users = HashedIds("user")
            source.items = HashedIds("item", keep_names=True)
        return source
    from hstu.validation import ConfigError

    raise ConfigError(
        "StreamArgs", "path", "set path (a stream folder) or replay_dataset (a replay)"
    )


__all__ = [
    "COUNTS",
    "QUARANTINE",
    "REASON",
    "REINGEST",
    "SUCCESS",
    "Events",
    "FolderStream",
    "HashedIds",
    "IdMap",
    "Lag",
    "Quarantined",
    "ReadFailed",
    "ReplayStream",
    "StreamPosition",
    "StreamSource",
    "Window",
    "load_stream",
    "make_source",
    "reingest",
    "save_stream",
]
