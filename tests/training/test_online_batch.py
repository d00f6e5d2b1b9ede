"""Online training's batch phase (StreamArgs.batch_until / batch_epochs / train): the streaming
model against the same model trained in batch on the start of the stream and then frozen.

The tiny synthetic replay of tests/training/test_online.py in windows of 150 events, three runs:
(A) streaming from the start (the windows before the cut trained,
not evaluated: ``evaluate_from``), (B) batch phase on the first 60% of the events, then frozen
(``train=False``), (C) the same batch phase, then streaming. Checked: the batch phase trains
every event before the cut exactly ``batch_epochs`` times and evaluates none; the windows after
the cut are evaluated on the same events in A, B and C; the frozen model changes no weight over
the stream while still writing its evaluation rows; a run killed after the batch phase resumes
bitwise. The runs take 20-40 s each: the slow tier (the argument checks are fast).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.training.test_online import (
    WINDOW_EVENTS,
    assert_same,
    checkpoint_state,
    data,  # noqa: F401 - the module's fixture
    full,  # noqa: F401 - the uninterrupted streaming run, every window evaluated
    newest,
    rows,
    run,
)

CUT = 0.6
EPOCHS = 2


def stream_by_window(run_dir: Path) -> dict[int, dict[str, float]]:
    """The run's ``stream`` rows per window number (the batch phase's have no metric of the
    evaluation)."""
    from hstu.training.report import stream_windows

    return {int(w["window"]): w for w in stream_windows(str(run_dir))}


def batch_args(train: bool = True) -> list[str]:
    return [f"StreamArgs.batch_until={CUT}", f"StreamArgs.batch_epochs={EPOCHS}",
            f"StreamArgs.train={train}"]


def expected_batch(data: Path) -> tuple[int, int, int]:  # noqa: F811
    """(windows, events, targets) of the batch phase, counted from the replay's own order:
    the leading windows of 150 events that end within the first 60% of the events; a target
    is every event but each user's first (which has no history)."""
    from hstu.data.stream.replay import ReplayStream, events_of_processed

    replay = ReplayStream(events_of_processed(data), f"events:{WINDOW_EVENTS}")
    cut = int(np.floor(CUT * replay.num_events + 1e-9))
    windows = cut // WINDOW_EVENTS
    events = windows * WINDOW_EVENTS
    users = replay.user[:events]
    return windows, events, events - len(np.unique(users))


