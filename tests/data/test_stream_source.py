"""The stream sources of online training (hstu.data.stream): a folder that partitions land in,
a replay of a finished dataset, exact resume, growing id maps, and bad input set aside."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import gin
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hstu.data.data_args import StreamArgs
from hstu.data.errors import DataError
from hstu.data.stream import (
    REASON,
    SUCCESS,
    Events,
    FolderStream,
    IdMap,
    ReplayStream,
    StreamPosition,
    load_stream,
    make_source,
    save_stream,
)

RAW = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k"
if not RAW.exists():
    RAW = Path("/work/shared/data/ml-100k")

LOGGER = "hstu.data.stream"


# ----------------------------------------------------------------------------- helpers


def land(root: Path, name: str, rows: list[tuple], fmt: str = "csv", success: bool = True,
         columns: tuple[str, ...] = ("user_id", "item_id", "timestamp", "rating"),
         file: str = "part-0000") -> Path:
    """Writes partition ``name`` (one data file of ``rows``) and, if ``success``, its _SUCCESS."""
    part = root / name
    part.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        lines = [",".join(columns)] + [",".join(str(v) for v in r) for r in rows]
        (part / f"{file}.csv").write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        (part / f"{file}.jsonl").write_text(
            "".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows)
        )
    else:
        table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})
        pq.write_table(table, part / f"{file}.parquet")
    if success:
        (part / SUCCESS).write_text("")
    return part


def events(n: int, t0: int, users: int = 5, items: int = 7, seed: int = 0) -> list[tuple]:
    """n rows (user, item, timestamp, rating) in time order from t0."""
    rng = np.random.default_rng(seed)
    ts = t0 + np.sort(rng.integers(0, 50, n))
    return [(int(rng.integers(1, users + 1)) * 10, int(rng.integers(1, items + 1)) * 100, int(t),
             float(rng.integers(1, 6))) for t in ts]


def collect(windows) -> list[tuple]:
    out = []
    for w in windows:
        assert np.array_equal(w.user, w.user.astype(np.int64)) and w.user.dtype == np.int64
        for k in range(w.num_events):
            rating = None if w.rating is None else float(w.rating[k])
            out.append((w.raw_user[k].item(), w.raw_item[k].item(), int(w.timestamp[k]), rating))
    return out


def stream_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def assert_set_aside(root: Path, caplog, name: str, *phrases: str) -> str:
    """One warning line naming the partition, the partition in the quarantine with its reason."""
    lines = stream_lines(caplog)
    assert len(lines) == 1, lines
    assert f"partition {name} " in lines[0]
    moved = root / "_quarantine" / name
    assert moved.is_dir() and not (root / name).exists()
    reason = (moved / REASON).read_text()
    assert reason.count("\n") == 1 and reason.strip() in lines[0]
    for p in phrases:
        assert p in reason, reason
    return reason


# ----------------------------------------------------------------------------- the folder


def test_partitions_in_name_order_every_format(tmp_path):
    a, b, c = events(6, 1000, seed=1), events(5, 2000, seed=2), events(4, 3000, seed=3)
    land(tmp_path, "2024-01-03", c, fmt="parquet")
    land(tmp_path, "2024-01-01", a, fmt="csv")
    land(tmp_path, "2024-01-02", [r[:3] for r in b], fmt="jsonl", columns=("user", "item", "ts"))
    (tmp_path / ".staging-2024-01-04").mkdir()  # a writer's temporary folder: never read
    land(tmp_path / ".staging-2024-01-04", "x", events(3, 4000))
    src = FolderStream(tmp_path)
    ws = list(src.windows())
    assert [w.name for w in ws] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert ws[1].rating is None and ws[0].rating is not None
    got = collect(ws)
    want = a + [(*r[:3], None) for r in b] + c
    assert got == want
    # dense ids in order of first appearance, 1..K
    raw_users = [r[0] for r in want]
    first = list(dict.fromkeys(raw_users))
    assert np.concatenate([w.user for w in ws]).tolist() == [first.index(u) + 1 for u in raw_users]
    assert len(src.users) == len(first)
    assert [w.position_after for w in ws] == [
        StreamPosition("2024-01-01", 6), StreamPosition("2024-01-02", 5), StreamPosition("2024-01-03", 4)
    ]
    assert ws[0].lag.events_waiting == 9 and ws[2].lag.events_waiting == 0
    assert sum(w.new_users for w in ws) == len(first)


def test_windows_cut_partitions_and_resume_mid_partition(tmp_path, caplog):
    parts = {f"p{i}": events(7, 1000 * i, users=9, items=20, seed=i) for i in range(1, 4)}
    for name, rows in parts.items():
        land(tmp_path, name, rows)
    full_src = FolderStream(tmp_path, max_window_events=3)
    full = list(full_src.windows())
    assert [w.name for w in full[:3]] == ["p1[0:3]", "p1[3:6]", "p1[6:7]"]
    assert [w.lag.events_waiting for w in full[:3]] == [18, 15, 14]

    # stop after the 5th window (inside p2), save, and continue in a new source
    src = FolderStream(tmp_path, max_window_events=3)
    it = src.windows()
    head = [next(it) for _ in range(5)]
    pos = head[-1].position_after
    assert pos == StreamPosition("p2", 6)
    save_stream(tmp_path / "_ckpt", pos, src)
    resumed = FolderStream(tmp_path, max_window_events=3)
    start = load_stream(tmp_path / "_ckpt", resumed)
    assert start == pos
    rest = list(resumed.windows(start))
    assert collect(head) + collect(rest) == collect(full)
    assert np.array_equal(np.concatenate([w.user for w in head + rest]),
                          np.concatenate([w.user for w in full]))
    for a, b in ((resumed.users, full_src.users), (resumed.items, full_src.items)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["kind"] == sb["kind"] and sa["keys"].tobytes() == sb["keys"].tobytes()
    assert resumed.state_dict()["consumed"] == full_src.state_dict()["consumed"]
    assert [c[0] for c in resumed.state_dict()["consumed"]] == ["p1", "p2", "p3"]

    # a position without saved state: the partitions before it count as consumed
    bare = FolderStream(tmp_path, max_window_events=3)
    assert collect(bare.windows(pos)) == collect(rest)
    assert not stream_lines(caplog)


def test_follow_picks_up_a_partition_landing_later_and_stops_when_idle(tmp_path):
    land(tmp_path, "p1", events(4, 100))
    late_rows = events(3, 200, seed=5)

    def writer():
        time.sleep(0.3)
        staging = tmp_path / ".p2.tmp"
        land(staging, "x", late_rows)
        (staging / "x").rename(tmp_path / "p2")  # lands by an atomic rename, _SUCCESS inside

    t = threading.Thread(target=writer)
    t.start()
    began = time.monotonic()
    src = FolderStream(tmp_path, follow=True, poll_seconds=0.05, idle_timeout_seconds=1.0)
    ws = list(src.windows())
    took = time.monotonic() - began
    t.join()
    assert [w.name for w in ws] == ["p1", "p2"]
    assert collect(ws)[4:] == late_rows
    assert 1.0 <= took < 10.0  # waited for the idle timeout after p2, then stopped


def test_follow_stops_on_the_stop_signal(tmp_path):
    land(tmp_path, "p1", events(4, 100))
    stop = threading.Event()
    src = FolderStream(tmp_path, follow=True, poll_seconds=0.05, stop=stop)
    began = time.monotonic()
    threading.Timer(0.3, stop.set).start()
    ws = list(src.windows())
    assert [w.name for w in ws] == ["p1"]
    assert time.monotonic() - began < 5.0
    # a callable works as well
    flag = {"stop": True}
    assert list(FolderStream(tmp_path, follow=True, stop=lambda: flag["stop"]).windows()) == []


def test_without_follow_an_incomplete_last_partition_ends_the_stream(tmp_path):
    land(tmp_path, "p1", events(4, 100))
    land(tmp_path, "p2", events(4, 200), success=False)
    assert [w.name for w in FolderStream(tmp_path).windows()] == ["p1"]
    # a writer landing by atomic rename: every visible folder is complete
    assert [w.name for w in FolderStream(tmp_path, require_success=False).windows()] == ["p1", "p2"]


# ----------------------------------------------------------------------------- bad input


def test_malformed_partition_is_set_aside(tmp_path, caplog):
    good1, good2 = events(4, 100), events(4, 300)
    land(tmp_path, "p1", good1)
    bad = land(tmp_path, "p2", events(4, 200))
    text = (bad / "part-0000.csv").read_text().splitlines()
    text[2] = "10,100,soon,3.0"
    (bad / "part-0000.csv").write_text("\n".join(text) + "\n")
    land(tmp_path, "p3", good2)
    ws = list(FolderStream(tmp_path).windows())
    assert collect(ws) == good1 + good2
    assert_set_aside(tmp_path, caplog, "p2", "part-0000.csv:3", "field timestamp", "'soon'")


def test_corrupt_parquet_is_set_aside(tmp_path, caplog):
    good1, good2 = events(4, 100), events(4, 300)
    land(tmp_path, "p1", good1)
    bad = land(tmp_path, "p2", events(4, 200), fmt="parquet")
    data = (bad / "part-0000.parquet").read_bytes()
    (bad / "part-0000.parquet").write_bytes(data[: len(data) // 2])  # cut short
    land(tmp_path, "p3", good2, fmt="parquet")
    ws = list(FolderStream(tmp_path).windows())
    assert collect(ws) == good1 + good2
    assert ws[0].lag.events_waiting == 4  # p3 counted; p2 cannot be
    assert_set_aside(tmp_path, caplog, "p2", "part-0000.parquet", "truncated or corrupt parquet")


def test_events_out_of_time_order_are_put_in_order_and_counted(tmp_path, caplog):
    good = events(4, 100)
    land(tmp_path, "p1", good)
    land(tmp_path, "p2", [(1, 2, 500, 1.0), (1, 3, 510, 1.0), (2, 3, 505, 1.0)])
    src = FolderStream(tmp_path)
    ws = list(src.windows())
    assert collect(ws) == good + [(1, 2, 500, 1.0), (2, 3, 505, 1.0), (1, 3, 510, 1.0)]
    assert ws[1].counts["reordered_events"] == 1 and not src.quarantined
    (line,) = stream_lines(caplog)
    assert line.startswith("stream: partition p2: reordered_events=1; first out of order: ")
    assert "part-0000.csv:4: field timestamp: 505 after 510" in line


def test_unknown_columns_are_set_aside(tmp_path, caplog):
    good = events(3, 100)
    land(tmp_path, "p1", [(*r, "ios") for r in good], columns=("user_id", "item_id", "timestamp", "rating", "device"))
    land(tmp_path, "p2", good[:1], fmt="jsonl")  # a different file: not a duplicate
    ws = list(FolderStream(tmp_path).windows())
    assert collect(ws) == good[:1]
    assert_set_aside(tmp_path, caplog, "p1", "unknown column(s) device", "extra_columns")
    # declared, it is accepted (and not read)
    (tmp_path / "_quarantine" / "p1" / REASON).unlink()
    (tmp_path / "_quarantine" / "p1").rename(tmp_path / "p0")
    ws = list(FolderStream(tmp_path, extra_columns=["device"]).windows())
    assert collect(ws) == good + good[:1]


def test_text_ids_in_a_stream_of_integer_ids_are_set_aside(tmp_path, caplog):
    good = events(3, 100)
    land(tmp_path, "p1", good)
    land(tmp_path, "p2", [(10, 100, 200, 1.0)], file="part-0000")
    land(tmp_path, "p2", [("alice", 100, 210, 1.0)], file="part-0001", columns=("user", "item", "ts", "rating"))
    assert collect(FolderStream(tmp_path).windows()) == good
    assert_set_aside(tmp_path, caplog, "p2", "part-0001.csv: field user: user ids are text", "'alice'")


def test_time_order_note_names_the_files_own_column(tmp_path, caplog):
    land(tmp_path, "p1", [(1, 2, 100, 1.0)], file="part-0000")
    land(tmp_path, "p1", [(1, 2, 60, 1.0), (1, 3, 50, 1.0)], file="part-0001",
         columns=("user", "item", "ts", "rating"))
    ws = list(FolderStream(tmp_path).windows())
    assert collect(ws) == [(1, 3, 50, 1.0), (1, 2, 60, 1.0), (1, 2, 100, 1.0)]  # merged by time
    assert ws[0].counts == {"merged_files": 2, "reordered_events": 1, "duplicate_events": 0,
                            "read_retries": 0}
    (line,) = stream_lines(caplog)
    assert "merged_files=2, reordered_events=1; first out of order: " in line
    assert "part-0001.csv:3: field ts: 50 after 60" in line


def test_late_partition_is_set_aside(tmp_path, caplog):
    a, c = events(4, 100), events(4, 300)
    land(tmp_path, "p1", a)
    land(tmp_path, "p3", c)
    src = FolderStream(tmp_path)
    ws = list(src.windows())
    save_stream(tmp_path / "_ckpt", ws[-1].position_after, src)
    land(tmp_path, "p2", events(4, 200, seed=9))  # lands after the stream passed it
    d = events(2, 400, seed=4)
    land(tmp_path, "p4", d)
    again = FolderStream(tmp_path)
    got = list(again.windows(load_stream(tmp_path / "_ckpt", again)))
    assert collect(ws) + collect(got) == a + c + d
    assert_set_aside(tmp_path, caplog, "p2", "arrived after the stream passed it", "partition p3")


def test_duplicate_partition_is_set_aside(tmp_path, caplog):
    a, b = events(5, 100), events(5, 300)
    land(tmp_path, "p1", a)
    land(tmp_path, "p2", a, file="other-name")  # the same content under another name
    land(tmp_path, "p3", b)
    assert collect(FolderStream(tmp_path).windows()) == a + b
    assert_set_aside(tmp_path, caplog, "p2", "duplicate", "partition p1")


def test_partition_changed_after_it_was_consumed_is_set_aside(tmp_path, caplog):
    a, b = events(5, 100), events(5, 300)
    land(tmp_path, "p1", a)
    src = FolderStream(tmp_path)
    ws = list(src.windows())
    save_stream(tmp_path / "_ckpt", ws[-1].position_after, src)
    again = FolderStream(tmp_path)
    start = load_stream(tmp_path / "_ckpt", again)
    it = again.windows(start)
    assert list(it) == []  # nothing new; p1 is looked at (baseline) and skipped
    land(tmp_path, "p1", events(2, 150, seed=3), file="part-0001")  # a file added to consumed p1
    land(tmp_path, "p2", b)
    got = list(again.windows(start))
    assert collect(ws) + collect(got) == a + b
    assert_set_aside(tmp_path, caplog, "p1", "changed after it was consumed")


def test_partition_that_never_completes_is_set_aside(tmp_path, caplog):
    a, c = events(4, 100), events(4, 300)
    land(tmp_path, "p1", a)
    land(tmp_path, "p2", events(4, 200), success=False)
    land(tmp_path, "p3", c)
    began = time.monotonic()
    ws = list(FolderStream(tmp_path, poll_seconds=0.05, incomplete_timeout_seconds=0.3).windows())
    assert time.monotonic() - began >= 0.3
    assert collect(ws) == a + c
    assert_set_aside(tmp_path, caplog, "p2", "no _SUCCESS after", "newer partitions are complete")


def test_a_quarantine_inside_the_folder_under_a_visible_name_is_not_read(tmp_path, caplog):
    a = events(3, 100)
    land(tmp_path, "p1", a)
    land(tmp_path, "p2", [(1, 2, 50, 1.0), (1, 2, "soon", 1.0)])  # malformed
    src = FolderStream(tmp_path, quarantine_dir=tmp_path / "zz-bad")
    assert collect(src.windows()) == a
    assert (tmp_path / "zz-bad" / "p2" / REASON).exists()
    assert collect(src.windows()) == []  # listed again: the quarantine is no partition
    assert len(stream_lines(caplog)) == 1


def test_a_file_at_the_top_of_the_folder_is_set_aside(tmp_path, caplog):
    a = events(3, 100)
    land(tmp_path, "p1", a)
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    assert collect(FolderStream(tmp_path).windows()) == a
    assert_set_aside(tmp_path, caplog, "events.csv", "not a folder")
    assert (tmp_path / "_quarantine" / "events.csv" / "events.csv").exists()


def test_resume_refuses_a_partition_that_changed_under_it(tmp_path):
    land(tmp_path, "p1", events(6, 100))
    src = FolderStream(tmp_path, max_window_events=4)
    w = next(src.windows())
    save_stream(tmp_path / "_ckpt", w.position_after, src)
    land(tmp_path, "p1", events(6, 100, seed=7))  # rewritten
    again = FolderStream(tmp_path, max_window_events=4)
    with pytest.raises(DataError, match="p1: changed since the checkpoint"):
        list(again.windows(load_stream(tmp_path / "_ckpt", again)))


# ----------------------------------------------------------------------------- id maps


def test_id_maps_grow_in_stream_order_and_round_trip_bitwise(tmp_path):
    m = IdMap("item")
    ids, new = m.map(np.array([30, 10, 30, 20]))
    assert ids.tolist() == [1, 2, 1, 3] and new == 3
    ids, new = m.map(np.array([20, 5, 10, 7, 5]))
    assert ids.tolist() == [3, 4, 2, 5, 4] and new == 2
    assert m.raw(np.array([5, 1])).tolist() == [7, 30]
    assert m.lookup(np.array([7, 99])).tolist() == [5, 0]
    m.save(tmp_path / "items.npy")
    m2 = IdMap("item")
    m2.load(tmp_path / "items.npy")
    assert m2.state_dict()["keys"].tobytes() == m.state_dict()["keys"].tobytes()
    assert m2.map(np.array([99, 30]))[0].tolist() == [6, 1]
    with pytest.raises(DataError, match="item ids are text"):
        m.check(np.array(["a"]), "f.csv", "item_id")

    t = IdMap("user")
    t.map(np.array(["bo", "alexandra"]))
    assert t.map(np.array([17, "bo"], dtype=object).astype(str))[0].tolist() == [3, 1]
    assert t.map(np.array([17]))[0].tolist() == [3]  # an integer id in a map of text ids
    t.save(tmp_path / "users.npy")
    t2 = IdMap("user")
    t2.load(tmp_path / "users.npy")
    assert t2.state_dict()["keys"].tolist() == ["bo", "alexandra", "17"]
    assert t2.lookup(np.array(["alexandra"])).tolist() == [2]


# ----------------------------------------------------------------------------- replay


def test_replay_by_day_hour_and_events(tmp_path):
    day = 86400
    ts = np.array([5 * day + 10, 3 * day + 7200, 3 * day + 10, 5 * day + 10, 3 * day + 7200, 4 * day], dtype=np.int64)
    ev = Events(np.arange(6, dtype=np.int64) + 1, np.arange(6, dtype=np.int64) * 10 + 1, ts, None)
    by_day = list(ReplayStream(ev, "day").windows())
    assert [w.name for w in by_day] == ["1970-01-04", "1970-01-05", "1970-01-06"]
    # time order, ties in file order (rows 1 and 4 at the same second; rows 0 and 3)
    assert np.concatenate([w.raw_user for w in by_day]).tolist() == [3, 2, 5, 6, 1, 4]
    by_hour = list(ReplayStream(ev, "hour").windows())
    assert [w.name for w in by_hour] == ["1970-01-04T00", "1970-01-04T02", "1970-01-05T00", "1970-01-06T00"]
    by_n = list(ReplayStream(ev, "events:4").windows())
    assert [w.num_events for w in by_n] == [4, 2]
    assert [w.lag.events_waiting for w in by_n] == [2, 0]
    # resume inside a window
    rs = ReplayStream(ev, "day", max_window_events=1)
    it = rs.windows()
    head = [next(it) for _ in range(2)]
    save_stream(tmp_path, head[-1].position_after, rs)
    rs2 = ReplayStream(ev, "day", max_window_events=1)
    rest = list(rs2.windows(load_stream(tmp_path, rs2)))
    assert np.concatenate([w.raw_user for w in head + rest]).tolist() == [3, 2, 5, 6, 1, 4]
    assert np.concatenate([w.user for w in head + rest]).tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(DataError, match="does not have"):
        next(ReplayStream(ev, "day").windows(StreamPosition("1970-01-09", 0)))


@pytest.mark.skipif(not (RAW / "u.data").exists(), reason=f"real MovieLens-100K not found at {RAW}")
def test_replay_of_ml100k_by_day_covers_every_event_once_in_time_order():
    raw = np.loadtxt(RAW / "u.data", dtype=np.int64)  # user, item, rating, time: file order
    order = np.argsort(raw[:, 3], kind="stable")
    src = make_source(StreamArgs(replay_dataset="ml-100k", replay_raw=str(RAW), replay_window="day"))
    ws = list(src.windows())
    got = np.stack([
        np.concatenate([w.raw_user for w in ws]),
        np.concatenate([w.raw_item for w in ws]),
        np.concatenate([w.rating for w in ws]).astype(np.int64) + 1,
        np.concatenate([w.timestamp for w in ws]),
    ], axis=1)
    assert got.shape == (100000, 4)
    assert np.array_equal(got, raw[order])
    days = [np.unique(w.timestamp // 86400) for w in ws]
    assert all(len(d) == 1 for d in days)
    assert np.all(np.diff([d[0] for d in days]) > 0)
    names = [w.name for w in ws]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert len(src.users) == 943 and len(src.items) == 1682
    assert ws[-1].lag.events_waiting == 0 and ws[0].lag.events_waiting == 100000 - ws[0].num_events


def test_stream_args_bind_from_gin(tmp_path):
    land(tmp_path, "p1", events(3, 100))
    gin.clear_config()
    try:
        gin.parse_config(f"StreamArgs.path = '{tmp_path}'\nStreamArgs.max_window_events = 2")
        src = make_source(StreamArgs())
    finally:
        gin.clear_config()
    assert isinstance(src, FolderStream)
    assert [w.num_events for w in src.windows()] == [2, 1]


def test_a_folder_source_takes_every_stream_setting(tmp_path):
    from hstu.data.data_args import CustomDataArgs

    args = StreamArgs(
        path=str(tmp_path), follow=True, poll_seconds=0.5, idle_timeout_seconds=7.0,
        incomplete_timeout_seconds=9.0, require_success=False, quarantine_dir=str(tmp_path / "q"),
        max_window_events=11, timestamp_unit="ms", rating_column="stars", extra_columns=["x"],
    )
    mapping = CustomDataArgs(user_column="u", item_column="i", timestamp_column="t", delimiter=";")
    src = make_source(args, columns=mapping)
    assert isinstance(src, FolderStream)
    assert (src.follow, src.poll_seconds, src.idle_timeout_seconds, src.incomplete_timeout_seconds,
            src.require_success, src.quarantine_dir, src.max_window_events, src.extra_columns) == (
        True, 0.5, 7.0, 9.0, False, tmp_path / "q", 11, ("x",))
    cols = src.columns
    assert (cols.user_column, cols.item_column, cols.timestamp_column, cols.delimiter,
            cols.timestamp_unit, cols.action_column) == ("u", "i", "t", ";", "ms", "stars")


def test_replay_of_own_data_keeps_its_rating_values(tmp_path):
    from hstu.data.data_args import CustomDataArgs

    (tmp_path / "log.csv").write_text(
        "user_id,item_id,timestamp,rating\nu1,a,30,4.5\nu2,b,10,0.5\nu1,b,20,3.0\n"
    )
    src = make_source(
        StreamArgs(replay_dataset="custom", replay_window="events:2"),
        columns=CustomDataArgs(path=str(tmp_path / "log.csv"), action_column="rating"),
    )
    ws = list(src.windows())
    assert [w.raw_user.tolist() for w in ws] == [["u2", "u1"], ["u1"]]
    assert np.concatenate([w.rating for w in ws]).tolist() == [0.5, 3.0, 4.5]
    assert np.concatenate([w.user for w in ws]).tolist() == [1, 2, 2]


def test_empty_partitions_are_consumed_without_a_window(tmp_path, caplog):
    a, b = events(3, 100), events(3, 300)
    land(tmp_path, "p1", a)
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / SUCCESS).write_text("")  # no data file at all
    land(tmp_path, "p3", [])  # a header, no rows
    land(tmp_path, "p3b", [])  # the same again
    (tmp_path / "p4").mkdir()
    (tmp_path / "p4" / "part-0000.jsonl").write_text("")  # a 0-byte file
    (tmp_path / "p4" / SUCCESS).write_text("")
    land(tmp_path, "p5", b)
    src = FolderStream(tmp_path)
    ws = list(src.windows())
    assert [w.name for w in ws] == ["p1", "p5"] and collect(ws) == a + b
    assert not stream_lines(caplog)  # empty partitions are not duplicates of each other
    assert [c[0] for c in src.state_dict()["consumed"]] == ["p1", "p2", "p3", "p3b", "p4", "p5"]


def test_stop_between_windows_leaves_an_exact_position(tmp_path):
    rows = events(10, 100, seed=2)
    land(tmp_path, "p1", rows)
    stop = threading.Event()
    src = FolderStream(tmp_path, max_window_events=4, stop=stop)
    got = []
    for w in src.windows():
        got.append(w)
        stop.set()  # the loop was asked to stop while it trained on this window
    assert len(got) == 1 and got[0].position_after == StreamPosition("p1", 4)
    save_stream(tmp_path / "_ckpt", got[0].position_after, src)
    again = FolderStream(tmp_path, max_window_events=4)
    rest = list(again.windows(load_stream(tmp_path / "_ckpt", again)))
    assert collect(got) + collect(rest) == rows


def test_events_added_to_a_consumed_empty_partition_are_set_aside(tmp_path, caplog):
    land(tmp_path, "p1", [])
    src = FolderStream(tmp_path)
    assert list(src.windows()) == []
    assert list(src.windows()) == []  # looked at again: unchanged
    late = events(2, 100)
    land(tmp_path, "p1", late, file="part-0001")
    assert list(src.windows()) == []
    assert_set_aside(tmp_path, caplog, "p1", "changed after it was consumed")


def test_replay_of_a_preprocessed_folder(tmp_path):
    from hstu.data.data_args import CustomDataArgs
    from hstu.data.preprocess import preprocess

    rows = [("a", "x", 30), ("b", "y", 10), ("a", "y", 20), ("b", "z", 40), ("c", "x", 15), ("c", "z", 15)]
    (tmp_path / "log.csv").write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    preprocess("custom", tmp_path / "log.csv", tmp_path / "out", custom=CustomDataArgs(), verbose=False,
               output_name="mine")
    src = make_source(StreamArgs(replay_dataset="processed", replay_raw=str(tmp_path / "out" / "mine"),
                                 replay_window="events:4"))
    ws = list(src.windows())
    assert [w.num_events for w in ws] == [4, 2]
    ts = np.concatenate([w.timestamp for w in ws])
    assert ts.tolist() == sorted(t for *_, t in rows)
    # the preprocessor's dense ids (a=1, b=2, c=3; x=1, y=2, z=3) in time order, ties by user
    assert np.concatenate([w.raw_user for w in ws]).tolist() == [2, 3, 3, 1, 1, 2]
    assert np.concatenate([w.raw_item for w in ws]).tolist() == [2, 1, 3, 2, 1, 3]


def test_a_partition_landing_late_during_follow_is_set_aside(tmp_path, caplog):
    a, c, d = events(3, 100), events(3, 300), events(3, 400, seed=8)
    land(tmp_path, "p1", a)
    land(tmp_path, "p3", c)

    def writer():
        time.sleep(0.3)
        land(tmp_path, "p2", events(3, 200, seed=9))  # behind the stream: late
        land(tmp_path, "p4", d)

    t = threading.Thread(target=writer)
    t.start()
    ws = list(FolderStream(tmp_path, follow=True, poll_seconds=0.05, idle_timeout_seconds=1.0).windows())
    t.join()
    assert collect(ws) == a + c + d
    assert_set_aside(tmp_path, caplog, "p2", "arrived after the stream passed it")


_READER = """
import sys
from pathlib import Path
from hstu.data.stream import FolderStream, StreamPosition, load_stream, save_stream
root, ckpt = map(Path, sys.argv[1:3])
src = FolderStream(root, max_window_events=30)
pos = load_stream(ckpt, src) if (ckpt / "stream.json").exists() else StreamPosition.start()
print("ready", flush=True)
for w in src.windows(pos):
    save_stream(ckpt, w.position_after, src)
