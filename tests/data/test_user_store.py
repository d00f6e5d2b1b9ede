"""The user store of online training (hstu.data.user_store): bounded histories in SQLite,
sharded by user over ranks, checkpointed atomically, memory flat as the stream goes on."""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict

import numpy as np
import pytest

from hstu.data.errors import DataError
from hstu.data.stream import Events, ReplayStream
from hstu.data.user_store import UserStore, owner


def random_windows(num_windows: int, size: int, users: int, seed: int = 0, rating: bool = True):
    rng = np.random.default_rng(seed)
    t = 0
    for _ in range(num_windows):
        u = rng.integers(1, users + 1, size)
        it = rng.integers(1, 1000, size)
        ts = t + np.sort(rng.integers(0, 100, size))
        t = int(ts[-1])
        r = rng.integers(1, 6, size).astype(np.float64) if rating else None
        yield u, it, ts, r


def reference(windows, keep: int) -> dict[int, list[tuple]]:
    """Each user's newest ``keep`` events, by plain Python lists."""
    hist: dict[int, list[tuple]] = defaultdict(list)
    for u, it, ts, r in windows:
        for k in range(len(u)):
            hist[int(u[k])].append((int(it[k]), int(ts[k]), float("nan") if r is None else float(r[k])))
            hist[int(u[k])] = hist[int(u[k])][-keep:]
    return hist


def as_lists(store: UserStore, users) -> dict[int, list[tuple]]:
    h = store.histories(np.asarray(users))
    out = {}
    for b, u in enumerate(users):
        a, e = h.offsets[b], h.offsets[b + 1]
        out[int(u)] = list(zip(h.items[a:e].tolist(), h.timestamps[a:e].tolist(), h.ratings[a:e].tolist()))
    return out


def same(a: dict, b: dict) -> bool:
    # NaN ratings compare through their text
    return {k: repr(v) for k, v in a.items()} == {k: repr(v) for k, v in b.items()}


def test_bound_per_user_holds_and_keeps_the_newest(tmp_path):
    keep = 5
    wins = list(random_windows(12, 40, users=7, seed=1)) + list(random_windows(3, 10, 7, seed=2, rating=False))
    store = UserStore(tmp_path / "s.sqlite", keep)
    taken = sum(store.append_events(*w) for w in wins)
    assert taken == 12 * 40 + 3 * 10
    ref = reference(wins, keep)
    users = sorted(ref)
    assert same(as_lists(store, users), ref)
    h = store.histories(np.array(users + [999]))
    assert h.lengths.max() == keep and h.lengths[-1] == 0  # 999: never seen, no history
    # the order asked for, repeats included
    h = store.histories(np.array([users[2], users[0], users[2]]))
    one = store.histories(np.array([users[2]]))
    assert h.lengths.tolist() == [one.lengths[0], min(len(ref[users[0]]), keep), one.lengths[0]]
    assert h.items[: h.offsets[1]].tolist() == one.items.tolist() == h.items[h.offsets[2]:].tolist()
    store.close()


def test_append_takes_a_window_in_stream_order(tmp_path):
    ts = np.array([50, 10, 10, 20], dtype=np.int64)
    ev = Events(np.array([1, 2, 1, 1]), np.array([7, 8, 9, 7]), ts, np.array([1.0, 2.0, 3.0, 4.0]))
    src = ReplayStream(ev, "events:2")
    store = UserStore(tmp_path / "s.sqlite", 2)
    for w in src.windows():
        store.append(w)
    # time order, ties in file order: (u2, i8, 10), (u1, i9, 10), (u1, i7, 20), (u1, i7, 50);
    # dense ids by first appearance: users 2 -> 1, 1 -> 2; items 8 -> 1, 9 -> 2, 7 -> 3.
    # Raw user 1 keeps its newest 2.
    h = store.histories(np.array([1, 2]))
    assert h.offsets.tolist() == [0, 1, 3]
    assert h.items.tolist() == [1, 3, 3] and h.timestamps.tolist() == [10, 20, 50]
    assert h.ratings.tolist() == [2.0, 4.0, 1.0]


