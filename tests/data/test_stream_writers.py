"""A stream folder as writers write it (docs/online.md "The stream folder", "Bad input",
"Re-ingesting a quarantined partition"): partitions of several part files merged by time,
events out of order in a file put in order, repeated events dropped, OS errors retried, and a
quarantined partition put back once. Each case: its log line, its count, every good event once
in order."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hstu.data.data_args import StreamArgs
from hstu.data.errors import DataError
from hstu.data.stream import (
    COUNTS,
    REASON,
    REINGEST,
    SUCCESS,
    FolderStream,
    ReadFailed,
    StreamPosition,
    load_stream,
    make_source,
    save_stream,
)
from hstu.data.stream.__main__ import main as stream_main
from tests.data.test_stream_source import LOGGER, RAW, collect, events, land, stream_lines

REPO = Path(__file__).resolve().parents[2]


def lines_at(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def merged(*files: list[tuple]) -> list[tuple]:
    """The reference merge: events by time, ties by file (in the order given), then row."""
    keyed = [(r[2], f, k, r) for f, rows in enumerate(files) for k, r in enumerate(rows)]
    return [r for *_, r in sorted(keyed, key=lambda x: x[:3])]


def total(windows, key: str) -> int:
    return sum(w.counts.get(key, 0) for w in windows)


# ----------------------------------------------------------------------------- (a) part files


def test_interleaved_part_files_are_merged_by_time_ties_by_file_then_row(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # two writers' files, each in time order, interleaved in time, with ties across them
    f0 = [(1, 100, 10, 1.0), (2, 101, 20, 2.0), (3, 102, 20, 3.0), (1, 103, 40, 4.0)]
    f1 = [(4, 200, 10, 5.0), (5, 201, 15, 1.0), (6, 202, 20, 2.0), (4, 203, 50, 3.0)]
    land(tmp_path, "p1", f1, file="part-0001")  # written first: file name order decides ties
    land(tmp_path, "p1", f0, file="part-0000")
    after = events(3, 100, seed=4)
    land(tmp_path, "p2", after)
    src = FolderStream(tmp_path)
    ws = list(src.windows())
    got = collect(ws)
    assert got[:8] == merged(f0, f1)
    assert [r[1] for r in got[:8]] == [100, 200, 201, 101, 102, 202, 103, 203]
    assert got[8:] == after
    assert ws[0].counts == {"merged_files": 2, "reordered_events": 0, "duplicate_events": 0,
                            "read_retries": 0}
    assert ws[1].counts == dict.fromkeys(COUNTS, 0)  # one file: nothing merged
    assert not src.quarantined and not (tmp_path / "_quarantine").exists()
    assert lines_at(caplog, logging.INFO) == ["stream: partition p1: merged_files=2"]
    assert not stream_lines(caplog)  # no warning
    assert src.state_dict()["consumed"][0][2] == 8


def test_a_partition_of_parts_in_every_format_merges(tmp_path):
    a = [(1, 1, 5, 1.0), (1, 2, 30, 1.0)]
    b = [(2, 3, 10, 2.0), (2, 4, 30, 2.0)]
    c = [(3, 5, 1, 3.0), (3, 6, 30, 3.0)]
    land(tmp_path, "p1", a, file="part-0000", fmt="csv")
    land(tmp_path, "p1", b, file="part-0001", fmt="jsonl")
    land(tmp_path, "p1", c, file="part-0002", fmt="parquet")
    ws = list(FolderStream(tmp_path).windows())
    assert collect(ws) == merged(a, b, c)
    assert ws[0].counts["merged_files"] == 3


# ----------------------------------------------------------------------------- (b) in-file order


def test_events_out_of_order_in_a_file_are_sorted_and_counted(tmp_path, caplog):
    # one late event (at the end, 5 before 10..50): one event had to move, not six
    late = [(1, k, t, 1.0) for k, t in enumerate([10, 20, 30, 40, 50, 5])]
    # reversed: all but one had to move; equal times are in order
    backwards = [(2, k, t, 2.0) for k, t in enumerate([70, 70, 60, 50])]
    land(tmp_path, "p1", late)
    land(tmp_path, "p2", backwards)
    src = FolderStream(tmp_path)
    ws = list(src.windows())
    assert collect(ws) == merged(late) + merged(backwards)
    assert [w.counts["reordered_events"] for w in ws] == [1, 2]
    assert not src.quarantined
    first, second = stream_lines(caplog)
    assert first.startswith("stream: partition p1: reordered_events=1; first out of order: ")
    assert first.endswith("p1/part-0000.csv:7: field timestamp: 5 after 50")
    assert second.endswith("p2/part-0000.csv:4: field timestamp: 60 after 70")


# ----------------------------------------------------------------------------- (c) duplicates


def test_repeated_events_are_dropped_first_kept(tmp_path, caplog):
    f0 = [(1, 7, 10, 1.0), (1, 7, 10, 2.0), (1, 8, 10, 3.0), (2, 7, 10, 4.0), (1, 7, 11, 5.0)]
    f1 = [(2, 7, 5, 1.0), (1, 7, 10, 5.0), (2, 7, 10, 2.5)]
    land(tmp_path, "p1", f0, file="part-0000")
    land(tmp_path, "p1", f1, file="part-0001")
    src = FolderStream(tmp_path)
    (w,) = list(src.windows())
    assert collect([w]) == [(2, 7, 5, 1.0), (1, 7, 10, 1.0), (1, 8, 10, 3.0), (2, 7, 10, 4.0),
                            (1, 7, 11, 5.0)]  # the first of each (same user, item, time) stays
    assert w.counts["duplicate_events"] == 3 and w.counts["merged_files"] == 2
    assert w.position_after == StreamPosition("p1", 5)
    assert src.state_dict()["consumed"][0][2] == 5  # the ledger counts the rows kept
    (line,) = stream_lines(caplog)
    assert "merged_files=2, duplicate_events=3; first duplicate: " in line
    assert line.endswith("p1/part-0000.csv:3 repeats " + str(tmp_path / "p1" / "part-0000.csv") + ":2")
    assert not src.quarantined


def test_text_ids_and_millisecond_duplicates(tmp_path):
    rows = [("a", "x", 1000), ("a", "x", 1001), ("a", "x", 1000), ("b", "x", 1000)]
    land(tmp_path, "p1", rows, columns=("user_id", "item_id", "timestamp"))
    (w,) = list(FolderStream(tmp_path, columns=None).windows())
    assert w.raw_user.tolist() == ["a", "b", "a"] and w.counts["duplicate_events"] == 1
    # in milliseconds, 1000 and 1001 are the same second but two events (full precision)
    src = make_source(StreamArgs(path=str(tmp_path), timestamp_unit="ms"))
    (w,) = list(src.windows())
    assert w.num_events == 3 and w.timestamp.tolist() == [1, 1, 1]


# ----------------------------------------------------------------------------- (d) OS errors


def failing_reads(monkeypatch, target: Path, times: int | None) -> dict:
    """The stream's reads of ``target`` raise EIO ``times`` times (None: always)."""
    from hstu.data.stream import folder

    seen = {"failed": 0}
    read = folder._read_file

    def read_file(path: Path) -> bytes:
        if path == target and (times is None or seen["failed"] < times):
            seen["failed"] += 1
            raise OSError(5, "Input/output error", str(path))
        return read(path)

    monkeypatch.setattr(folder, "_read_file", read_file)
    return seen


