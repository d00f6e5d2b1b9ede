"""hstu.publish's gate side by side (docs/serving.md, "Publishing an online run"): the
candidate's stream metric and the served version's own rows (served_<metric>) over the same
windows; without such rows, the figure the served version recorded when it was published.
Built from hand-written run files: no training, no export (the export is replaced by a
recorder)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hstu import publish as pub


def _run(tmp: Path, served_rows: dict[int, float], served_step: int = 3) -> tuple[Path, Path]:
    """A run of 6 windows (trained HR@10 0.2 each, 100 events), the served version v3 (its
    recorded figure 0.10) and the candidate checkpoint iter_6 (after window 6)."""
    run_dir = tmp / "run"
    run_dir.mkdir()
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "split", "name", "value"])
        for window in range(1, 7):
            w.writerow([window, "stream", "window", window])
            w.writerow([window, "stream", "HR@10", 0.2])
            if window in served_rows:
                w.writerow([window, "stream", "served_step", served_step])
                w.writerow([window, "stream", "served_HR@10", served_rows[window]])
            w.writerow([window, "stream", "eval_events", 100])
    ckpt = run_dir / "ckpt" / "iter_6"
    ckpt.mkdir(parents=True)
    (ckpt / "online.json").write_text(json.dumps({"windows": 6}))
    served = run_dir / "serving" / "v3"
    served.mkdir(parents=True)
    (served / "manifest.json").write_text(json.dumps({"publish": {"metrics": {"HR@10": 0.10}}}))
    (run_dir / "serving" / "LATEST").write_text("v3\n")
    return run_dir, ckpt


@pytest.fixture
def exports(monkeypatch) -> list[dict]:
    import hstu.export

    done: list[dict] = []
    monkeypatch.setattr(hstu.export, "publish_version",
                        lambda *a, **k: done.append(k["publish_info"]))
    return done


def _publisher(run_dir: Path, lines: list[str]) -> pub.Publisher:
    return pub.Publisher(run_dir=run_dir, ckpt=run_dir / "ckpt", out=run_dir / "serving",
                         gate=pub.Gate("HR@10", 0.01, 2), log=lines.append)


def test_gate_compares_the_served_version_on_the_same_windows(tmp_path, exports):
    # the served version's own rows beat the candidate there; its recorded 0.10 would not
    run_dir, ckpt = _run(tmp_path, {4: 0.5, 5: 0.3, 6: 0.3})
    lines: list[str] = []
    assert _publisher(run_dir, lines).publish_once(ckpt) == pub.EXIT_REFUSED
    assert exports == []
    assert lines == [("[publish] refused iter_6: HR@10 0.2000 over windows 5-6 is below the "
                      "served v3's 0.3000 on the same windows by more than the margin 0.01; v3 "
                      "stays served")]


def test_gate_passes_side_by_side_and_records_both(tmp_path, exports):
    run_dir, ckpt = _run(tmp_path, {5: 0.205, 6: 0.205})
    lines: list[str] = []
    assert _publisher(run_dir, lines).publish_once(ckpt) == 0
    assert "on the same windows" in lines[0] and "gate passed" in lines[0]
    pair = exports[0]["side_by_side"]
    assert pair["windows"] == [5, 6] and pair["eval_events"] == 200
    assert pair["candidate"] == pytest.approx(0.2) and pair["served"] == pytest.approx(0.205)


def test_gate_without_served_rows_compares_the_recorded_figure(tmp_path, exports):
    # rows of another version (v2) only: not the served one's; its recorded 0.10 is the figure
    run_dir, ckpt = _run(tmp_path, {5: 0.9, 6: 0.9}, served_step=2)
    lines: list[str] = []
    assert _publisher(run_dir, lines).publish_once(ckpt) == 0
    assert lines[0].startswith("[publish] no served_HR@10 rows of v3 up to window 6")
    assert "gate passed: HR@10 0.2000 over windows 5-6, the served v3's 0.1000 (margin" in lines[1]
    assert exports[0]["side_by_side"] is None