def test_two_ranks_hold_what_one_rank_holds(tmp_path):
    wins = list(random_windows(8, 50, users=23, seed=3))
    one = UserStore(tmp_path / "one.sqlite", 6)
    ranks = [UserStore(tmp_path / f"r{r}.sqlite", 6, rank=r, world_size=2) for r in range(2)]
    for w in wins:
        one.append_events(*w)
        taken = [s.append_events(*w) for s in ranks]
        assert sum(taken) == len(w[0])
    users = np.arange(1, 24)
    assert all(np.array_equal(owner(users, 2) == r, ranks[r].owns(users)) for r in range(2))
    merged = {}
    for r, s in enumerate(ranks):
        mine = users[users % 2 == r]
        merged.update(as_lists(s, mine))
        assert s.num_users() == len({int(u) for w in wins for u in w[0] if u % 2 == r})
    assert same(merged, as_lists(one, users))
    with pytest.raises(ValueError, match="user 3 belongs to rank 1, not to rank 0"):
        ranks[0].histories(np.array([2, 3]))


def test_checkpoint_round_trips_bitwise_and_reshards(tmp_path):
    wins = list(random_windows(6, 60, users=31, seed=4))
    stores = [UserStore(tmp_path / f"w{r}.sqlite", 8, rank=r, world_size=2) for r in range(2)]
    for w in wins:
        for s in stores:
            s.append_events(*w)
    ckpt = tmp_path / "ckpt"
    paths = [s.checkpoint(ckpt) for s in stores]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "user_store.rank0-of-2.sqlite", "user_store.rank1-of-2.sqlite"]  # no temporary left
    # the store goes on after its checkpoint; the snapshot does not
    more = list(random_windows(2, 30, users=31, seed=5))
    for w in more:
        for s in stores:
            s.append_events(*w)
    ref = reference(wins, 8)
    backs = [UserStore.restore(ckpt, tmp_path / f"back{r}.sqlite", 8, rank=r, world_size=2) for r in range(2)]
    before = []
    for r, back in enumerate(backs):
        before.append([(u, h.items.tobytes(), h.timestamps.tobytes(), h.ratings.tobytes())
                       for u, h in back.iter_users()])
        mine = [u for u in sorted(ref) if u % 2 == r]
        assert [b[0] for b in before[r]] == mine
        assert same(as_lists(back, mine), {u: ref[u] for u in mine})
        back.checkpoint(tmp_path / "again")
    for r in range(2):
        # restored, then checkpointed again: the same bytes of every history
        again = UserStore.restore(tmp_path / "again", tmp_path / f"again{r}.sqlite", 8, rank=r, world_size=2)
        assert [(u, h.items.tobytes(), h.timestamps.tobytes(), h.ratings.tobytes())
                for u, h in again.iter_users()] == before[r]
        # and the restored store continues exactly as the original did
        for w in more:
            backs[r].append_events(*w)
        assert [(u, h.items.tobytes(), h.timestamps.tobytes(), h.ratings.tobytes())
                for u, h in backs[r].iter_users()] == [
            (u, h.items.tobytes(), h.timestamps.tobytes(), h.ratings.tobytes())
            for u, h in stores[r].iter_users()]
    # one rank reading a two-rank checkpoint holds every user
    whole = UserStore.restore(ckpt, tmp_path / "whole.sqlite", 8)
    assert same(as_lists(whole, sorted(ref)), ref)
    with pytest.raises(DataError, match="max_sequence_length 8, this run has 9"):
        UserStore.restore(ckpt, tmp_path / "x.sqlite", 9)
    paths[1].unlink()
    with pytest.raises(DataError, match="1 user store snapshots of 2 ranks"):
        UserStore.restore(ckpt, tmp_path / "y.sqlite", 8)


def test_a_working_file_left_by_a_killed_run_is_replaced(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"half a database")
    store = UserStore(path, 4)
    store.append_events(np.array([1]), np.array([2]), np.array([3]))
    assert store.num_users() == 1
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM history").fetchone()[0] == 1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def test_memory_stays_flat_as_the_stream_goes_on(tmp_path):
    """New users keep arriving (the file grows); the process's resident memory does not."""
    store = UserStore(tmp_path / "s.sqlite", 50, cache_mib=2)
    rng = np.random.default_rng(0)
    size, t = 20_000, 0

    def window(k: int):
        u = rng.integers(1, 5000, size) + 4000 * k  # a third of each window's users are new
        it = rng.integers(1, 100_000, size)
        return u, it, np.arange(t, t + size, dtype=np.int64), rng.random(size)

    for k in range(5):  # warm up: caches, allocator pools
        store.append_events(*window(k))
    early, size_early = _rss_bytes(), (tmp_path / "s.sqlite").stat().st_size
    for k in range(5, 45):
        store.append_events(*window(k))
    late, size_late = _rss_bytes(), (tmp_path / "s.sqlite").stat().st_size
    assert size_late > 4 * size_early  # the store grew on disk
    print(f"rss {early / 2**20:.1f} -> {late / 2**20:.1f} MiB, file {size_early >> 20} -> {size_late >> 20} MiB")
    assert late - early < 8 * 2**20, f"resident memory grew {(late - early) / 2**20:.1f} MiB"