def test_a_read_error_is_retried_with_backoff_not_set_aside(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    a, b = events(4, 100, seed=1), events(4, 200, seed=2)
    land(tmp_path, "p1", a)
    land(tmp_path, "p2", b)
    target = tmp_path / "p2" / "part-0000.csv"
    seen = failing_reads(monkeypatch, target, 2)
    waits: list[float] = []
    src = FolderStream(tmp_path, retry_backoff_seconds=0.5, sleep=waits.append)
    ws = list(src.windows())
    assert collect(ws) == a + b and seen["failed"] == 2
    assert waits == [0.5, 1.0]  # doubling
    assert [w.counts["read_retries"] for w in ws] == [0, 2]
    assert not src.quarantined and target.exists()
    warned = stream_lines(caplog)
    assert warned == [f"stream: reading {target} failed: Input/output error; retry {k} of 5 in {s:g} s"
                      for k, s in ((1, 0.5), (2, 1.0))]
    assert lines_at(caplog, logging.INFO) == ["stream: partition p2: read_retries=2"]


def test_a_read_error_that_lasts_stops_the_run_in_one_line(tmp_path, caplog, monkeypatch):
    a, b = events(4, 100, seed=1), events(4, 200, seed=2)
    land(tmp_path, "p1", a)
    land(tmp_path, "p2", b)
    target = tmp_path / "p2" / "part-0000.csv"
    seen = failing_reads(monkeypatch, target, None)
    src = FolderStream(tmp_path, read_retries=3, retry_backoff_seconds=0.001)
    it = src.windows()
    got = [next(it)]  # p1
    with pytest.raises(ReadFailed) as err:
        next(it)
    assert isinstance(err.value, DataError) and collect(got) == a
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{target}: cannot be read: Input/output error (tried 4 times, "
                              "StreamArgs.read_retries=3)")
    assert seen["failed"] == 4 and len(stream_lines(caplog)) == 3  # one line per retry
    assert not src.quarantined and not (tmp_path / "_quarantine").exists() and target.exists()
    # readable again: a run resumed from the last window reads it
    monkeypatch.undo()
    save_stream(tmp_path / "_ckpt", got[-1].position_after, src)
    again = FolderStream(tmp_path)
    assert collect(again.windows(load_stream(tmp_path / "_ckpt", again))) == b


def test_a_listing_error_is_retried(tmp_path, monkeypatch):
    from hstu.data.stream import folder

    a = events(4, 100)
    land(tmp_path, "p1", a)
    calls = {"n": 0}
    real = folder._data_files

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(folder, "_data_files", flaky)
    (w,) = list(FolderStream(tmp_path, retry_backoff_seconds=0.0).windows())
    assert collect([w]) == a and w.counts["read_retries"] == 1


def test_retry_settings_from_stream_args(tmp_path):
    land(tmp_path, "p1", events(2, 100))
    src = make_source(StreamArgs(path=str(tmp_path), read_retries=2, retry_backoff_seconds=0.25))
    assert (src.read_retries, src.retry_backoff_seconds) == (2, 0.25)
    assert (StreamArgs().read_retries, StreamArgs().retry_backoff_seconds) == (5, 1.0)
    from hstu.validation import ConfigError

    with pytest.raises(ConfigError, match="read_retries"):
        StreamArgs(read_retries=-1)
    with pytest.raises(ConfigError, match="retry_backoff_seconds"):
        StreamArgs(retry_backoff_seconds=-1.0)


# ----------------------------------------------------------------------------- (e) re-ingest


def test_a_fixed_partition_is_reingested_once_also_across_resume(tmp_path, caplog, capsys):
    root = tmp_path / "events"
    a, b, c, d = (events(4, 100 * k, seed=k) for k in range(1, 5))
    land(root, "p1", a)
    bad = land(root, "p2", b)
    text = (bad / "part-0000.csv").read_text().splitlines()
    text[2] = "10,100,soon,3.0"
    (bad / "part-0000.csv").write_text("\n".join(text) + "\n")
    land(root, "p3", c)
    src = FolderStream(root, max_window_events=3)
    ws = list(src.windows())
    assert collect(ws) == a + c and len(src.quarantined) == 1
    ckpt = tmp_path / "ckpt"
    save_stream(ckpt, ws[-1].position_after, src)  # the stream is at p3: p2 sorts before it

    # fixed in the quarantine, then put back by the command (a process of its own)
    fixed = root / "_quarantine" / "p2" / "part-0000.csv"
    text[2] = ",".join(str(v) for v in b[1])
    fixed.write_text("\n".join(text) + "\n")
    done = subprocess.run([sys.executable, "-m", "hstu.data.stream", "reingest", str(root), "p2"],
                          check=False, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"re-ingested p2 as {root / 'p2'}: the stream reads it at its next partition"
    back = root / "p2"
    assert (back / REINGEST).exists() and (back / SUCCESS).exists() and not (back / REASON).exists()
    assert "it had been set aside: " in (back / REINGEST).read_text()
    assert not (root / "_quarantine" / "p2").exists()
    land(root, "p4", d)

    caplog.clear()
    again = FolderStream(root, max_window_events=3)
    start = load_stream(ckpt, again)
    it = again.windows(start)
    first = next(it)  # p2 is read before p4, behind the position, not refused as late
    assert first.name == "p2[0:3]" and first.position_before == StreamPosition("p2", 0)
    save_stream(ckpt, first.position_after, again)  # a checkpoint inside the re-ingested partition
    rest = list(it)
    assert collect([first] + rest) == b + d
    assert not again.quarantined and not stream_lines(caplog)
    assert collect(again.windows(rest[-1].position_after)) == []  # listed again: nothing twice
    save_stream(tmp_path / "ckpt_end", rest[-1].position_after, again)

    # a resume inside p2 yields its rest and p4, once; a resume at the end, nothing
    mid = FolderStream(root, max_window_events=3)
    assert collect(mid.windows(load_stream(ckpt, mid))) == b[3:] + d
    end = FolderStream(root, max_window_events=3)
    assert collect(end.windows(load_stream(tmp_path / "ckpt_end", end))) == []
    assert not mid.quarantined and not end.quarantined
    # a bare position inside it (no ledger) cannot tell what was consumed: one line
    bare = FolderStream(root, max_window_events=3)
    with pytest.raises(DataError, match="re-ingested partition.*needs the saved ledger"):
        next(bare.windows(first.position_after))

    # main(): a partition set aside as late, put back under another name
    land(root, "p0", events(2, 50, seed=9))
    e = FolderStream(root, max_window_events=3)
    assert collect(e.windows(load_stream(tmp_path / "ckpt_end", e))) == []
    assert "arrived after the stream passed it" in e.quarantined[0].reason
    assert stream_main(["reingest", str(root), "p0", "--as", "p0-again"]) == 0
    capsys.readouterr()
    e2 = FolderStream(root, max_window_events=3)
    assert collect(e2.windows(load_stream(tmp_path / "ckpt_end", e2))) == events(2, 50, seed=9)
    assert "p0-again" in [c[0] for c in e2.state_dict()["consumed"]]


def test_reingest_refuses_in_one_line(tmp_path, capsys):
    root = tmp_path / "events"
    land(root, "p1", events(2, 100))
    (root / "_quarantine" / "p2").mkdir(parents=True)
    (root / "_quarantine" / "p2" / "notes.md").write_text("x")
    cases = {
        ("nope",): "no such quarantined partition (in",
        ("p2", "--as", "p1"): "is in the stream folder already",
        ("p2", "--as", "_hidden"): "'_hidden': not a partition name",
        ("p2",): "notes.md: not a data file",
    }
    for args, phrase in cases.items():
        assert stream_main(["reingest", str(root), *args]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and phrase in err
    assert stream_main(["reingest", str(tmp_path / "missing"), "p2"]) == 1
    assert "no such stream folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        stream_main(["reingest", str(root)])
    assert usage.value.code == 2
    assert (root / "_quarantine" / "p2" / "notes.md").exists()  # nothing moved


def test_a_reingested_copy_of_a_consumed_partition_is_a_duplicate(tmp_path, caplog):
    a = events(4, 100)
    land(tmp_path, "p1", a)
    land(tmp_path, "p2", events(4, 200, seed=3))
    src = FolderStream(tmp_path)
    list(src.windows())
    twin = land(tmp_path / "_quarantine", "p0", a)  # the same events as p1
    (twin / REASON).write_text("something\n")
    assert stream_main(["reingest", str(tmp_path), "p0"]) == 0
    assert collect(src.windows(StreamPosition("p2", 4))) == []
    assert "duplicate: the same content as partition p1" in src.quarantined[-1].reason


# ----------------------------------------------------------------------------- (f) resume


def test_resume_in_the_middle_of_a_merged_partition(tmp_path, caplog):
    rng = np.random.default_rng(5)
    files = []
    for k in range(3):  # three writers, each in time order, sharing timestamps
        ts = np.sort(rng.integers(0, 20, 9))
        files.append([(int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(t), float(k))
                      for t in ts])
        land(tmp_path, "p1", files[-1], file=f"part-{k:04d}")
    files[1][4], files[1][5] = files[1][5], files[1][4]  # one swap inside a file
    land(tmp_path, "p1", files[1], file="part-0001")
    land(tmp_path, "p2", events(5, 100, seed=6))
    full_src = FolderStream(tmp_path, max_window_events=4)
    full = list(full_src.windows())
    want = merged(*[sorted(f, key=lambda r: r[2]) for f in files])
    seen, kept = set(), []
    for r in want:  # the first of each (user, item, time)
        if r[:3] not in seen:
            seen.add(r[:3])
            kept.append(r)
    assert collect(full)[:len(kept)] == kept
    n_dup = len(want) - len(kept)
    assert n_dup > 0
    assert full[0].counts["duplicate_events"] == n_dup and full[0].counts["merged_files"] == 3
    assert full[0].counts["reordered_events"] == (1 if files[1][4][2] != files[1][5][2] else 0)
    assert all(w.counts == {} for w in full[1:] if w.name.startswith("p1["))

    for cut in (1, 2, 3):  # stop after `cut` windows, all inside p1
        src = FolderStream(tmp_path, max_window_events=4)
        it = src.windows()
        head = [next(it) for _ in range(cut)]
        save_stream(tmp_path / f"_ckpt{cut}", head[-1].position_after, src)
        again = FolderStream(tmp_path, max_window_events=4)
        rest = list(again.windows(load_stream(tmp_path / f"_ckpt{cut}", again)))
        assert collect(head) + collect(rest) == collect(full)
        assert rest[0].position_before == head[-1].position_after
        for key in COUNTS:  # each partition's counts once, none again on resume
            assert total(head + rest, key) == total(full, key)
        assert rest[0].counts == {}


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (RAW / "u.data").exists(), reason=f"ML-100K not found at {RAW}")
def test_ml100k_weekly_partitions_of_two_part_files(tmp_path):
    raw = np.loadtxt(RAW / "u.data", dtype=np.int64)  # user, item, rating, time: file order
    raw = raw[np.argsort(raw[:, 3], kind="stable")]
    week = raw[:, 3] // (7 * 86400)
    root = tmp_path / "events"
    want = []
    for w in np.unique(week):
        rows = raw[week == w]
        parts = [rows[0::2], rows[1::2]]  # two writers, alternating: interleaved in time
        name = f"week-{int(w):05d}"
        for k, part in enumerate(parts):
            land(root, name, [(u, i, t, float(r)) for u, i, r, t in part.tolist()],
                 file=f"part-{k:04d}")
        both = np.concatenate(parts)
        want.append(both[np.argsort(both[:, 3], kind="stable")])
    want = np.concatenate(want)
    src = FolderStream(root)
    ws = list(src.windows())
    assert len(src.quarantined) == 0 and not (root / "_quarantine").exists()
    got = np.stack([np.concatenate([w.raw_user for w in ws]), np.concatenate([w.raw_item for w in ws]),
                    np.concatenate([w.rating for w in ws]).astype(np.int64),
                    np.concatenate([w.timestamp for w in ws])], axis=1)
    assert len(got) == 100_000
    assert np.array_equal(got, want)  # every event once, merged in time order
    assert np.array_equal(np.unique(got, axis=0), np.unique(raw, axis=0))
    assert total(ws, "merged_files") == 2 * sum(1 for w in ws if w.num_events > 1)
    assert total(ws, "duplicate_events") == 0 and total(ws, "reordered_events") == 0


def test_repeats_and_out_of_order_against_a_plain_reference():
    from hstu.data.stream.folder import _out_of_order, _repeats

    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(0, 30))
        t = np.sort(rng.integers(0, 6, n))
        user, item = rng.integers(0, 3, n), rng.integers(0, 3, n)
        seen, want = {}, []
        for k, key in enumerate(zip(t.tolist(), user.tolist(), item.tolist())):
            want.append(key in seen)
            seen.setdefault(key, k)
        # out of order: the fewest events to move (n minus the longest ordered subsequence)
        shuffled = rng.permutation(t)[: min(n, 10)]
        best = 0
        for mask in range(1 << len(shuffled)):
            kept = [v for b, v in enumerate(shuffled.tolist()) if mask >> b & 1]
            if kept == sorted(kept):
                best = max(best, len(kept))
        assert _out_of_order(shuffled) == len(shuffled) - best
        found = _repeats(t, user, item)
        if not any(want):
            assert found is None
            continue
        repeat, j, twin = found
        assert repeat.tolist() == want
        assert j == want.index(True) and twin == seen[(int(t[j]), int(user[j]), int(item[j]))]


def test_reingest_from_a_quarantine_on_another_file_system(tmp_path, monkeypatch):
    import errno

    root, quarantine = tmp_path / "events", tmp_path / "elsewhere"
    rows = events(3, 100)
    part = land(quarantine, "p1", rows)
    (part / REASON).write_text("why\n")
    (part / SUCCESS).unlink()  # put back, it is complete
    root.mkdir()
    rename = os.rename

    def across(src, dst):
        if Path(src).parent == quarantine:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", across)
    assert stream_main(["reingest", str(root), "p1", "--quarantine", str(quarantine)]) == 0
    assert not part.exists() and not list(root.glob(".reingest-*"))
    assert sorted(p.name for p in (root / "p1").iterdir()) == [REINGEST, SUCCESS, "part-0000.csv"]
    assert collect(FolderStream(root).windows()) == rows