@pytest.fixture(scope="module")
def three(data, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    base = tmp_path_factory.mktemp("batch")
    dirs = {"A": base / "stream", "B": base / "frozen", "C": base / "batch_stream"}
    run(data, dirs["A"], extra=[f"StreamArgs.evaluate_from={CUT}"])
    run(data, dirs["B"], extra=batch_args(train=False))
    run(data, dirs["C"], extra=batch_args(train=True))
    return dirs


@pytest.mark.slow
def test_batch_phase_trains_each_event_epochs_times_and_evaluates_none(three, data):  # noqa: F811
    windows, events, targets = expected_batch(data)
    assert 2 <= windows < len(stream_by_window(three["A"])) - 1
    for name in ("B", "C"):
        by_window = stream_by_window(three[name])
        # one row group for the whole phase, numbered by its last window; no row before it
        assert min(by_window) == windows, (name, sorted(by_window))
        phase = by_window[windows]
        assert phase["eval_events"] == 0 and "HR@10" not in phase
        assert phase["events"] == events and phase["batch_windows"] == windows
        assert phase["trained_events"] == EPOCHS * targets > 0
        assert phase["train_steps"] > 0
        # every window after the cut is evaluated (and the stream goes on to the end)
        assert sorted(by_window) == list(range(windows, max(stream_by_window(three["A"])) + 1))


@pytest.mark.slow
def test_same_events_evaluated_after_the_cut(three, data):  # noqa: F811
    windows, _, _ = expected_batch(data)
    a, b, c = (stream_by_window(three[k]) for k in "ABC")
    after = [w for w in a if w > windows]
    assert after and all(w in b and w in c for w in after)
    for w in after:
        for name in ("events", "eval_events", "known_items"):
            assert a[w][name] == b[w][name] == c[w][name], (w, name)
        assert 0.0 <= b[w]["NDCG@10"] <= b[w]["HR@10"] <= 1.0
    # the first window after the cut meets the same model in B and C (the same batch phase,
    # not yet trained on by C): the same metrics
    first = windows + 1
    for name in ("HR@10", "NDCG@10"):
        assert b[first][name] == c[first][name], name
    # C trains on the stream, B does not: later windows differ
    assert any(b[w]["HR@10"] != c[w]["HR@10"] for w in after[1:])


@pytest.mark.slow
def test_evaluate_from_skips_evaluation_only(three, full, data):  # noqa: F811
    """A (evaluate_from = the cut) writes no evaluation before the cut and the same rows as
    the run that evaluates every window after it; its training is the same: equal state."""
    windows, _, _ = expected_batch(data)
    a, every = stream_by_window(three["A"]), stream_by_window(full)
    assert a.keys() == every.keys()
    for w in a:
        if w <= windows:
            assert a[w]["eval_events"] == 0 and "HR@10" not in a[w]
            assert a[w]["trained_events"] == every[w]["trained_events"] > 0
        else:
            # the time and resident memory of a window differ between runs, and the
            # prequential means cover the windows each run evaluated (the checkpoint's size:
            # online.json holds the means)
            def same(k: str) -> bool:
                return (k != "window_seconds" and not k.startswith(("rss_mib_rank", "checkpoint_"))
                        and not k.endswith(("_cumulative", "_faded")))

            assert {k: v for k, v in a[w].items() if same(k)} == \
                {k: v for k, v in every[w].items() if same(k)}, w
    mine, theirs = checkpoint_state(newest(three["A"])), checkpoint_state(newest(full))
    assert_same(mine["tables"], theirs["tables"], "tables")
    assert_same(mine["dense"], theirs["dense"], "dense")


@pytest.mark.slow
def test_frozen_model_changes_no_weight(three, data):  # noqa: F811
    """B's state at the end (after evaluating every window after the cut) equals C's
    checkpoint written right after the same batch phase: weights, tables, optimizer."""
    windows, _, _ = expected_batch(data)
    b = stream_by_window(three["B"])
    for w, row in b.items():
        if w > windows:
            assert row["train_steps"] == 0 and row["trained_events"] == 0
            assert row["eval_events"] > 0 and "HR@10" in row
    after_phase = [p for p in (three["C"] / "ckpt").glob("iter_*")
                   if json.loads((p / "online.json").read_text())["windows"] == windows]
    assert len(after_phase) == 1
    frozen, phase = checkpoint_state(newest(three["B"])), checkpoint_state(after_phase[0])
    assert_same(frozen["tables"], phase["tables"], "tables")
    assert_same(frozen["dense"], phase["dense"], "dense")
    # ... while the stream went on (the store and position moved)
    assert frozen["stream"] != phase["stream"]
    assert json.loads(frozen["online"])["step"] == json.loads(phase["online"])["step"]


@pytest.mark.slow
@pytest.mark.parametrize("which, kill_at", [("C", "evaluate:1"), ("C", "train_step:3"),
                                            ("B", "publish:3")])
def test_killed_after_or_inside_the_batch_phase_resumes_bitwise(three, data, tmp_path, which,  # noqa: F811
                                                                kill_at):
    """SIGKILL at the first evaluation after the batch phase (its checkpoint is the resume's
    start), mid-phase (no checkpoint yet: the restart runs the phase again), or, for the
    frozen model, mid-save (rows written, checkpoint not published, at the same step as the
    one it resumes from): the restart equals the uninterrupted run, rows included."""
    import subprocess

    from tests.training.test_online import _cmd, _env

    run_dir = tmp_path / "run"
    extra = batch_args(train=which == "C")
    env = _env()  # (its PYTHONPATH: this checkout's hstu under kill_at.py)
    env["HSTU_KILL_AT"] = kill_at
    proc = subprocess.run(_cmd(data, run_dir, "retrieval", extra, 1, kill_at=True),
                          cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -9, (proc.stdout + proc.stderr)[-3000:]  # SIGKILL, nothing else
    out = run(data, run_dir, extra=extra)
    windows, _, _ = expected_batch(data)
    if kill_at.startswith("train_step"):
        assert "batch phase:" in out and "resumed" not in out
    else:
        assert "stream: resumed after" in out and "batch phase:" not in out
        if kill_at.startswith("evaluate"):
            assert f"stream: resumed after {windows} windows" in out
    assert_same(checkpoint_state(newest(three[which])), checkpoint_state(newest(run_dir)), "state")
    assert rows(three[which]) == rows(run_dir)


@pytest.mark.slow
def test_stream_lr_scale_after_the_batch_phase_resumes_bitwise(three, data, tmp_path):  # noqa: F811
    """StreamArgs.stream_lr_scale: the batch phase trains at the optimizer's rate, the stream
    after it at the scaled one (dense and tables: the model then differs from run C's); a
    run killed at the first evaluation after the phase resumes with the scaled rate (it is
    not in the checkpoint) and equals the uninterrupted run."""
    import subprocess

    from tests.training.test_online import _cmd, _env

    extra = batch_args(train=True) + ["StreamArgs.stream_lr_scale=0.25"]
    whole = tmp_path / "whole"
    run(data, whole, extra=extra)
    lrs = [float(v) for _, _, name, v in rows(whole, "train") if name == "lr"]
    plain = [float(v) for _, _, name, v in rows(three["C"], "train") if name == "lr"]
    assert len(lrs) == len(plain) > 2
    # the batch phase's row: the optimizer's rate; every window after it: a quarter of it
    assert lrs[0] == plain[0] > 0
    assert all(lr == pytest.approx(0.25 * p) for lr, p in zip(lrs[1:], plain[1:])), lrs
    windows, _, _ = expected_batch(data)
    scaled, c, b = (stream_by_window(d) for d in (whole, three["C"], three["B"]))
    assert scaled[windows + 1]["HR@10"] == c[windows + 1]["HR@10"] == b[windows + 1]["HR@10"]
    later = [w for w in scaled if w > windows + 1]
    assert any(scaled[w]["HR@10"] != c[w]["HR@10"] for w in later)
    killed = tmp_path / "killed"
    env = _env()
    env["HSTU_KILL_AT"] = "evaluate:1"
    proc = subprocess.run(_cmd(data, killed, "retrieval", extra, 1, kill_at=True),
                          cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -9, (proc.stdout + proc.stderr)[-3000:]
    out = run(data, killed, extra=extra)
    assert f"stream: resumed after {windows} windows" in out
    assert_same(checkpoint_state(newest(whole)), checkpoint_state(newest(killed)), "state")
    assert rows(whole) == rows(killed)


@pytest.mark.slow
def test_ranking_batch_phase_then_frozen(data, tmp_path):  # noqa: F811
    windows, events, _ = expected_batch(data)
    run_dir = tmp_path / "ranking"
    run(data, run_dir, task="ranking", extra=batch_args(train=False))
    by_window = stream_by_window(run_dir)
    assert by_window[windows]["eval_events"] == 0 and by_window[windows]["events"] == events
    assert by_window[windows]["trained_events"] > 0
    for w, row in by_window.items():
        if w > windows and row["eval_events"] > 0:
            assert "AUC" in row and "NE" in row and row["train_steps"] == 0


# ------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("fields, words", [
    ({"replay_dataset": "ml-100k", "batch_until": 0.0}, "batch_until"),
    ({"replay_dataset": "ml-100k", "batch_until": 1.5}, "batch_until"),
    ({"path": "/x", "batch_until": 0.8}, "needs a replay"),
    ({"replay_dataset": "ml-100k", "batch_epochs": 0}, "batch_epochs"),
    ({"train": "no"}, "train"),
    ({"stream_lr_scale": 0.0}, "stream_lr_scale"),
    ({"stream_lr_scale": "0.1"}, "stream_lr_scale"),
])
def test_stream_args_checks(fields, words):
    from hstu.data.data_args import StreamArgs
    from hstu.validation import ConfigError

    with pytest.raises(ConfigError) as err:
        StreamArgs(**fields)
    msg = str(err.value).splitlines()[0]  # (gin adds the configurable's name below it)
    assert msg.startswith("StreamArgs.") and words in msg


def test_merge_windows_keeps_stream_order():
    from hstu.data.stream.core import IdMap, Lag, Window
    from hstu.training.online import merge_windows

    users, items = IdMap("user"), IdMap("item")
    w1 = Window.cut("a", 0, True, users, items, np.array([5, 6]), np.array([7, 8]),
                    np.array([1, 2]), None, Lag(3, 1.0))
    w2 = Window.cut("b", 0, True, users, items, np.array([6, 9, 5]), np.array([8, 1, 2]),
                    np.array([3, 4, 5]), np.array([1.0, 2.0, 3.0]), Lag(0, 0.0))
    m = merge_windows([w1, w2])
    assert m.name == "a..b" and m.position_before == w1.position_before
    assert m.position_after == w2.position_after and m.lag == w2.lag
    assert list(m.timestamp) == [1, 2, 3, 4, 5] and list(m.raw_user) == [5, 6, 6, 9, 5]
    assert list(m.user) == list(np.concatenate([w1.user, w2.user]))
    assert np.isnan(m.rating[:2]).all() and list(m.rating[2:]) == [1.0, 2.0, 3.0]
    assert m.new_users == 3 and m.new_items == 4


@pytest.mark.slow
def test_batch_phase_on_two_processes(three, data, tmp_path):  # noqa: F811
    """C on 2 processes (users split by rank, rank 0 reading the stream and telling the cut):
    the same batch phase (events, targets x passes) and the same events evaluated and trained
    per window as on 1 process."""
    run_dir = tmp_path / "two"
    run(data, run_dir, extra=batch_args(), nproc=2)
    one, two = stream_by_window(three["C"]), stream_by_window(run_dir)
    assert one.keys() == two.keys()
    for w in one:
        for name in ("events", "eval_events", "trained_events", "known_items"):
            assert one[w][name] == two[w][name], (w, name)
