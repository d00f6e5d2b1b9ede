"""The stream's positions and id maps on their own (hstu.data.stream.core): numbered ids
against a Python dict in first-appearance order, hashed ids against hashlib, their files, and
a checkpoint chain's maps read back (load_id_maps)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from hstu.data.errors import DataError
from hstu.data.stream import core
from hstu.data.stream.core import HashedIds, IdMap, Lag, StreamPosition, Window


class Reference:
    """Raw id -> 1.. in order of first appearance, in plain Python."""

    def __init__(self) -> None:
        self.ids: dict = {}

    def map(self, raw) -> tuple[list[int], int]:
        before = len(self.ids)
        out = []
        for r in raw:
            out.append(self.ids.setdefault(r, len(self.ids) + 1))
        return out, len(self.ids) - before


# ------------------------------------------------------------------------------ positions
def test_stream_positions():
    assert StreamPosition.start() == StreamPosition("", 0) == StreamPosition()
    p = StreamPosition("2024-01-02", 7)
    assert p.to_dict() == {"partition": "2024-01-02", "row": 7}
    back = StreamPosition.from_dict({"partition": 20240102, "row": "7"})  # coerced
    assert back == StreamPosition("20240102", 7) and isinstance(back.row, int)
    assert StreamPosition.from_dict(p.to_dict()) == p
    # a partition sorts by name first, then by row
    assert StreamPosition.start() < StreamPosition("a", 0) < StreamPosition("a", 3) \
        < StreamPosition("b", 0)


# ----------------------------------------------------------------------------- numbered
@pytest.mark.parametrize("seed", range(4))
def test_numbered_ids_are_numbered_in_order_of_first_appearance(seed):
    rng = np.random.default_rng(seed)
    m, ref = IdMap("user"), Reference()
    dtypes = [np.int64, np.int32, np.uint16, np.int8]
    for step in range(6):
        raw = rng.integers(0, 60, size=int(rng.integers(0, 25))).astype(dtypes[step % 4])
        ids, new = m.map(raw)
        want, want_new = ref.map(raw.tolist())
        assert ids.dtype == np.int64 and ids.tolist() == want and new == want_new
        assert len(m) == len(ref.ids)
    known = list(ref.ids)
    probe = np.asarray(known[::-1] + [1000, -5], dtype=np.int64)
    assert m.lookup(probe).tolist() == [ref.ids[k] for k in known[::-1]] + [0, 0]
    assert len(m) == len(ref.ids)  # a lookup does not grow the map
    assert m.raw(np.arange(1, len(m) + 1)).tolist() == known
    assert m.state_dict() == {"name": "user", "kind": "int", "keys": pytest.approx(known)}


def test_text_ids_widen_never_truncate_and_integers_join_as_text():
    m, ref = IdMap("item"), Reference()
    for raw in (["b", "a", "b"], ["a-much-longer-name", "c"], ["a", "zz" * 30]):
        ids, new = m.map(np.asarray(raw))
        assert (ids.tolist(), new) == ref.map(raw)
    assert m.kind == "str"
    assert m.raw(np.arange(1, len(m) + 1)).tolist() == list(ref.ids)
    ids, new = m.map(np.asarray([17, 3], dtype=np.int64))  # "17", "3" in a map of text
    assert (ids.tolist(), new) == ref.map(["17", "3"])
    assert m.lookup(np.asarray([17])).tolist() == [ref.ids["17"]]
    assert m.lookup(np.asarray(["zz" * 30, "nope"])).tolist() == [ref.ids["zz" * 30], 0]


def test_a_map_of_integers_refuses_text_in_one_line():
    m = IdMap("user")
    m.check(np.asarray(["x"]), "f.parquet", "user_id")  # an empty map takes either
    m.map(np.asarray([5, 6]))
    m.check(np.asarray([7], dtype=np.int32), "f.parquet", "user_id")
    m.check(np.asarray([], dtype=str), "f.parquet", "user_id")  # nothing to refuse
    with pytest.raises(DataError) as err:
        m.check(np.asarray(["u-" + "9" * 60]), "f.parquet", "user_id")
    assert str(err.value) == ("f.parquet: field user_id: user ids are text (e.g. 'u-" + "9" * 38
                              + "') but the stream's user ids so far are integers")
    got = m.lookup(np.asarray(["5"]))
    assert got.tolist() == [0] and got.dtype == np.int64  # text never matches an integer map


def test_empty_inputs_and_an_empty_map():
    m = IdMap("item")
    assert m.state_dict()["keys"].dtype == np.int64 and m.kind is None
    got = m.lookup(np.asarray([1, 2]))
    assert got.tolist() == [0, 0] and got.dtype == np.int64  # dense ids, even when unknown
    ids, new = m.map(np.zeros(0, dtype=np.int64))
    assert ids.dtype == np.int64 and ids.size == 0 and new == 0 and m.kind is None
    m.map(np.asarray([4]))
    got = m.lookup(np.zeros(0, dtype=np.int64))
    assert got.dtype == np.int64 and got.size == 0
    assert m._find(np.zeros(0, dtype=np.int64)).size == 0


def test_state_round_trip_and_truncate_number_on_as_before():
    m, ref = IdMap("user"), Reference()
    for raw in ([9, 3, 9, 1], [3, 20, 2], [7]):
        m.map(np.asarray(raw))
        ref.map(raw)
    other = IdMap("user")
    other.load_state_dict(m.state_dict())
    assert other.kind == "int" and len(other) == 6
    ids, new = other.map(np.asarray([2, 50, 1, 51]))
    assert (ids.tolist(), new) == ref.map([2, 50, 1, 51])
    # the state is a copy: the map it came from is unchanged
    assert len(m) == 6
    # truncate: the map as it was at that size
    other.truncate(3)
    assert other.raw(np.arange(1, 4)).tolist() == [9, 3, 1]
    assert other.lookup(np.asarray([20, 9, 1])).tolist() == [0, 1, 3]
    assert other.map(np.asarray([20]))[0].tolist() == [4]
    other.truncate(10)  # larger than the map: nothing forgotten
    assert len(other) == 4
    other.truncate(0)
    assert len(other) == 0 and other.kind is None
    other.map(np.asarray(["t"]))  # an empty map takes text again
    assert other.kind == "str"


def test_numbered_files_whole_delta_and_refusals(tmp_path):
    m = IdMap("item")
    m.map(np.asarray([5, 1, 5, 8]))
    m.save(tmp_path / "whole.npy")
    assert np.load(tmp_path / "whole.npy").tolist() == [5, 1, 8]
    back = IdMap("item")
    back.load(tmp_path / "whole.npy")
    assert back.state_dict()["keys"].tolist() == [5, 1, 8] and back.kind == "int"
    m.map(np.asarray([2, 9]))
    m.save(tmp_path / "delta.npy", start=3)
    assert np.load(tmp_path / "delta.npy").tolist() == [2, 9]
    back.extend(tmp_path / "delta.npy")
    assert back.raw(np.arange(1, 6)).tolist() == [5, 1, 8, 2, 9]
    assert back.lookup(np.asarray([9, 2])).tolist() == [5, 4]
    # an empty map writes an empty file, which loads as an empty map
    IdMap("x").save(tmp_path / "empty.npy")
    empty = np.load(tmp_path / "empty.npy")
    assert empty.size == 0 and empty.dtype == np.int64
    fresh = IdMap("x")
    fresh.load(tmp_path / "empty.npy")
    assert len(fresh) == 0 and fresh.kind is None
    back.extend(tmp_path / "empty.npy")  # nothing added
    assert len(back) == 5
    # an empty map extended by integer ids keeps them integers
    grown = IdMap("x")
    grown.extend(tmp_path / "whole.npy")
    assert grown.kind == "int" and grown.state_dict()["keys"].dtype == np.int64
    assert grown.raw(np.asarray([3])).dtype == np.int64
    # an empty map extended by text ids becomes a map of text
    fresh.map(np.asarray([], dtype=np.int64))
    text = IdMap("x")
    text.map(np.asarray(["p", "q"]))
    text.save(tmp_path / "text.npy")
    fresh.extend(tmp_path / "text.npy")
    assert fresh.kind == "str" and fresh.raw(np.asarray([1, 2])).tolist() == ["p", "q"]
    with pytest.raises(DataError) as err:
        back.extend(tmp_path / "text.npy")
    assert str(err.value).startswith(str(tmp_path / "text.npy"))
    assert "str item ids, the map before holds int" in str(err.value)
    np.save(tmp_path / "hashed.npy", np.asarray([["hashed", "int"]]))
    with pytest.raises(DataError) as err:
        IdMap("x").load(tmp_path / "hashed.npy")
    assert str(err.value) == (f"{tmp_path / 'hashed.npy'}: holds ids keyed by hash, this run "
                              "numbers its ids (StreamArgs.ids): they cannot be mixed")


def test_map_files_holding_pickles_are_never_unpickled(tmp_path):
    """A map file is read as plain arrays: one that holds Python objects (a pickle, which runs
    code when read) is refused, by every reader."""
    path = tmp_path / "objects.npy"
    np.save(path, np.asarray([{"id": 1}, "x"], dtype=object), allow_pickle=True)
    for read in (IdMap("x").load, IdMap("x").extend, HashedIds("x").load):
        with pytest.raises(ValueError, match="allow_pickle=False"):
            read(path)


def test_a_text_map_loads_as_text(tmp_path):
    m = IdMap("user")
    m.map(np.asarray(["u1", "u22", "u1"]))
    m.save(tmp_path / "u.npy")
    back = IdMap("user")
    back.load(tmp_path / "u.npy")
    assert back.kind == "str" and back.lookup(np.asarray(["u22", "u1"])).tolist() == [2, 1]


# ------------------------------------------------------------------------------- hashed
def _text_key(text: str) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return (1 << 62) + (int.from_bytes(digest, "little") >> 2)


def test_hashed_keys_are_documented_and_remember_nothing_but_names():
    h = HashedIds("user")
    keys, new = h.map(np.asarray([0, 7, 7, 2**62 - 1], dtype=np.int64))
    assert keys.tolist() == [1, 8, 8, 2**62] and new == 0 and len(h) == 0 and h.kind == "int"
    assert h.lookup(np.asarray([7], dtype=np.int32)).tolist() == [8]
    assert h.lookup(np.asarray(["7"])).tolist() == [0]  # text in a map of integers
    assert h.raw(np.asarray([1, 8])).tolist() == [0, 7]
    t = HashedIds("item", keep_names=True)
    names = ["apple", "b", "apple", "a" * 70]
    keys, new = t.map(np.asarray(names))
    assert keys.tolist() == [_text_key(n) for n in names] and new == 0
    assert all((1 << 62) <= k < (1 << 63) for k in keys.tolist())
    assert t.raw(keys).tolist() == names
    assert t.raw(np.asarray([12345])).tolist() == [""]  # a key never seen
    # integers join a text map as text
    assert t.map(np.asarray([17]))[0].tolist() == [_text_key("17")]
    assert t.lookup(np.asarray([17])).tolist() == [_text_key("17")]
    plain = HashedIds("item")  # names not kept
    k = plain.map(np.asarray(["apple"]))[0]
    assert plain.raw(k).tolist() == [""] and plain.state_dict()["keys"].size == 0
    none = plain.raw(np.zeros(0, dtype=np.int64))  # no keys: still text
    assert none.size == 0 and none.dtype.kind == "U"
    assert plain.state_dict()["name"] == "item"


def test_hashed_refusals_and_empty_inputs():
    h = HashedIds("user")
    h.check(np.asarray([], dtype=np.int64), "w", "user_id")
    ids, new = h.map(np.zeros(0, dtype=np.int64))
    assert ids.size == 0 and ids.dtype == np.int64 and new == 0 and h.kind is None
    got = h.lookup(np.zeros(0, dtype=np.int64))
    assert got.size == 0 and got.dtype == np.int64
    h.check(np.asarray([0, 2**62 - 1], dtype=np.int64), "w", "user_id")
    for bad in (-1, 2**62):
        with pytest.raises(DataError) as err:
            h.check(np.asarray([3, bad], dtype=np.int64), "w.parquet", "user_id")
        assert str(err.value) == (f"w.parquet: field user_id: user id {bad} is outside "
                                  "[0, 2**62) (StreamArgs.ids = 'hashed')")
    h.map(np.asarray([1]))
    h.check(np.asarray([], dtype=str), "w", "user_id")
    with pytest.raises(DataError) as err:
        h.check(np.asarray(["x" * 50]), "w.parquet", "user_id")
    assert str(err.value) == ("w.parquet: field user_id: user ids are text (e.g. '" + "x" * 40
                              + "') but the stream's user ids so far are integers")
    got = h.lookup(np.asarray(["a", "b"]))  # text is never a key of integer ids
    assert got.tolist() == [0, 0] and got.dtype == np.int64
    t = HashedIds("item")
    t.map(np.asarray(["a"]))
    t.check(np.asarray(["b"]), "w", "item_id")  # text into text
    t.check(np.asarray([5]), "w", "item_id")  # and integers into text


def test_hashed_names_prune_round_trip_and_files(tmp_path):
    t = HashedIds("item", keep_names=True)
    keys = t.map(np.asarray(["a", "b", "c"]))[0]
    t.prune(keys[[0, 2]])
    assert t.raw(keys).tolist() == ["a", "", "c"]
    state = t.state_dict()
    assert state["hashed"] is True and state["kind"] == "str"
    assert sorted(state["keys"].tolist()) == sorted(keys[[0, 2]].tolist())
    other = HashedIds("item", keep_names=True)
    other.load_state_dict(state)
    assert other.kind == "str" and other.raw(keys).tolist() == ["a", "", "c"]
    t.truncate(0)  # nothing is numbered: nothing to cut back
    assert t.raw(keys).tolist() == ["a", "", "c"]
    t.save(tmp_path / "h.npy")
    table = np.load(tmp_path / "h.npy")
    assert table[0].tolist() == ["hashed", "str"] and table.shape == (3, 2)
    back = HashedIds("item", keep_names=True)
    back.load(tmp_path / "h.npy")
    assert back.kind == "str" and back.raw(keys).tolist() == ["a", "", "c"]
    # a map of integers without names, and one that saw nothing
    n = HashedIds("user")
    n.map(np.asarray([4]))
    n.save(tmp_path / "n.npy")
    assert np.load(tmp_path / "n.npy").tolist() == [["hashed", "int"]]
    nb = HashedIds("user")
    nb.load(tmp_path / "n.npy")
    assert nb.kind == "int" and nb.raw(np.asarray([5])).tolist() == [4]
    HashedIds("user").save(tmp_path / "none.npy")
    none = HashedIds("user")
    none.load(tmp_path / "none.npy")
    assert none.kind is None
    IdMap("user").save(tmp_path / "numbered.npy")
    for path in (tmp_path / "numbered.npy",):
        with pytest.raises(DataError, match="holds a map of numbered ids, this run keys its ids"):
            HashedIds("user").load(path)
    np.save(tmp_path / "other.npy", np.asarray([["numbered", "int"]]))
    with pytest.raises(DataError) as err:
        HashedIds("user").load(tmp_path / "other.npy")
    assert str(err.value) == (f"{tmp_path / 'other.npy'}: holds a map of numbered ids, this run "
                              "keys its ids by hash (StreamArgs.ids): they cannot be mixed")


# ------------------------------------------------------------------------------- windows
def test_a_window_is_cut_through_the_maps_and_selected():
    users, items = IdMap("user"), IdMap("item")
    users.map(np.asarray([100]))
    raw_u, raw_i = np.asarray([100, 200, 200]), np.asarray(["x", "y", "x"])
    ts, rating = np.asarray([5, 6, 7]), np.asarray([1.0, 2.0, 3.0])
    w = Window.cut("p1", 4, False, users, items, raw_u, raw_i, ts, rating, Lag(3, 1.5),
                   {"merged_files": 2})
    assert w.name == "p1[4:7]" and w.num_events == 3
    assert w.position_before == StreamPosition("p1", 4)
    assert w.position_after == StreamPosition("p1", 7)
    assert w.user.tolist() == [1, 2, 2] and w.item.tolist() == [1, 2, 1]
    assert (w.new_users, w.new_items) == (1, 2) and w.lag == Lag(3, 1.5)
    assert w.counts == {"merged_files": 2}
    whole = Window.cut("p2", 0, True, users, items, raw_u[:1], raw_i[:1], ts[:1], None, Lag(0, 0))
    assert whole.name == "p2" and whole.counts == {} and whole.rating is None
    assert whole.position_after == StreamPosition("p2", 1) and whole.new_users == 0
    keep = np.asarray([True, False, True])
    s = w.select(keep)
    assert s.user.tolist() == [1, 2] and s.item.tolist() == [1, 1]
    assert s.timestamp.tolist() == [5, 7] and s.rating.tolist() == [1.0, 3.0]
    assert s.raw_user.tolist() == [100, 200] and s.raw_item.tolist() == ["x", "x"]
    assert (s.name, s.position_before, s.position_after, s.lag) == (
        w.name, w.position_before, w.position_after, w.lag)
    assert whole.select(np.asarray([False])).rating is None


# ----------------------------------------------------------------------- checkpoint maps
class Source:
    """The part of a stream source that save_stream and load_id_maps read."""

    def __init__(self, users, items) -> None:
        self.users, self.items = users, items

    def state_dict(self) -> dict:
        return {"users": None, "items": None, "cursor": 3}


def _chain(tmp_path, hashed: bool = False):
    """A full checkpoint and two deltas of a growing stream: (folders, the maps' raw ids after
    each)."""
    make = (lambda n: HashedIds(n, keep_names=True)) if hashed else IdMap
    src = Source(make("user"), make("item"))
    folders, after, since = [], [], None
    for k, (u, i) in enumerate(((["a", "b"], [10, 11, 10]), (["c"], [12]), (["b", "d"], [13, 14]))):
        src.users.map(np.asarray(u))
        src.items.map(np.asarray([f"i{x}" for x in i] if hashed else i))
        folder = tmp_path / f"iter_{k}"
        names = core.save_stream(folder, StreamPosition("p", k), src, since)
        assert names[-1] == core.STATE_FILE
        folders.append(folder)
        after.append((len(src.users), len(src.items)))
        since = (len(src.users), len(src.items))
    return folders, after, src


def test_a_delta_chain_restores_the_maps(tmp_path):
    folders, after, _src = _chain(tmp_path)
    assert (folders[1] / core.USER_IDS_DELTA).exists()
    assert not (folders[1] / core.USER_IDS_FILE).exists()
    users, items = IdMap("user"), IdMap("item")
    saved = core.load_id_maps(folders[2], users, items, folders[:2])
    assert saved["position"] == {"partition": "p", "row": 2} and saved["source"] == {"cursor": 3}
    assert saved["delta_from"] == {"num_users": 3, "num_items": 3}
    assert users.state_dict()["keys"].tolist() == ["a", "b", "c", "d"]
    assert items.state_dict()["keys"].tolist() == [10, 11, 12, 13, 14]
    # the full checkpoint alone: its own maps
    users, items = IdMap("user"), IdMap("item")
    core.load_id_maps(folders[0], users, items)
    assert (len(users), len(items)) == after[0]


def test_maps_newer_than_their_state_are_cut_back(tmp_path):
    folders, _, src = _chain(tmp_path)
    src.users.map(np.asarray(["late"]))  # a kill between the map file and stream.json
    src.users.save(folders[0] / core.USER_IDS_FILE)
    users, items = IdMap("user"), IdMap("item")
    core.load_id_maps(folders[0], users, items)
    assert users.state_dict()["keys"].tolist() == ["a", "b"]
    src.users.save(folders[1] / core.USER_IDS_DELTA, 2)  # c, d, late after the first 2
    users, items = IdMap("user"), IdMap("item")
    core.load_id_maps(folders[1], users, items, folders[:1])
    assert users.state_dict()["keys"].tolist() == ["a", "b", "c"]


def test_chain_refusals(tmp_path):
    folders, _, _ = _chain(tmp_path)
    with pytest.raises(DataError) as err:  # a delta where the chain needs its full one
        core.load_id_maps(folders[2], IdMap("user"), IdMap("item"), folders[1:2])
    assert str(err.value).startswith(str(folders[1] / core.STATE_FILE))
    assert str(err.value).endswith(
        ": a delta checkpoint: it is restored with the chain its online.json names")
    with pytest.raises(DataError) as err:  # a full one where the chain has a delta
        core.load_id_maps(folders[0], IdMap("user"), IdMap("item"), folders[:1])
    assert "a full checkpoint where the chain has a delta" in str(err.value)
    assert str(folders[0] / core.STATE_FILE) in str(err.value)
    with pytest.raises(DataError) as err:  # a link left out: the delta adds after 3, not 2
        core.load_id_maps(folders[2], IdMap("user"), IdMap("item"), folders[:1])
    assert str(folders[2] / core.USER_IDS_DELTA) in str(err.value)
    assert "adds ids after the first 3, the chain before it holds 2" in str(err.value)
    # a map file with fewer ids than stream.json says
    state = json.loads((folders[0] / core.STATE_FILE).read_text())
    state["num_items"] = 9
    (folders[0] / core.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(DataError) as err:
        core.load_id_maps(folders[0], IdMap("user"), IdMap("item"))
    assert str(folders[0] / core.ITEM_IDS_FILE) in str(err.value)
    assert "holds 2 ids, fewer than the 9 of stream.json" in str(err.value)
    state["num_items"] = 2
    (folders[0] / core.STATE_FILE).write_text(json.dumps(state))
    delta = json.loads((folders[1] / core.STATE_FILE).read_text())
    delta["num_items"] = 7
    (folders[1] / core.STATE_FILE).write_text(json.dumps(delta))
    with pytest.raises(DataError) as err:
        core.load_id_maps(folders[1], IdMap("user"), IdMap("item"), folders[:1])
    assert str(folders[1] / core.ITEM_IDS_DELTA) in str(err.value)
    assert "holds 1 ids, fewer than the 5 of stream.json" in str(err.value)


def test_unreadable_files_are_one_line_naming_them(tmp_path):
    folders, _, _ = _chain(tmp_path)
    (folders[0] / core.ITEM_IDS_FILE).write_bytes(b"not numpy")
    with pytest.raises(DataError) as err:
        core.load_id_maps(folders[0], IdMap("user"), IdMap("item"))
    assert str(err.value).startswith(str(folders[0] / core.ITEM_IDS_FILE))
    assert "cannot read the stream's item id map (ValueError: " in str(err.value)
    folders, _, _ = _chain(tmp_path / "again")
    (folders[1] / core.USER_IDS_DELTA).unlink()
    with pytest.raises(DataError) as err:
        core.load_id_maps(folders[1], IdMap("user"), IdMap("item"), folders[:1])
    assert str(err.value).startswith(str(folders[1] / core.USER_IDS_DELTA))
    assert "cannot read the stream's user id map (FileNotFoundError: " in str(err.value)
    folders, _, _ = _chain(tmp_path / "third")
    (folders[2] / core.STATE_FILE).write_text("{")
    with pytest.raises(DataError) as err:
        core.load_id_maps(folders[2], IdMap("user"), IdMap("item"), folders[:2])
    assert str(err.value).startswith(f"{folders[2] / core.STATE_FILE}: cannot read the stream state")


def test_hashed_ids_are_whole_in_every_checkpoint(tmp_path):
    folders, _, _src = _chain(tmp_path, hashed=True)
    assert (folders[1] / core.USER_IDS_FILE).exists()
    assert not (folders[1] / core.USER_IDS_DELTA).exists()
    users, items = HashedIds("user", keep_names=True), HashedIds("item", keep_names=True)
    saved = core.load_id_maps(folders[2], users, items, folders[:2])
    assert saved["num_users"] == 0 and users.kind == "str" and items.kind == "str"
    # the names of the last checkpoint, of both maps ("d" and "i14" arrived in it)
    keys = core._text_keys(np.asarray(["a", "d"]))
    assert users.raw(keys).tolist() == ["a", "d"]
    keys = core._text_keys(np.asarray(["i10", "i14"]))
    assert items.raw(keys).tolist() == ["i10", "i14"]


def test_ids_as_readers_give_them_keep_their_values(tmp_path):
    """64-bit integer ids stay exact (no float on the way: 2**60 and 2**60 + 1 are two ids),
    text ids that a reader gives as Python objects are stored as text (a map file holds no
    pickle), and a text map cut back to nothing takes integers as integers."""
    m = IdMap("user")
    big = np.asarray([2**60 + 1, 2**60, 2**60 + 1], dtype=np.int64)
    assert m.map(big)[0].tolist() == [1, 2, 1]
    assert m.lookup(np.asarray([2**60, 2**60 + 2])).tolist() == [2, 0]
    assert m.raw(np.asarray([1, 2])).tolist() == [2**60 + 1, 2**60]
    text = IdMap("item")
    ids, new = text.map(np.asarray(["b", "a", "b"], dtype=object))
    assert ids.tolist() == [1, 2, 1] and new == 2
    assert text.state_dict()["keys"].dtype.kind == "U"
    path = tmp_path / "text.npy"
    text.save(path)
    assert np.load(path).tolist() == ["b", "a"]
    text.truncate(0)
    np.save(path, np.asarray([7, 3], dtype=np.int64))
    text.extend(path)
    assert text.kind == "int" and text.state_dict()["keys"].dtype == np.int64
    assert text.lookup(np.asarray([3])).tolist() == [2]
