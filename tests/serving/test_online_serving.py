"""Serving what an online run trained (docs/serving.md, "Publishing an online run").

A small stream folder (text item ids, integer user ids that are not the dense ones) is
trained through the shipped stream preset (configs/ml-100k_stream_retrieval.gin with small
sizes; its model table sized by a tiny preprocessed dataset with more items than the
stream has), then published with ``python -m hstu.publish``. Checked:
``hstu.recommend`` returns, in the stream's raw ids, exactly the top-K that the trained model
scores over the items the stream knows; the gate refuses a worse candidate in one line naming
both figures (the served version unchanged) and records the figures per version; a rollback
serves the previous version, atomically, and never the withdrawn one again.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
STREAM_ITEMS = 45  # the stream's distinct items; the sizing dataset has 60


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(args: list[str], ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
    if ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def write_stream(folder: Path, partitions: int = 5, per_partition: int = 60) -> list[dict]:
    """Partitions p0.. of events (user 7001.., item 'm-<k>', increasing timestamps)."""
    rng = np.random.default_rng(11)
    events, t = [], 1_700_000_000
    for p in range(partitions):
        part = folder / f"p{p}"
        part.mkdir(parents=True)
        rows = []
        for _ in range(per_partition):
            t += int(rng.integers(1, 50))
            rows.append({"user_id": int(7001 + rng.integers(0, 15)),
                         "item_id": f"m-{int(rng.integers(0, STREAM_ITEMS))}", "timestamp": t})
        with open(part / "part-0000.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["user_id", "item_id", "timestamp"])
            w.writeheader()
            w.writerows(rows)
        (part / "_SUCCESS").touch()
        events += rows
    return events


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The stream folder, its events, and a run trained on it (checkpoints every 2 windows)."""
    from hstu.data.data_args import SyntheticDataArgs
    from hstu.data.preprocess import preprocess

    base = tmp_path_factory.mktemp("online_serving")
    preprocess("synthetic", out=base / "data", verbose=False, synthetic=SyntheticDataArgs(
        num_users=40, num_items=60, min_length=10, max_length=30, seed=3))
    # not under the name "synthetic": a run would regenerate that one with its own settings
    data = base / "data" / "tiny"
    (base / "data" / "synthetic").rename(data)
    events = write_stream(base / "events")
    run_dir = base / "run"
    params = [
        f'TrainerArgs.run_dir="{run_dir}"', f'TrainerArgs.ckpt_save_dir="{run_dir / "ckpt"}"',
        f'DatasetArgs.dataset_path="{data}"', 'DatasetArgs.dataset_name="synthetic"',
        f'StreamArgs.path="{base / "events"}"', "TrainerArgs.ckpt_save_interval=2",
        "TrainerArgs.keep_last_n=None", "TrainerArgs.train_batch_size=16",
        "TrainerArgs.eval_batch_size=32", "DatasetArgs.max_sequence_length=20",
        "NetworkArgs.hidden_size=16", "NetworkArgs.kv_channels=16",
        "NetworkArgs.num_position_buckets=64", "NetworkArgs.attn_scaling_seqlen=21",
        "OptimizerArgs.learning_rate=0.01",
    ]
    cmd = [str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file",
           str(ROOT / "configs" / "ml-100k_stream_retrieval.gin")]
    for p in params:
        cmd += ["--gin-param", p]
    out = _run(cmd).stdout
    assert "stream: 5 windows done" in out, out[-3000:]
    ckpts = sorted((run_dir / "ckpt").glob("iter_*"), key=lambda p: int(p.name[5:]))
    assert len(ckpts) >= 2, ckpts
    return {"base": base, "run": run_dir, "events": events, "ckpts": ckpts}


def publish(trained: dict, root: Path, *extra: str, ok: bool = True):
    return _run(["-m", "hstu.publish", "--run", str(trained["run"]), "--out", str(root),
                 *extra], ok=ok)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow  # (a recommend run over the published model)
def test_recommend_gives_the_trained_models_top_k_in_raw_ids(trained, tmp_path):
    from hstu.serving.versions import current_version

    root = tmp_path / "serving"
    newest = trained["ckpts"][-1]
    publish(trained, root)  # the newest checkpoint, found through the run's operative config
    version = current_version(root)
    assert version == f"v{newest.name[5:]}"
    m = manifest(root / version)
    saved = json.loads((newest / "stream.json").read_text())
    assert m["stream"]["num_items"] == saved["num_items"] <= STREAM_ITEMS
    assert m["model"]["num_items"] == saved["num_items"] + 1  # never an id the stream lacks
    # two users' raw-id histories (their events in the stream), asked in raw ids
    by_user: dict[int, list[dict]] = {}
    for e in trained["events"]:
        by_user.setdefault(e["user_id"], []).append(e)
    users = sorted(by_user, key=lambda u: -len(by_user[u]))[:2]
    asked = tmp_path / "events.csv"
    with open(asked, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["user_id", "item_id", "timestamp"])
        w.writeheader()
        for u in users:
            w.writerows(by_user[u][-8:])
    top = tmp_path / "top.csv"
    _run(["-m", "hstu.recommend", "--model", str(root), "--input", str(asked), "--top-k", "10",
          "--out", str(top), "--no-aoti"])
    with open(top, newline="") as fh:
        got: dict[str, list[str]] = {}
        for r in csv.DictReader(fh):
            got.setdefault(r["user_id"], []).append(r["item_id"])
    reference = tmp_path / "reference.json"
    _run(["-m", "tests.serving.online_reference", str(newest), str(asked), "10", str(reference)])
    want = json.loads(reference.read_text())
    assert set(got) == {str(u) for u in users}
    known = {e["item_id"] for e in trained["events"]}
    for user, ids in got.items():
        assert ids == want[user], (user, ids, want[user])
        assert set(ids) <= known and all(i.startswith("m-") for i in ids)
        history = {e["item_id"] for e in by_user[int(user)][-8:]}
        assert not history & set(ids)  # the history is excluded, as in training's test