def test_sequences_are_the_history_then_the_window(tmp_path):
    """Test-then-train input: per owned user, the stored history then the window's events."""
    keep = 4
    wins = list(random_windows(5, 30, users=9, seed=6))
    src = ReplayStream(Events(np.concatenate([w[0] for w in wins]), np.concatenate([w[1] for w in wins]),
                              np.concatenate([w[2] for w in wins]), np.concatenate([w[3] for w in wins])),
                       "events:30")
    store = UserStore(tmp_path / "s.sqlite", keep, rank=1, world_size=2)
    seen: dict[int, list[tuple]] = defaultdict(list)  # dense user -> every event, by hand
    for w in src.windows():
        seq = store.sequences(w)
        mine = [int(u) for u in w.user if u % 2 == 1]
        assert seq.users.tolist() == list(dict.fromkeys(mine))  # first appearance
        for b, u in enumerate(seq.users.tolist()):
            new = [(int(w.item[k]), int(w.timestamp[k]), float(w.rating[k]))
                   for k in range(w.num_events) if w.user[k] == u]
            want = seen[u][-keep:] + new
            a, e = seq.offsets[b], seq.offsets[b + 1]
            got = list(zip(seq.items[a:e].tolist(), seq.timestamps[a:e].tolist(), seq.ratings[a:e].tolist()))
            assert got == want and seq.num_new[b] == len(new)
            seen[u] += new
        store.append(w)


_SAVER = """
import sys
from pathlib import Path
from hstu.data.user_store import UserStore
base, out, work = map(Path, sys.argv[1:4])
store = UserStore.restore(base, work, 20)
print("ready", flush=True)
while True:
    store.checkpoint(out)
"""


