"""Which checkpoint a stream run resumes, and what it writes as it goes (hstu.training.online).

Stream folders are written here (a few partitions of a small random stream) and run through
the real entry point with DatasetArgs.dataset_name = "stream" (no preprocessed dataset), from a
working directory of the test's own, with the default run and checkpoint folders: a run owns
its checkpoints, a second stream starts fresh, another stream's checkpoint is refused in one
line (or continued when asked), a run with nothing to read says why, and the prequential rows
are the means of the windows' rows.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_stream(folder: Path, seed: int, partitions: int = 3, events: int = 120) -> None:
    """``partitions`` complete partitions p000.. of ``events`` events each (30 users, 50 items)."""
    rng = np.random.default_rng(seed)
    t = 1_000_000
    for p in range(partitions):
        part = folder / f"p{p:03d}"
        part.mkdir(parents=True)
        lines = ["user_id,item_id,timestamp"]
        for _ in range(events):
            t += int(rng.integers(1, 5))
            lines.append(f"{rng.integers(1, 31)},{rng.integers(100, 150)},{t}")
        (part / "part-00000.csv").write_text("\n".join(lines) + "\n")
        (part / "_SUCCESS").touch()


def entry(task: str, params: list[str], nproc: int = 1,
          config: str | None = None) -> list[str]:
    """The entry point's command line (``nproc`` > 1: under torchrun) with gin ``params``."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(ROOT / f"pretrain_gr_{task}.py"), "--gin-config-file",
            str(ROOT / "configs" / (config or f"debug_{task}.gin"))]
    for p in params:
        cmd += ["--gin-param", p]
    return cmd


