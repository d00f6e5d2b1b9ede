"""Online training (hstu.training.online): a replayed stream through the real entry points.

A small synthetic dataset is replayed in windows of N events (StreamArgs.replay_dataset =
"processed"). Checked: ``stream`` rows per window; test-then-train order (window k's rows
equal an evaluation of the checkpoint written after window k - 1); only the window's events
are targets; exact resume (a run stopped at a window boundary, or killed with SIGKILL, and
resumed equals the uninterrupted run bitwise: weights, tables, optimizer, id maps, user store,
metrics rows). The runs take 20-30 s each: all but the sample checks are in the slow tier.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WINDOW_EVENTS = 150


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    # tests/training/kill_at.py's folder comes first on its sys.path: this checkout's hstu, not
    # the one the virtual environment may have installed from another checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from hstu.data.data_args import SyntheticDataArgs
    from hstu.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("online_data")
    preprocess("synthetic", out=out, verbose=False, synthetic=SyntheticDataArgs(
        num_users=40, num_items=60, min_length=10, max_length=30, seed=3))
    # not under the name "synthetic": a run would regenerate that one with its own settings
    (out / "synthetic").rename(out / "tiny")
    return out / "tiny"


def _params(data: Path, run_dir: Path, task: str, extra: list[str]) -> list[str]:
    params = [
        f'TrainerArgs.run_dir="{run_dir}"',
        f'TrainerArgs.ckpt_save_dir="{run_dir / "ckpt"}"',
        f'DatasetArgs.dataset_path="{data}"',
        'StreamArgs.replay_dataset="processed"',
        f'StreamArgs.replay_raw="{data}"',
        f'StreamArgs.replay_window="events:{WINDOW_EVENTS}"',
        "TrainerArgs.max_train_iters=None",
        "TrainerArgs.best_metric=None",
        "TrainerArgs.ckpt_save_interval=2",
        "TrainerArgs.keep_last_n=None",
        'TrainerArgs.ckpt_load_dir="auto"',
        "TrainerArgs.train_batch_size=8",
        "TrainerArgs.eval_batch_size=16",
        "TrainerArgs.max_eval_iters=None",
        "DatasetArgs.max_sequence_length=12",
        "DatasetArgs.contextual_features=[]",
        'OptimizerArgs.lr_decay_style="constant"',
        "NetworkArgs.hidden_dropout=0.2",  # dropout: the RNG streams must resume too
    ]
    if task == "retrieval":
        params += ['RetrievalArgs.negative_sampling="full_corpus"',
                   'RetrievalArgs.eval_metrics=("HR@10", "NDCG@10")']
    else:
        params += ["DatasetArgs.max_num_candidates=4", "RankingArgs.history_loss_weight=0.0"]
    return params + extra


def _cmd(data: Path, run_dir: Path, task: str, extra: list[str], nproc: int = 1,
         kill_at: bool = False) -> list[str]:
    """The entry point's command line: one process, or ``nproc`` under torchrun; with
    ``kill_at`` through tests/training/kill_at.py (HSTU_KILL_AT says where it dies)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if kill_at:
        cmd.append(str(ROOT / "tests" / "training" / "kill_at.py"))
    cmd += [str(ROOT / f"pretrain_gr_{task}.py"), "--gin-config-file",
            str(ROOT / "configs" / f"debug_{task}.gin")]
    for p in _params(data, run_dir, task, extra):
        cmd += ["--gin-param", p]
    return cmd