def test_a_checkpoint_killed_mid_save_leaves_the_previous_snapshot_whole(tmp_path):
    """kill -9 of a process that checkpoints over and over: the snapshot's name holds a whole
    store (the same histories) every time; a partial copy only ever has a temporary name."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    store = UserStore(tmp_path / "s.sqlite", 20)
    for w in random_windows(4, 50_000, users=30_000, seed=7):
        store.append_events(*w)
    store.checkpoint(tmp_path / "base")
    want = [(u, h.items.tobytes(), h.timestamps.tobytes(), h.ratings.tobytes()) for u, h in store.iter_users()]
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    mid_save = kills = 0
    while kills < 3 or (not mid_save and kills < 12):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(tmp_path / "base"), str(out), str(tmp_path / f"w{kills}.sqlite")],
            stdout=subprocess.PIPE, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert proc.stdout.readline().strip() == "ready"
        while not (out / "user_store.rank0-of-1.sqlite").exists() and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, "the saver exited (its loop never ends)"
        # the kill follows the sight of a save's temporary file (no timing guess): on a fast
        # host the save may still finish first, so the loop kills again until one lands inside
        deadline = time.monotonic() + 30
        while (not any(name.startswith(".") for name in os.listdir(out))
               and proc.poll() is None and time.monotonic() < deadline):
            pass
        assert proc.poll() is None, "the saver exited (its loop never ends)"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        temps = [p for p in out.iterdir() if p.name.startswith(".")]
        mid_save += bool(temps)
        for p in temps:  # what a killed save leaves; never read
            p.unlink()
        back = UserStore.restore(out, tmp_path / f"back{kills}.sqlite", 20)
        got = [(u, h.items.tobytes(), h.timestamps.tobytes(), h.ratings.tobytes()) for u, h in back.iter_users()]
        back.close()
        assert got == want
        kills += 1
    assert mid_save >= 1, f"none of {kills} kills landed inside a save: make the store bigger"


def _window(user, item, ts, rating=None):
    from hstu.data.stream.core import StreamPosition, Window

    user, item, ts = (np.asarray(x, np.int64) for x in (user, item, ts))
    return Window("w", StreamPosition("w", 0), StreamPosition("w", len(user)), user, item, ts,
                  None if rating is None else np.asarray(rating, np.float64), user.copy(),
                  item.copy())


@pytest.mark.parametrize("late", ["insert", "drop"])
def test_repeats_are_dropped_and_late_events_follow_the_policy(tmp_path, late):
    """A repeat (same user, item, timestamp as a stored event) is dropped; an event older than
    the user's newest stored event is placed into the history in time order (history only) or
    dropped; counts per kind; another rank's users' events are left to that rank."""
    store = UserStore(tmp_path / "s.sqlite", 5, rank=0, world_size=2)
    store.append(_window([2, 2, 2, 4], [10, 11, 12, 40], [100, 200, 300, 150]))
    w = _window(
        [2, 2, 2, 3, 4, 2],      # user 3 is rank 1's
        [11, 13, 14, 30, 41, 15],
        [200, 250, 400, 50, 160, 500],
    )
    kept, counts = store.screen(w, late)
    # 11@200 of user 2 is a repeat; 13@250 is late (user 2's newest is 300); user 3 is not ours
    assert counts == {"repeated_events": 1, "late_events": 1}
    assert kept.item.tolist() == [14, 30, 41, 15] and kept.timestamp.tolist() == [400, 50, 160, 500]
    assert kept.raw_item.tolist() == kept.item.tolist() and kept.name == w.name
    history = as_lists(store, [2])[2]
    if late == "insert":
        assert [(i, t) for i, t, _ in history] == [(10, 100), (11, 200), (13, 250), (12, 300)]
    else:
        assert [(i, t) for i, t, _ in history] == [(10, 100), (11, 200), (12, 300)]
    # a window with nothing to screen comes back as it was
    fresh = _window([2, 4], [16, 42], [600, 600])
    same_window, counts = store.screen(fresh, late)
    assert same_window is fresh and counts == {"repeated_events": 0, "late_events": 0}


# ------------------------------------------------------------------ deltas (checkpoint_delta)
def rows_of(store: UserStore) -> dict[int, tuple]:
    return {row[0]: row for row in store._conn.execute("SELECT * FROM history")}


def test_a_delta_holds_the_users_written_and_deleted_since_the_last_checkpoint(tmp_path):
    """A delta holds exactly the users written since the last clear_changes (their current
    rows) and the users deleted since (any DELETE, whatever method issues it); a full
    snapshot then deltas restore bitwise, on the same number of ranks and resharded."""
    wins = list(random_windows(9, 60, users=40, seed=5))
    stores = [UserStore(tmp_path / f"w{r}.sqlite", 6, r, 2) for r in range(2)]
    folders = []
    for k, w in enumerate(wins[:3] + [None] + wins[3:]):
        folder = tmp_path / f"c{k}"
        folder.mkdir()
        folders.append(folder)
        touched = set()
        gone = [3, 4, 17, 38]
        if w is not None and k > 3:  # the deleted users do not come back
            keep = ~np.isin(w[0], gone)
            w = tuple(x[keep] for x in w)
        if w is not None:
            for s in stores:
                s.append_events(*w)
            touched = {int(u) for u in w[0]}
        if k == 3:  # users leave (as an expiry would delete them): the deleted list
            for s in stores:
                with s._conn:
                    s._conn.executemany("DELETE FROM history WHERE user = ?", [(u,) for u in gone])
        for s in stores:
            if k == 0:
                s.checkpoint(folder)
                continue
            mine = {u for u in touched if u % 2 == s.rank}
            assert s.changes() == (len(mine), 2 if k == 3 else 0), (k, s.rank)
            path = s.checkpoint_delta(folder)
            conn = sqlite3.connect(path)
            written = {row[0]: row for row in conn.execute("SELECT * FROM history")}
            deleted = sorted(u for (u,) in conn.execute("SELECT user FROM deleted"))
            conn.close()
            now = rows_of(s)
            assert set(written) == mine, k
            for u in mine:  # the events appended (all of them once the row is cut): its tail
                n = now[u][1]
                added = min(int((w[0] == u).sum()), n)
                tail = [blob[len(blob) - 8 * added:] for blob in now[u][2:5]]
                assert written[u] == (u, added, *tail, now[u][5], int(added < n)), (k, u)
            assert deleted == ([u for u in gone if u % 2 == s.rank] if k == 3 else []), k
        for s in stores:
            s.clear_changes()
            assert s.changes() == (0, 0)
    # a delta of a few users is small next to the snapshot of them all
    delta = (folders[-1] / "user_store_delta.rank0-of-2.sqlite").stat().st_size
    assert delta < (folders[0] / "user_store.rank0-of-2.sqlite").stat().st_size * 4
    want = {u: v for s in stores for u, v in rows_of(s).items()}
    assert not set(gone) & set(want) and len(want) == 36
    for world in (2, 1, 3):  # the same ranks, and resharded
        back = [UserStore.restore(folders[-1], tmp_path / f"b{world}{r}.sqlite", 6, r, world,
                                  links=folders[:-1]) for r in range(world)]
        assert {u: v for b in back for u, v in rows_of(b).items()} == want, world
        assert all(b.owns(np.array(list(rows_of(b)), np.int64)).all() for b in back)
        assert all(b.changes() == (0, 0) for b in back)
        for b in back:
            b.close()


def test_a_delta_grows_with_the_events_appended_not_with_history_lengths(tmp_path):
    """Users with long histories appended one event each: the delta carries 24 B of events a
    user (not their 50-event rows); a late event placed into a history, and a history dropped
    and begun again, travel whole (tail 0); base plus deltas restore bitwise."""
    store = UserStore(tmp_path / "w.sqlite", 50)
    users = np.arange(1, 201)
    for t in range(60):  # 60 events each: every row cut to its newest 50
        store.append_events(users, users * 7 + t, np.full(200, 10 * t))
    store.checkpoint(tmp_path / "base")
    store.clear_changes()
    folders = []
    for k in range(3):
        store.append_events(users, users + 1000 + k, np.full(200, 1000 + k))
        if k == 1:
            store.insert_events(np.array([5]), np.array([99]), np.array([135]))  # late
            store.expire(max_users=199)  # the oldest (user 1 here: ties by lowest id)...
            store.append_events(np.array([1]), np.array([4]), np.array([2000]))  # ...back
        folder = tmp_path / f"d{k}"
        folder.mkdir()
        folders.append(folder)
        conn = sqlite3.connect(store.checkpoint_delta(folder))
        rows = {u: (n, tail, len(items)) for u, n, items, tail in
                conn.execute("SELECT user, n, items, tail FROM history")}
        conn.close()
        store.clear_changes()
        rewritten = {5: (50, 0, 400), 1: (1, 0, 8)} if k == 1 else {}
        assert rows == {int(u): rewritten.get(int(u), (1, 1, 8)) for u in users}, k
    want = rows_of(store)
    back = UserStore.restore(folders[-1], tmp_path / "r.sqlite", 50,
                             links=[tmp_path / "base", *folders[:-1]])
    assert rows_of(back) == want
    assert back.histories(np.array([5])).timestamps.tolist()[:3] == [135, 140, 150]
    back.close()
    # a tail whose user the chain before it does not hold: refused, naming the file
    (tmp_path / "empty").mkdir()
    UserStore(tmp_path / "e.sqlite", 50).checkpoint(tmp_path / "empty")
    with pytest.raises(DataError, match=r"d0.*user 1: appended events for a user"):
        UserStore.restore(folders[0], tmp_path / "r2.sqlite", 50, links=[tmp_path / "empty"])


def test_a_delta_chain_with_a_missing_or_foreign_file_is_refused(tmp_path):
    store = UserStore(tmp_path / "w.sqlite", 4)
    for k, w in enumerate(random_windows(3, 20, users=10, seed=7)):
        (tmp_path / f"c{k}").mkdir()
        store.append_events(*w)
        if k == 0:
            store.checkpoint(tmp_path / "c0")
        else:
            store.checkpoint_delta(tmp_path / f"c{k}")
        store.clear_changes()
    (tmp_path / "c1" / "user_store_delta.rank0-of-1.sqlite").unlink()
    with pytest.raises(DataError, match=r"c1: no user store delta"):
        UserStore.restore(tmp_path / "c2", tmp_path / "r.sqlite", 4,
                          links=[tmp_path / "c0", tmp_path / "c1"])
    with pytest.raises(DataError, match=r"c2: no user store snapshot"):
        UserStore.restore(tmp_path / "c2", tmp_path / "r.sqlite", 4)  # a delta is no base
    with pytest.raises(DataError, match=r"max_sequence_length 4, this run has 5"):
        UserStore.restore(tmp_path / "c2", tmp_path / "r.sqlite", 5, links=[tmp_path / "c0"])