def call(cmd: list[str], cwd: Path, ok: bool = True) -> str:
    """Runs ``cmd`` in ``cwd`` with this checkout's hstu; its output (asserting its exit)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, out[-5000:]
    return out


def run(cwd: Path, stream: Path, extra: list[str] = (), ok: bool = True) -> str:
    params = [
        'DatasetArgs.dataset_name="stream"', "StreamArgs.item_capacity=64",
        f'StreamArgs.path="{stream}"', "DatasetArgs.contextual_features=[]",
        "DatasetArgs.max_sequence_length=12", "TrainerArgs.max_train_iters=None",
        "TrainerArgs.ckpt_save_interval=2", 'TrainerArgs.ckpt_load_dir="auto"',
        'RetrievalArgs.negative_sampling="full_corpus"', 'OptimizerArgs.lr_decay_style="constant"',
        'RetrievalArgs.eval_metrics=("HR@10", "NDCG@10")', "StreamArgs.prequential_fading=0.99",
        *extra,
    ]
    return call(entry("retrieval", params), cwd, ok)


def stream_rows(run_dir: Path) -> list[dict[str, float]]:
    windows: list[dict[str, float]] = []
    with open(run_dir / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "stream":
                if row["name"] == "window":
                    windows.append({})
                windows[-1][row["name"]] = float(row["value"])
    return windows


@pytest.mark.slow  # five runs of the trainer (36 s)
def test_runs_own_their_checkpoints_and_other_streams_are_refused(tmp_path):
    a, b = tmp_path / "stream_a", tmp_path / "stream_b"
    write_stream(a, seed=1)
    write_stream(b, seed=2, partitions=2)
    work = tmp_path / "work"
    work.mkdir()

    run(work, a)
    runs = sorted((work / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("retrieval-stream-stream_a-")
    run_a = runs[0]
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()), "no checkpoint in the run"
    assert not (work / "checkpoints").exists()  # nothing in the working directory

    # a second stream from the same working directory: its own run, fresh
    out = run(work, b)
    assert "resumed" not in out
    run_b = next(p for p in (work / "runs").iterdir() if p.name.startswith("retrieval-stream-stream_b"))
    assert [w["window"] for w in stream_rows(run_b)] == [1.0, 2.0]

    # the same command again on stream a: it resumes its run, has nothing new, and says why
    out = run(work, a)
    assert "resumed" in out and "no window in this run" in out
    assert "every complete partition sorts at or before it" in out

    # stream b pointed at stream a's run: refused in one line naming both streams
    out = run(work, b, [f'TrainerArgs.run_dir="{run_a}"'], ok=False)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert str(a.resolve()) in errors[0] and str(b.resolve()) in errors[0]
    assert "StreamArgs.continue_from_other_stream" in errors[0]

    # ... or continued when asked: a's model on b from b's first partition, windows numbered on
    out = run(work, b, [f'TrainerArgs.run_dir="{run_a}"',
                        "StreamArgs.continue_from_other_stream=True"])
    assert "continuing the model" in out
    numbers = [w["window"] for w in stream_rows(run_a)]
    assert numbers == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert sum(w["events"] for w in stream_rows(run_a)[3:]) == 240


def test_prequential_rows_are_the_windows_means(tmp_path):
    stream = tmp_path / "s"
    write_stream(stream, seed=3, partitions=4)
    run(tmp_path, stream, ['TrainerArgs.run_dir="run"'])
    windows = stream_rows(tmp_path / "run")
    assert len(windows) == 4
    total = weight = faded = faded_weight = 0.0
    for w in windows:
        n = w["eval_events"]
        assert n > 0
        total += w["HR@10"] * n
        weight += n
        faded = faded * 0.99 ** n + w["HR@10"] * n
        faded_weight = faded_weight * 0.99 ** n + n
        assert math.isclose(w["HR@10_cumulative"], total / weight, rel_tol=1e-9)
        assert math.isclose(w["HR@10_faded"], faded / faded_weight, rel_tol=1e-9)
    assert windows[-1]["HR@10_faded"] != windows[-1]["HR@10_cumulative"]  # the fading applied


def test_a_stream_dataset_needs_an_item_capacity():
    from hstu.args import ConfigError, DatasetArgs
    from hstu.data.data_args import StreamArgs
    from hstu.data.sizes import read_metadata

    with pytest.raises(ConfigError, match="StreamArgs.item_capacity"):
        read_metadata(DatasetArgs(dataset_name="stream", max_sequence_length=8),
                      {"StreamArgs": StreamArgs(path="/x")})
    meta = read_metadata(DatasetArgs(dataset_name="stream", max_sequence_length=8),
                         {"StreamArgs": StreamArgs(path="/x", item_capacity=10, rating_classes=5)})
    assert meta["num_items"] == 11 and meta["num_action_values"] == 5


def _ranking(cwd: Path, stream: Path, run_dir: Path, extra: list[str] = (), nproc: int = 1) -> str:
    params = [
        'DatasetArgs.dataset_name="stream"', "StreamArgs.item_capacity=64",
        "StreamArgs.rating_classes=5", 'StreamArgs.ids="hashed"', f'StreamArgs.path="{stream}"',
        "DatasetArgs.contextual_features=[]", "DatasetArgs.max_sequence_length=12",
        "DatasetArgs.max_num_candidates=4", "RankingArgs.history_loss_weight=0.0",
        "TrainerArgs.max_train_iters=None", "TrainerArgs.ckpt_save_interval=1",
        "TrainerArgs.keep_last_n=None", 'TrainerArgs.ckpt_load_dir="auto"',
        f'TrainerArgs.run_dir="{run_dir}"', 'OptimizerArgs.lr_decay_style="constant"',
        'item/DynamicEmbeddingArgs.feature_names=["item_id"]',
        'item/DynamicEmbeddingArgs.table_name="item"',
        "item/DynamicEmbeddingArgs.item_vocab_size_or_capacity=100",
        "StreamArgs.item_ttl_days=0.0005", "StreamArgs.user_ttl_days=0.001",
        "StreamArgs.max_users_per_rank=12", "NetworkArgs.hidden_dropout=0.2", *extra,
    ]
    return call(entry("ranking", params, nproc), cwd)


def write_rated_stream(folder: Path, seed: int, first: int, partitions: int,
                       events: int = 150) -> None:
    """Partitions p<first>.. of ``events`` rated events each; items drift over time (new ids
    keep coming, old ones stop), users come and go."""
    rng = np.random.default_rng(seed)
    t = 1_000_000 + first * events * 3
    for p in range(first, first + partitions):
        part = folder / f"p{p:03d}"
        part.mkdir(parents=True)
        lines = ["user_id,item_id,timestamp,rating"]
        for k in range(events):
            t += int(rng.integers(1, 5))
            user = 1000 * p + int(rng.integers(0, 15)) if k % 3 else int(rng.integers(0, 15))
            lines.append(f"{user},{10_000_000_000 + 20 * p + int(rng.integers(0, 30))},{t},"
                         f"{rng.integers(0, 5)}")
        (part / "part-00000.csv").write_text("\n".join(lines) + "\n")
        (part / "_SUCCESS").touch()


@pytest.mark.parametrize(("nproc", "admit"), [
    pytest.param(1, 1, marks=pytest.mark.extended), pytest.param(1, 3, marks=pytest.mark.slow),
    pytest.param(2, 1, marks=pytest.mark.slow),
])
def test_hashed_ids_expire_and_resume_exactly(tmp_path, nproc, admit):
    """StreamArgs.ids = "hashed" with a dynamic item table, time to live for rows and users and
    a bound on the users: rows and users are freed as the stream goes on (counted), no id map
    grows, and a run that reads the stream in two goes ends in the state of one that reads it
    at once (weights, tables with their remappers, user stores); with admission
    (admit_min_count 3) its count-min sketch too."""
    from tests.training.test_online import assert_same, checkpoint_state

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    write_rated_stream(whole, seed=5, first=0, partitions=4)
    write_rated_stream(parts, seed=5, first=0, partitions=2)
    extra = [f"item/DynamicEmbeddingArgs.admit_min_count={admit}",
             "item/DynamicEmbeddingArgs.admit_sketch_width=512"]
    _ranking(tmp_path, whole, tmp_path / "once", extra, nproc=nproc)
    _ranking(tmp_path, parts, tmp_path / "twice", extra, nproc=nproc)
    write_rated_stream(parts, seed=5, first=2, partitions=2)
    # (the same events: the generator's state continues only within one call, so compare
    # partitions' files first)
    for p in ("p002", "p003"):
        (parts / p / "part-00000.csv").write_text((whole / p / "part-00000.csv").read_text())
    out = _ranking(tmp_path, parts, tmp_path / "twice", extra, nproc=nproc)
    assert "stream: resumed after 2 windows" in out

    rows = stream_rows(tmp_path / "once")
    assert [w["window"] for w in rows] == [1.0, 2.0, 3.0, 4.0]
    assert sum(w["expired_item_rows"] for w in rows) > 0
    assert sum(w["expired_users"] for w in rows) > 0
    assert sum(w["events"] for w in rows) == 600
    assert (rows[-1].get("item_not_admitted", 0) > 0) == (admit > 1)

    def final(run: Path) -> dict:
        ckpt = max((run / "checkpoints").glob("iter_*"), key=lambda p: int(p.name[5:]))
        state = checkpoint_state(ckpt, nproc)
        # (wall-clock fields differ between runs)
        state.pop("stream")
        state["online"] = {k: v for k, v in __import__("json").loads(state["online"]).items()}
        return state

    once, twice = final(tmp_path / "once"), final(tmp_path / "twice")


    def keys(d: dict, at: str = "") -> list[str]:
        return [k for n, v in d.items()
                for k in (keys(v, f"{at}{n}.") if isinstance(v, dict) else [f"{at}{n}"])]

    sketches = [k for k in keys(once["tables"]) if k.endswith("admission.counters")]
    assert len(sketches) == (admit > 1), keys(once["tables"])
    assert len(once["items"]) == 1 and once["items"][0][0] == "hashed"  # no map of item ids
    assert_same(once["tables"], twice["tables"], "tables")
    assert_same(once["dense"], twice["dense"], "dense")
    assert_same(once["store"], twice["store"], "store")
    for store in once["store"]:
        assert len(store) <= 12


def open_catalogue(stream: Path, *extra: str) -> list[str]:
    """Retrieval on ``stream`` with hashed ids, a dynamic item table of 100 rows and the
    sampled softmax over its live rows, run folder ./run."""
    return ['DatasetArgs.dataset_name="stream"', "StreamArgs.item_capacity=100",
            'StreamArgs.ids="hashed"', f'StreamArgs.path="{stream}"',
            "DatasetArgs.contextual_features=[]", "DatasetArgs.max_sequence_length=12",
            "TrainerArgs.max_train_iters=None", 'TrainerArgs.run_dir="run"',
            'OptimizerArgs.lr_decay_style="constant"',
            'RetrievalArgs.negative_sampling="sampled_live"', "RetrievalArgs.num_negatives=16",
            'RetrievalArgs.eval_metrics=("HR@10", "NDCG@10")',
            'item/DynamicEmbeddingArgs.feature_names=["item_id"]',
            'item/DynamicEmbeddingArgs.table_name="item"',
            "item/DynamicEmbeddingArgs.item_vocab_size_or_capacity=100", *extra]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_retrieval_on_an_open_catalogue(tmp_path, nproc):
    """Retrieval with hashed ids, a dynamic item table whose rows expire and the sampled
    softmax over its live rows (in-batch and uniform negatives): every window is tested over
    the live items and trained, on 1 and 2 processes (a rank whose batch holds no query runs
    the same backward as the others)."""
    stream = tmp_path / "s"
    write_rated_stream(stream, seed=7, first=0, partitions=4)
    # a last window whose users are nearly all rank 0's (odd raw ids: even keys): rank 1's
    # later batches hold padding only, no query
    lines = ["user_id,item_id,timestamp,rating"]
    t = 2_000_000
    for k in range(160):
        user = 2 if k == 0 else 2 * (k % 40) + 1
        t += 1
        lines.append(f"{user},{10_000_000_000 + 60 + k % 30},{t},1")
    (stream / "p004").mkdir()
    (stream / "p004" / "part-00000.csv").write_text("\n".join(lines) + "\n")
    (stream / "p004" / "_SUCCESS").touch()
    params = open_catalogue(stream, "TrainerArgs.ckpt_save_interval=2",
                            "StreamArgs.item_ttl_days=0.0005")
    call(entry("retrieval", params, nproc), tmp_path)
    rows = stream_rows(tmp_path / "run")
    assert [w["window"] for w in rows] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(w["trained_events"] > 0 and w["eval_events"] > 0 for w in rows[1:])
    assert rows[-1]["train_steps"] >= 3  # (rank 0's 40 users: several batches)
    assert rows[-1]["item_occupied"] <= 100
    assert sum(w["expired_item_rows"] for w in rows) > 0
    assert any(w["HR@10"] > 0 for w in rows[1:])


@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.extended),
                                   pytest.param(2, marks=pytest.mark.slow)])
def test_an_open_catalogue_with_admission_trains_and_counts_what_waits(tmp_path, nproc):
    """item/DynamicEmbeddingArgs.admit_min_count = 3: an item gets a row at its third
    occurrence; the windows still train (targets without a row are left out of the loss) and
    their rows say how many lookups and targets waited for admission (all ranks)."""
    stream = tmp_path / "s"
    write_rated_stream(stream, seed=7, first=0, partitions=3)
    params = open_catalogue(stream, "TrainerArgs.ckpt_save_interval=3",
                            "item/DynamicEmbeddingArgs.admit_min_count=3",
                            "item/DynamicEmbeddingArgs.admit_sketch_width=4096")
    out = call(entry("retrieval", params, nproc), tmp_path)
    rows = stream_rows(tmp_path / "run")
    assert [w["window"] for w in rows] == [1.0, 2.0, 3.0]
    assert all(w["trained_events"] > 0 and w["train_steps"] > 0 for w in rows)
    assert rows[0]["item_not_admitted"] > 0 and sum(w["not_admitted_targets"] for w in rows) > 0
    waited = [w["item_not_admitted"] for w in rows]
    assert waited == sorted(waited)  # a running count
    # every row an item holds went to an item seen at least 3 times (99 rows, one kept)
    assert 0 < rows[-1]["item_occupied"] <= 99
    with open(tmp_path / "run" / "metrics.csv") as fh:
        losses = [float(r["value"]) for r in csv.DictReader(fh)
                  if r["split"] == "train" and r["name"] == "loss"]
    assert losses and all(math.isfinite(v) for v in losses), out[-3000:]
    if nproc == 1:  # resumed in its run folder with admission off: refused, naming it
        off = [*(p for p in params if "admit_min_count" not in p), 'TrainerArgs.ckpt_load_dir="auto"']
        out = call(entry("retrieval", off, nproc), tmp_path, ok=False)
        assert "DynamicEmbeddingArgs.admit_min_count" in out, out[-3000:]


@pytest.mark.slow  # a stream run, an export and a recommendation (27 s)
def test_an_open_catalogue_model_serves_raw_ids(tmp_path):
    """Export of a hashed-ids retrieval checkpoint and hstu.recommend: raw item ids in, raw ids
    of the items the dynamic table holds out, exactly the top-K that the trained model scores
    over its live items for those histories."""
    stream = tmp_path / "s"
    write_rated_stream(stream, seed=9, first=0, partitions=3)
    call(entry("retrieval", open_catalogue(stream, "TrainerArgs.ckpt_save_interval=3")), tmp_path)
    ckpt = max((tmp_path / "run" / "checkpoints").glob("iter_*"), key=lambda p: int(p.name[5:]))
    call([sys.executable, "-m", "hstu.export", "--ckpt", str(ckpt), "--out", "art", "--no-aoti"],
         tmp_path)
    events = [line.split(",") for line in
              (stream / "p002" / "part-00000.csv").read_text().split("\n")[1:] if line]
    by_user: dict[str, list[list[str]]] = {}
    for e in events:
        by_user.setdefault(e[0], []).append(e)
    users = sorted(by_user, key=lambda u: -len(by_user[u]))[:3]
    asked = tmp_path / "asked.csv"
    asked.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{e[0]},{e[1]},{e[2]}\n" for u in users for e in by_user[u][-6:]))
    call([sys.executable, "-m", "hstu.recommend", "--model", "art", "--input", str(asked),
          "--top-k", "10", "--out", "top.csv", "--no-aoti"], tmp_path)
    got: dict[str, list[str]] = {}
    with open(tmp_path / "top.csv") as fh:
        for r in csv.DictReader(fh):
            got.setdefault(r["user_id"], []).append(r["item_id"])
    call([sys.executable, "-m", "tests.serving.online_reference", str(ckpt), str(asked), "10",
          str(tmp_path / "want.json")], tmp_path)
    want = __import__("json").loads((tmp_path / "want.json").read_text())
    assert set(got) == set(users)
    for user in users:
        assert got[user] == want[user], (user, got[user], want[user])
        assert all(int(i) >= 10_000_000_000 for i in got[user])  # raw ids, not keys


def test_a_stream_with_nothing_readable_fails_in_one_line(tmp_path):
    """Every partition set aside (here: one whose file is not a data file): the run says why
    and exits non-zero (a run that trained nothing on what it was given is not a success)."""
    stream = tmp_path / "s"
    (stream / "p000").mkdir(parents=True)
    (stream / "p000" / "notes.md").write_text("not events\n")
    (stream / "p000" / "_SUCCESS").touch()
    out = call(entry("retrieval", ['DatasetArgs.dataset_name="stream"',
                                   "StreamArgs.item_capacity=64", f'StreamArgs.path="{stream}"',
                                   "DatasetArgs.contextual_features=[]",
                                   'TrainerArgs.run_dir="run"']), tmp_path, ok=False)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no window trained" in errors[0], out[-3000:]
    assert "1 partitions set aside" in errors[0]
    assert (stream / "_quarantine" / "p000" / "notes.md").exists()  # nothing lost
