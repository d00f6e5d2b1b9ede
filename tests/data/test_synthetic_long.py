"""SyntheticDataArgs.num_themes: the planted long-range structure of the long-history set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hstu.args import ConfigError
from hstu.data.data_args import SyntheticDataArgs
from hstu.data.preprocess import preprocess
from hstu.data.store import SequenceStore
from hstu.data.synthetic import generate_synthetic

ARGS = SyntheticDataArgs(num_users=60, num_items=40, min_length=70, max_length=200,
                         num_themes=6, recall_spacing=24, seed=5)


def _sequences(args: SyntheticDataArgs, tmp_path) -> list[np.ndarray]:
    preprocess("synthetic", out=tmp_path, synthetic=args, verbose=False)
    store = SequenceStore.load(str(tmp_path / "synthetic"))
    return [store.items[a:b] for a, b in zip(store.offsets[:-1], store.offsets[1:])]


def test_recalls_follow_a_cue_and_lie_a_spacing_apart(tmp_path):
    seqs = _sequences(ARGS, tmp_path)
    cue, first_theme = ARGS.num_items + 1, ARGS.num_items + 2  # ids 1..num_items are the chain
    themes_seen = set()
    for s in seqs:
        theme_pos = np.flatnonzero(s >= first_theme)
        theme = s[0]
        assert theme >= first_theme and (s[theme_pos] == theme).all()  # one theme per user
        themes_seen.add(int(theme))
        recalls = theme_pos[1:]
        expected = [r for r in range(len(s) - 1, -1, -ARGS.recall_spacing) if r >= ARGS.recall_spacing]
        assert sorted(recalls.tolist()) == sorted(expected)
        assert (s[recalls - 1] == cue).all() and (s == cue).sum() == len(recalls)
        assert recalls[-1] == len(s) - 1  # the held-out last item is a recall
        # the nearest earlier theme item is always at least recall_spacing back
        assert (np.diff(theme_pos) >= ARGS.recall_spacing).all()
    assert len(themes_seen) == ARGS.num_themes


def test_the_cue_alone_does_not_tell_the_theme_the_first_item_does(tmp_path):
    """What a short-range model can do on a recall: predict the most frequent theme after a
    cue; what a model that sees the first item (or an earlier recall) can do: all of them."""
    seqs = _sequences(ARGS, tmp_path)
    last = np.array([s[-1] for s in seqs])
    best_short = np.bincount(last).max() / len(last)
    assert best_short < 0.5
    assert all(s[-1] == s[0] for s in seqs)


def test_the_chain_is_the_plain_generator_s_outside_the_planted_positions():
    plain = generate_synthetic(dataclasses.replace(ARGS, num_themes=0))
    themed = generate_synthetic(ARGS)
    a, b = plain.log.data["item"], themed.log.data["item"]
    assert a.shape == b.shape
    planted = b > ARGS.num_items
    assert planted.any() and (a[~planted] == b[~planted]).all()
    assert (plain.log.data["time_key"] == themed.log.data["time_key"]).all()


def test_sequences_must_be_longer_than_the_spacing():
    with pytest.raises(ConfigError, match="SyntheticDataArgs.min_length"):
        SyntheticDataArgs(min_length=20, max_length=40, num_themes=3, recall_spacing=20)