def run(data: Path, run_dir: Path, task: str = "retrieval", extra: list[str] = (),
        nproc: int = 1) -> str:
    proc = subprocess.run(_cmd(data, run_dir, task, list(extra), nproc), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def rows(run_dir: Path, split: str | None = None) -> list[tuple[str, str, str, str]]:
    """metrics.csv rows (timing and resident-memory columns left out: they differ between runs;
    so do the checkpoint rows: a run stopped and resumed saves a checkpoint more)."""
    timing = {"window_seconds", "tokens_per_s", "tflops", "mfu"}
    with open(run_dir / "metrics.csv") as fh:
        out = [tuple(r) for r in list(csv.reader(fh))[1:]]
    return [r for r in out if r[2] not in timing and not r[2].startswith("rss_mib_rank")
            and not r[2].startswith("checkpoint_") and (split is None or r[1] == split)]


def stream_by_window(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    # the rows of one window are consecutive and contain "window"
    group: dict[str, float] = {}
    for _step, _split, name, value in rows(run_dir, "stream"):
        if name in group:
            out[int(group["window"])] = group
            group = {}
        group[name] = float(value)
    if group:
        out[int(group["window"])] = group
    return out


def newest(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "ckpt").glob("iter_*"), key=lambda p: int(p.name[5:]))
    return ckpts[-1]


def checkpoint_state(folder: Path, world: int = 1) -> dict:
    """Everything a checkpoint of ``world`` processes holds, as comparable values."""
    import sqlite3

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tables = folder.parent / f"{folder.name}.tables.pt"
    dcp_to_torch_save(str(folder), str(tables))
    state = {
        "tables": torch.load(tables, weights_only=False),
        "dense": torch.load(folder / "dense_tp0.pt", weights_only=False),
        "rng": [torch.load(folder / f"rng_rank{r}.pt", weights_only=False) for r in range(world)],
        "users": np.load(folder / "user_ids.npy"),
        "items": np.load(folder / "item_ids.npy"),
        "stream": (folder / "stream.json").read_text(),
        "online": (folder / "online.json").read_text(),
    }
    tables.unlink()
    state["store"] = []
    for r in range(world):
        conn = sqlite3.connect(folder / f"user_store.rank{r}-of-{world}.sqlite")
        state["store"].append(conn.execute("SELECT * FROM history ORDER BY user").fetchall())
        conn.close()
    return state


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


# ------------------------------------------------------------------------------ samples
def test_training_targets_are_the_window_events_only():
    """first_trained: a sample's queries are exactly the positions whose next item is a new
    event; every new event with a history is a target once."""
    from hstu.data.user_store import Sequences
    from hstu.training.online import retrieval_eval_samples, retrieval_train_samples

    # user 0: 3 stored + 4 new; user 1: 0 stored + 3 new (its first has no history);
    # user 2: 2 stored + 9 new (more than L - 1 = 4: chunks)
    lengths = np.array([7, 3, 11])
    num_new = np.array([4, 3, 9])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    seqs = Sequences(offsets=offsets, items=np.arange(1, n + 1), timestamps=np.arange(n),
                     ratings=np.zeros(n), users=np.array([5, 6, 7]), num_new=num_new)
    samples, first = retrieval_train_samples(seqs, max_len=5)
    targets = []
    for b, s, e, f in zip(samples.user, samples.hist_start, samples.hist_end, first):
        assert e - s <= 5
        # position j (j >= f) of the sample predicts row s + j + 1
        targets += [int(s + j + 1) for j in range(f, e - s - 1)]
    new_rows = [r for b in range(3) for r in range(offsets[b + 1] - num_new[b], offsets[b + 1])
                if r > offsets[b]]
    assert sorted(targets) == new_rows  # each new event once, no stored event
    ev = retrieval_eval_samples(seqs, max_len=5)
    assert list(ev.target) == new_rows
    assert np.all(ev.hist_end == ev.target) and np.all(ev.target - ev.hist_start <= 5)


# ------------------------------------------------------------------------------ the runs
@pytest.fixture(scope="module")
def full(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("online") / "full"
    run(data, run_dir)
    return run_dir


@pytest.mark.slow
def test_stream_rows_per_window(full, data):
    from hstu.data.store import SequenceStore

    by_window = stream_by_window(full)
    total = int(SequenceStore.load(data, verbose=False).offsets[-1])
    windows = -(-total // WINDOW_EVENTS)
    assert sorted(by_window) == list(range(1, windows + 1))
    assert sum(w["events"] for w in by_window.values()) == total
    for w in by_window.values():
        assert {"HR@10", "NDCG@10", "eval_events", "events_waiting", "seconds_behind"} <= set(w)
        assert 0.0 <= w["NDCG@10"] <= w["HR@10"] <= 1.0
    # lag counts down to 0 at the last window
    waiting = [by_window[k]["events_waiting"] for k in sorted(by_window)]
    assert waiting[-1] == 0 and waiting == sorted(waiting, reverse=True)
    # the model learns from the stream: later windows beat the first ones
    hr = [by_window[k]["HR@10"] for k in sorted(by_window)]
    assert np.mean(hr[-3:]) > np.mean(hr[:2])
    # the report: per-window curves, and the prequential mean (weighted by events) it prints
    from hstu.training.report import prequential, stream_windows

    assert "curve_stream_HR_10.png" in (full / "report.html").read_text()
    assert (full / "curve_stream_HR_10.png").stat().st_size > 0
    ws = stream_windows(str(full))
    expect = sum(w["HR@10"] * w["eval_events"] for w in ws) / sum(w["eval_events"] for w in ws)
    assert prequential(ws, "HR@10")[-1][1] == pytest.approx(expect)


@pytest.fixture(scope="module")
def ranking_full(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("online_ranking") / "full"
    run(data, run_dir, task="ranking")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("task", ["retrieval", "ranking"])
def test_test_then_train(task, full, ranking_full, data, tmp_path):
    """Window k's rows come from the model before training on window k: for every window
    after a checkpoint, the checkpoint written after window k - 1, evaluated alone on window
    k, gives the same values (a model that trained on window k first would not)."""
    import json

    run_dir = full if task == "retrieval" else ranking_full
    by_window = stream_by_window(run_dir)
    after = {json.loads((p / "online.json").read_text())["windows"]: p
             for p in (run_dir / "ckpt").glob("iter_*")}
    probes = {k: str(after[k - 1]) for k in sorted(by_window)
              if k - 1 in after and by_window[k]["eval_events"] > 0}
    assert len(probes) >= 2, (sorted(after), sorted(by_window))  # checkpoints every 2 windows
    metrics = ("HR@10", "NDCG@10") if task == "retrieval" else ("AUC", "NE")
    params = {k: _params(data, tmp_path / f"probe{k}", task, [f'TrainerArgs.ckpt_load_dir="{c}"'])
              for k, c in probes.items()}
    script = f"""
import json
import gin
from hstu.config import load_config
from hstu.data.sizes import resolve_sizes
from hstu.training.distributed import init_distributed, destroy_distributed
from hstu.training.online import OnlineTrainer
env = init_distributed(1)
for k, params in {params!r}.items():
    gin.clear_config()
    cfg = resolve_sizes(load_config({str(ROOT / 'configs' / f'debug_{task}.gin')!r}, params,
                                    task={task!r}))
    o = OnlineTrainer(cfg, env, {str(tmp_path)!r} + f"/probe{{k}}", "x")
    window = next(iter(o.windows()))
    m = o.evaluate_window(o.prepare_window(o.store.sequences(window)))
    print("PROBE", k, json.dumps(m))
    o.close()
destroy_distributed()
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = {int(line.split()[1]): json.loads(line.split(" ", 2)[2])
           for line in proc.stdout.splitlines() if line.startswith("PROBE ")}
    assert sorted(got) == sorted(probes)
    for k, probe in got.items():
        for name in (*metrics, "eval_events"):
            assert probe[name] == by_window[k][name], (k, name, probe, by_window[k])


@pytest.mark.slow
def test_stop_and_resume_is_bitwise(full, data, tmp_path):
    """Stopped at a window boundary (max_train_iters) with a save, then resumed: the end
    state and every metrics row equal the uninterrupted run's."""
    run_dir = tmp_path / "resumed"
    out = run(data, run_dir, extra=["TrainerArgs.max_train_iters=5"])
    assert "stream: " in out
    first_stop = newest(run_dir)
    out = run(data, run_dir)
    assert f"resumed from {first_stop}" in out
    assert_same(checkpoint_state(newest(full)), checkpoint_state(newest(run_dir)), "state")
    assert rows(full) == rows(run_dir)


@pytest.mark.slow
def test_sigkill_mid_run_and_resume_is_bitwise(full, data, tmp_path):
    """A real SIGKILL while windows are being trained (after a few lines), then a resume:
    equal to the uninterrupted run."""
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, run_dir, "retrieval", []), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = 0
    for line in proc.stdout:
        if line.startswith("[hstu] window "):
            seen += 1
        if seen == 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    out = run(data, run_dir)
    assert "resumed from" in out and "stream: resumed after" in out
    assert_same(checkpoint_state(newest(full)), checkpoint_state(newest(run_dir)), "state")
    assert rows(full) == rows(run_dir)


@pytest.mark.slow
def test_ranking_stream(ranking_full):
    by_window = stream_by_window(ranking_full)
    assert len(by_window) >= 3
    for w in by_window.values():
        if w["eval_events"] > 0:
            assert "AUC" in w and "NE" in w


def _partition(folder: Path, name: str, rng: np.random.Generator, t0: int, n: int = 120) -> None:
    part = folder / name
    part.mkdir(parents=True)
    users = rng.integers(100, 120, n)
    items = rng.integers(1000, 1040, n)
    with open(part / "part-0000.csv", "w") as fh:
        fh.write("user_id,item_id,timestamp\n")
        fh.writelines(f"{u},{it},{t0 + i}\n" for i, (u, it) in enumerate(zip(users, items)))
    (part / "_SUCCESS").touch()


@pytest.mark.slow
def test_follow_a_folder_stop_by_signal_and_resume(data, tmp_path):
    """StreamArgs.follow on a stream folder: two partitions trained, then the run waits;
    SIGTERM stops it with a checkpoint (exit 143); a partition landing later is all the
    resumed run trains (the first two are not trained again)."""
    folder = tmp_path / "events"
    rng = np.random.default_rng(0)
    _partition(folder, "p1", rng, 1000)
    _partition(folder, "p2", rng, 2000)
    run_dir = tmp_path / "follow"
    base = [p for p in _params(data, run_dir, "retrieval", []) if not p.startswith("StreamArgs.replay")]
    cmd = [sys.executable, str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file",
           str(ROOT / "configs" / "debug_retrieval.gin")]
    for p in [*base, f'StreamArgs.path="{folder}"', "StreamArgs.follow=True",
              "StreamArgs.poll_seconds=0.2"]:
        cmd += ["--gin-param", p]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[hstu] window 2 "):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, "".join(lines) + rest
    saved = json_of(newest(run_dir) / "stream.json")
    assert saved["position"] == {"partition": "p2", "row": 120}
    _partition(folder, "p3", rng, 3000)
    cmd = ["StreamArgs.follow=False" if c == "StreamArgs.follow=True" else c for c in cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    trained = [line for line in proc.stdout.splitlines() if line.startswith("[hstu] window ")]
    assert len(trained) == 1 and " p3" in trained[0], trained
    assert json_of(newest(run_dir) / "stream.json")["position"] == {"partition": "p3", "row": 120}


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


@pytest.mark.slow
def test_ranking_stop_and_resume_is_bitwise(data, tmp_path):
    """Ranking on the stream: a run stopped at a window boundary and resumed equals the
    uninterrupted one (state and rows)."""
    full_dir, resumed = tmp_path / "full", tmp_path / "resumed"
    run(data, full_dir, task="ranking")
    run(data, resumed, task="ranking", extra=["TrainerArgs.max_train_iters=3"])
    out = run(data, resumed, task="ranking")
    assert "stream: resumed after" in out
    assert_same(checkpoint_state(newest(full_dir)), checkpoint_state(newest(resumed)), "state")
    assert rows(full_dir) == rows(resumed)


@pytest.mark.slow
def test_publishes_serving_versions_as_it_goes(data, tmp_path):
    """Every 3rd window a publisher starts in the background (training goes on; publishers take
    turns, each exports the newest checkpoint when its turn comes) and the newest checkpoint
    ends up served: each version holds its checkpoint's step, the stream's item map at that
    checkpoint and the stream figures over its last windows; the root keeps the newest 2."""
    import re
    import time

    import pyarrow.parquet as pq

    from hstu.serving.artifact import load_artifact
    from hstu.serving.versions import current_version, list_versions, version_name

    run_dir = tmp_path / "pub"
    out = run(data, run_dir, extra=["StreamArgs.publish_every_windows=3", "StreamArgs.publish_keep=2",
                                    "StreamArgs.publish_gate_windows=2",
                                    "TrainerArgs.ckpt_save_interval=-1",
                                    # item-only histories: what the served version is asked
                                    "DatasetArgs.action_tokens=False"])
    started = [int(s) for s in re.findall(r"\[hstu\] publishing step (\d+) into .* in the "
                                          r"background", out)]
    skipped = re.findall(r"\[hstu\] publishing step \d+ skipped: a publisher is exporting", out)
    windows = len(stream_by_window(run_dir))
    assert len(started) + len(skipped) == windows // 3 and len(started) >= 2, out[-3000:]
    assert started == sorted(started) and len(set(started)) == len(started), started
    # the training did not wait: the publishers' lines land in publish.log as they finish
    log = run_dir / "publish.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = log.read_text() if log.is_file() else ""
        ends = r"\[export\] published v\d+|nothing newer than|refused|error"
        if len(re.findall(ends, text)) >= len(started):
            break
        time.sleep(0.5)
    assert "error" not in text and "refused" not in text, text[-3000:]
    published = [int(s) for s in re.findall(r"\[export\] published v(\d+)", text)]
    assert published and published[-1] == started[-1], (published, started, text[-3000:])
    assert published == sorted(set(published)) and set(published) <= set(started), published
    root = run_dir / "serving"
    assert [s for s, _ in list_versions(root)] == published[-2:]
    assert current_version(root) == version_name(started[-1])
    for step in published[-2:]:
        folder = root / version_name(step)
        manifest = json_of(folder / "manifest.json")
        ckpt = run_dir / "ckpt" / f"iter_{step}"
        assert manifest["checkpoint"]["step"] == step
        record = manifest["publish"]
        done = json_of(ckpt / "online.json")["windows"]
        assert record["checkpoint_windows"] == done and done % 3 == 0
        assert record["windows"] == [done - 1, done]
        hr = [stream_by_window(run_dir)[w] for w in (done - 1, done)]
        assert record["metrics"]["HR@10"] == pytest.approx(
            sum(w["HR@10"] * w["eval_events"] for w in hr) / sum(w["eval_events"] for w in hr))
        known = json_of(ckpt / "stream.json")["num_items"]
        raw = np.load(ckpt / "item_ids.npy")[:known]
        item_map = pq.read_table(folder / "item_map.parquet")
        assert item_map.column("item_id").to_pylist() == list(range(1, known + 1))
        assert item_map.column("raw_item_id").to_pylist() == raw.tolist()
        assert manifest["model"]["num_items"] == known + 1
    with load_artifact(root, use_aoti=False) as art:
        assert art.version == version_name(started[-1])
    # the served version loads and recommends: hstu.recommend's top-10 for two users' raw-id
    # histories equals the trained model's own (its checkpoint scored by the trainer's
    # evaluation over the items the stream knew there)
    ckpt = run_dir / "ckpt" / f"iter_{started[-1]}"
    known = json_of(ckpt / "stream.json")["num_items"]
    raw_items = set(np.load(ckpt / "item_ids.npy")[:known].tolist())
    from hstu.data.store import SequenceStore

    store = SequenceStore.load(data, verbose=False)
    asked, users = tmp_path / "events.csv", []
    with open(asked, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in np.argsort(-np.diff(store.offsets), kind="stable")[:2]:
            lo, hi = int(store.offsets[u]), int(store.offsets[u + 1])
            seen = [r for r in range(lo, hi) if int(store.items[r]) in raw_items][-8:]
            users.append(str(u + 1))  # the processed replay's user ids are 1, 2, ...
            w.writerows([u + 1, int(store.items[r]), int(store.timestamps[r])] for r in seen)
    top, reference = tmp_path / "top.csv", tmp_path / "reference.json"
    for args in (["-m", "hstu.recommend", "--model", str(root), "--input", str(asked),
                  "--top-k", "10", "--out", str(top), "--no-aoti"],
                 ["-m", "tests.serving.online_reference", str(ckpt), str(asked), "10",
                  str(reference)]):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got: dict[str, list[str]] = {}
    with open(top, newline="") as fh:
        for r in csv.DictReader(fh):
            got.setdefault(r["user_id"], []).append(r["item_id"])
    want = json_of(reference)
    assert sorted(got) == sorted(users) and all(len(ids) == 10 for ids in got.values())
    for user, ids in got.items():
        assert ids == want[user], (user, ids, want[user])


# ------------------------------------------------------------------ kill anywhere, 1 and 2 processes
KILL_POINTS = {
    # HSTU_KILL_AT (tests/training/kill_at.py): where the run dies
    "mid-window": "train_step:10",  # calls: each window's steps, then one that ends it
    "window read, not yet evaluated": "evaluate:4",
    "between windows": "append:3",
    "mid-save, store snapshot written": "store_save:2",
    "mid-save, before the rename": "publish:2",
}


def killed_then_resumed(data: Path, run_dir: Path, kill_at: str, nproc: int,
                        task: str = "retrieval", extra: list[str] = ()) -> str:
    """A run SIGKILLed at ``kill_at`` (under torchrun: that rank dies, torchrun stops the
    others), then the same command without the kill; returns the resume's output."""
    env = _env()
    env["HSTU_KILL_AT"] = kill_at
    proc = subprocess.run(_cmd(data, run_dir, task, list(extra), nproc, kill_at=True), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    return run(data, run_dir, task, extra, nproc=nproc)


@pytest.fixture(scope="module")
def full2(data, tmp_path_factory) -> Path:
    """The uninterrupted run on 2 processes (row-wise item table, the users split by rank)."""
    run_dir = tmp_path_factory.mktemp("full2")
    out = run(data, run_dir, nproc=2)
    assert "row_wise" in out  # the item table is sharded over the 2 ranks
    return run_dir


# one process: two of the points in the slow tier (the 2-process test below takes all five);
# the other three in the extended tier (scripts/test.sh --extended)
ONE_PROCESS_SLOW = ("mid-window", "mid-save, before the rename")


@pytest.mark.slow
@pytest.mark.parametrize("where", [
    w if w in ONE_PROCESS_SLOW else pytest.param(w, marks=pytest.mark.extended)
    for w in KILL_POINTS
])
def test_kill_anywhere_and_resume_is_bitwise_one_process(full, data, tmp_path, where):
    out = killed_then_resumed(data, tmp_path / "run", KILL_POINTS[where], 1)
    assert "stream: resumed after" in out
    assert_same(checkpoint_state(newest(full)), checkpoint_state(newest(tmp_path / "run")), "state")
    assert rows(full) == rows(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_kill_anywhere_and_resume_is_bitwise_two_processes(full2, data, tmp_path, where):
    """Rank 1 (rank 0 for the checkpoint rename, which only it does) is SIGKILLed at each
    point; the restart equals the uninterrupted 2-process run: tables, dense state, both
    ranks' RNG streams and user stores, id maps, stream position, metrics rows."""
    point = KILL_POINTS[where]
    rank = 0 if point.startswith("publish") else 1
    out = killed_then_resumed(data, tmp_path / "run", f"{point}:{rank}", 2)
    assert "stream: resumed after" in out
    assert_same(checkpoint_state(newest(full2), 2), checkpoint_state(newest(tmp_path / "run"), 2),
                "state")
    assert rows(full2) == rows(tmp_path / "run")


@pytest.mark.slow
def test_two_processes_see_every_event_once(full, full2):
    """2 processes evaluate and train the same events as 1 (each user on its owner rank, the
    ranks padded to the same steps, padding neither trained nor evaluated); the first window
    is evaluated before any training, by the same initial model: the same metrics."""
    one, two = stream_by_window(full), stream_by_window(full2)
    assert one.keys() == two.keys()
    for w in one:
        for name in ("events", "eval_events", "trained_events", "known_items"):
            assert one[w][name] == two[w][name], (w, name, one[w], two[w])
    assert sum(w["trained_events"] for w in two.values()) > 0
    for name in ("HR@10", "NDCG@10"):
        assert two[1][name] == pytest.approx(one[1][name], abs=1e-6), name
    # each user lives in its owner's store only
    import sqlite3

    folder = newest(full2)
    users = []
    for r in range(2):
        conn = sqlite3.connect(folder / f"user_store.rank{r}-of-2.sqlite")
        mine = [u for (u,) in conn.execute("SELECT user FROM history")]
        conn.close()
        assert mine and all(u % 2 == r for u in mine), r
        users += mine
    conn = sqlite3.connect(newest(full) / "user_store.rank0-of-1.sqlite")
    assert sorted(users) == sorted(u for (u,) in conn.execute("SELECT user FROM history"))
    conn.close()


# ------------------------------------------------------------------ ranking, a dynamic item table
DYNAMIC = [  # 48 rows for the stream's 60 items: ids are admitted and evicted (LRU) as it goes
    'item/DynamicEmbeddingArgs.feature_names=["item_id"]', 'item/DynamicEmbeddingArgs.table_name="item"',
    "item/DynamicEmbeddingArgs.item_vocab_size_or_capacity=48",
    'item/DynamicEmbeddingArgs.evict_strategy="lru"',
    'OptimizerArgs.sparse_optimizer_str="rowwise_adagrad"',
    # small batches: one batch's distinct items must fit beside the rows in use
    "TrainerArgs.train_batch_size=2", "TrainerArgs.eval_batch_size=2",
]


@pytest.fixture(scope="module")
def ranking_dynamic(data, tmp_path_factory) -> dict[int, Path]:
    """The ranking stream with a dynamic item table, uninterrupted, on 1 and 2 processes."""
    out = {}
    for nproc in (1, 2):
        out[nproc] = tmp_path_factory.mktemp(f"ranking_dynamic{nproc}")
        run(data, out[nproc], "ranking", DYNAMIC, nproc=nproc)
    return out


@pytest.mark.slow
def test_ranking_dynamic_table_two_processes(ranking_dynamic):
    """Ranking on 2 processes with a dynamic item table smaller than the stream's items: the
    same events evaluated and trained as on 1 process (padding samples weigh 0 in the loss),
    the same first-window metrics (the initial model), and the table full and evicting."""
    one, two = stream_by_window(ranking_dynamic[1]), stream_by_window(ranking_dynamic[2])
    assert one.keys() == two.keys()
    for w in one:
        for name in ("events", "eval_events", "trained_events", "known_items"):
            assert one[w][name] == two[w][name], (w, name)
    for name in ("AUC", "NE"):
        assert two[1][name] == pytest.approx(one[1][name], abs=1e-5), name
    last = two[max(two)]
    assert last["item_occupied"] <= 48 and last["known_items"] > 48
    assert last["item_evicted"] > 0


@pytest.mark.slow
def test_ranking_dynamic_table_kill_and_resume_is_bitwise(ranking_dynamic, data, tmp_path):
    """Killed mid-window on 2 processes and resumed: the dynamic table's ids, slots and
    eviction state come back with the weights (equal to the uninterrupted run)."""
    out = killed_then_resumed(data, tmp_path / "run", "train_step:40:1", 2, "ranking", DYNAMIC)
    assert "stream: resumed after" in out
    assert_same(checkpoint_state(newest(ranking_dynamic[2]), 2),
                checkpoint_state(newest(tmp_path / "run"), 2), "state")
    assert rows(ranking_dynamic[2]) == rows(tmp_path / "run")
