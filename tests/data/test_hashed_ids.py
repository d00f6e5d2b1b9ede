"""Ids keyed with no map (StreamArgs.ids = "hashed", hstu.data.stream.HashedIds)."""

from __future__ import annotations

import numpy as np
import pytest

from hstu.data.errors import DataError
from hstu.data.stream.core import HashedIds, IdMap


def test_integer_ids_are_their_value_plus_one_and_nothing_is_remembered():
    ids = HashedIds("item")
    keys, new = ids.map(np.array([0, 7, 7, 2**62 - 1]))
    assert keys.tolist() == [1, 8, 8, 2**62] and new == 0 and len(ids) == 0
    assert ids.raw(keys).tolist() == [0, 7, 7, 2**62 - 1]
    assert ids.state_dict()["keys"].size == 0
    with pytest.raises(DataError, match="outside"):
        ids.check(np.array([-1]), "f.csv", "item_id")
    with pytest.raises(DataError, match="text"):
        ids.check(np.array(["a"]), "f.csv", "item_id")


def test_text_ids_hash_stably_apart_from_integers_and_keep_names_until_pruned(tmp_path):
    ids = HashedIds("item", keep_names=True)
    keys, _ = ids.map(np.array(["apple", "pear", "apple"]))
    assert keys[0] == keys[2] != keys[1] and (keys >= 2**62).all()
    # the same text keys the same in another process (a pure function of the text)
    assert HashedIds("item").map(np.array(["pear"]))[0][0] == keys[1]
    assert ids.raw(keys).tolist() == ["apple", "pear", "apple"]
    ids.save(tmp_path / "items.npy")
    back = HashedIds("item", keep_names=True)
    back.load(tmp_path / "items.npy")
    assert back.kind == "str" and back.raw(keys).tolist() == ["apple", "pear", "apple"]
    back.prune(keys[:1])
    assert back.raw(keys).tolist() == ["apple", "", "apple"]
    with pytest.raises(DataError, match="keyed by hash"):
        IdMap("item").load(tmp_path / "items.npy")
    dense = IdMap("item")
    dense.map(np.array([5, 6]))
    dense.save(tmp_path / "dense.npy")
    with pytest.raises(DataError, match="numbered"):
        HashedIds("item").load(tmp_path / "dense.npy")