def _figure(run_dir: Path, upto: int, windows: int, metric: str) -> float:
    """The eval_events-weighted mean of ``metric`` over the last ``windows`` evaluated windows up
    to window ``upto``, from metrics.csv (independently of the publisher)."""
    groups: list[dict[str, float]] = []
    with open(run_dir / "metrics.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["split"] == "stream":
                if r["name"] == "window":
                    groups.append({})
                groups[-1][r["name"]] = float(r["value"])
    done = [g for g in groups if g["window"] <= upto and g.get("eval_events", 0) > 0][-windows:]
    return sum(g[metric] * g["eval_events"] for g in done) / sum(g["eval_events"] for g in done)


@pytest.mark.slow  # two gated publishes (20 s)
def test_gate_refuses_a_worse_candidate_naming_both_figures(trained, tmp_path):
    from hstu.serving.versions import current_version, list_versions

    root = tmp_path / "serving"
    first, newest = trained["ckpts"][0], trained["ckpts"][-1]
    gate = ["--gate-metric", "HR@10", "--gate-margin", "0.02", "--gate-windows", "2"]
    publish(trained, root, "--ckpt", str(first), *gate)
    served = current_version(root)
    record = manifest(root / served)["publish"]
    windows = json.loads((first / "online.json").read_text())["windows"]
    assert record["checkpoint_windows"] == windows and record["gate_metric"] == "HR@10"
    assert record["metrics"]["HR@10"] == pytest.approx(
        _figure(trained["run"], windows, 2, "HR@10"), abs=1e-12)
    # the served version recorded a figure the candidate cannot come within 0.02 of
    path = root / served / "manifest.json"
    m = json.loads(path.read_text())
    m["publish"]["metrics"]["HR@10"] = 1.5
    path.write_text(json.dumps(m))
    proc = publish(trained, root, "--ckpt", str(newest), *gate, ok=False)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    refused = [line for line in proc.stdout.splitlines() if "refused" in line]
    assert len(refused) == 1, proc.stdout
    ours = _figure(trained["run"], json.loads((newest / "online.json").read_text())["windows"],
                   2, "HR@10")
    assert f"HR@10 {ours:.4f}" in refused[0] and "1.5000" in refused[0], refused[0]
    assert f"{served} stays served" in refused[0]
    assert current_version(root) == served and [n for _, n in list_versions(root)] == [served]
    # within the margin: published
    m["publish"]["metrics"]["HR@10"] = ours + 0.01
    path.write_text(json.dumps(m))
    publish(trained, root, "--ckpt", str(newest), *gate)
    assert current_version(root) == f"v{newest.name[5:]}"


@pytest.mark.slow  # three publishes (30 s)
def test_rollback_serves_the_previous_version_atomically(trained, tmp_path):
    from hstu.serving.artifact import load_artifact
    from hstu.serving.versions import (
        VersionError,
        current_version,
        open_latest,
        rollback,
        withdrawn,
    )

    root = tmp_path / "serving"
    first, newest = trained["ckpts"][0], trained["ckpts"][-1]
    old, new = f"v{first.name[5:]}", f"v{newest.name[5:]}"
    publish(trained, root, "--ckpt", str(first))
    publish(trained, root, "--ckpt", str(newest))
    assert current_version(root) == new
    # readers while the pointer switches: each gets one whole version, never an error
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                folder, lease = open_latest(root)
                assert (folder / "manifest.json").is_file()
                seen.append(folder.name)
                lease.release()
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        while len(seen) < 3 and not errors:  # reading before the switch
            stop.wait(0.001)
        assert rollback(root, log=lambda *_: None) == old
        count = len(seen)
        while len(seen) < count + 3 and not errors:  # and after it
            stop.wait(0.001)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors
    assert set(seen) <= {old, new} and seen[0] == new and seen[-1] == old
    assert current_version(root) == old and withdrawn(root) == {new}
    with load_artifact(root, use_aoti=False) as art:
        assert art.version == old
    # the command line: nothing older than the first version to go back to (one line, exit 2)
    proc = _run(["-m", "hstu.serving.versions", "rollback", str(root)], ok=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no older complete version" in proc.stderr
    with pytest.raises(VersionError):
        rollback(root)
    # the withdrawn step published again (a resumed run reaching it) stays unserved
    proc = _run(["-m", "hstu.export", "--ckpt", str(newest), "--out", str(root), "--versioned",
                 "--no-aoti"])
    assert "was rolled back" in proc.stdout + proc.stderr
    assert current_version(root) == old