print("done", flush=True)
"""


def test_stream_state_killed_mid_save_resumes_exactly(tmp_path):
    """kill -9 of a reader saving its state after every window, at 5 moments: each time the
    saved state (position, id maps, ledger) is the uninterrupted run's at that position, and
    the restarted reader ends in the uninterrupted run's final state."""
    import os
    import signal
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    root = tmp_path / "stream"
    for k in range(6):  # ids mostly new: the maps grow all along
        rows = [(int(u), int(i), 1000 * k + j, 1.0)
                for j, (u, i) in enumerate(zip(rng.integers(1, 10**9, 300), rng.integers(1, 10**9, 300)))]
        land(root, f"p{k:02d}", rows)
    ref = FolderStream(root, max_window_events=30)
    states = {StreamPosition.start(): ([], [], [])}
    for w in ref.windows():
        st = ref.state_dict()
        states[w.position_after] = (st["users"]["keys"].tolist(), st["items"]["keys"].tolist(), st["consumed"])
    final = w.position_after

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    maps_ahead = 0
    for delay in (0.3, 0.15, 0.45, 0.2, 0.35, None):
        proc = subprocess.Popen([sys.executable, "-c", _READER, str(root), str(ckpt)],
                                stdout=subprocess.PIPE, text=True, cwd=repo, env=env)
        assert proc.stdout.readline().strip() == "ready"
        if delay is None:  # the last run goes to the end
            assert proc.stdout.readline().strip() == "done"
            proc.wait()
        else:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        for p in ckpt.iterdir():
            if p.name.startswith("."):
                p.unlink()  # a killed save's temporary file: never read
        saved = json.loads((ckpt / "stream.json").read_text())
        maps_ahead += len(np.load(ckpt / "user_ids.npy")) > saved["num_users"]
        src = FolderStream(root, max_window_events=30)
        pos = load_stream(ckpt, src)
        st = src.state_dict()
        assert (st["users"]["keys"].tolist(), st["items"]["keys"].tolist(), st["consumed"]) == states[pos]
    assert pos == final
    print(f"kills that left the id maps ahead of stream.json: {maps_ahead} of 5")


def test_id_maps_saved_ahead_of_the_position_are_cut_back(tmp_path):
    """What a kill between save_stream's files leaves (the maps of window k+1 beside the
    stream.json of window k), made on purpose: the load is window k's state exactly."""
    for k in range(3):
        land(tmp_path / "stream", f"p{k}", events(6, 100 * k, users=50, items=50, seed=k))
    src = FolderStream(tmp_path / "stream", max_window_events=4)
    it = src.windows()
    w = next(it)
    save_stream(tmp_path / "ckpt", w.position_after, src)
    want = src.state_dict()
    for _ in range(3):
        next(it)
    assert len(src.users) > len(want["users"]["keys"])
    src.users.save(tmp_path / "ckpt" / "user_ids.npy")  # killed here: stream.json not rewritten
    src.items.save(tmp_path / "ckpt" / "item_ids.npy")
    again = FolderStream(tmp_path / "stream", max_window_events=4)
    assert load_stream(tmp_path / "ckpt", again) == w.position_after
    got = again.state_dict()
    assert got["users"]["keys"].tobytes() == want["users"]["keys"].tobytes()
    assert got["items"]["keys"].tobytes() == want["items"]["keys"].tobytes()
    assert got["consumed"] == want["consumed"]
