"""Online checkpoints as full bases and deltas (StreamArgs.full_checkpoint_every,
hstu.training.online_checkpoints; docs/online.md "Checkpoints: bases and deltas").

Checked: a checkpoint rebuilt from its base and deltas (here by hand, independently of the
code that restores it) equals the checkpoint an all-full run writes at the same step, bitwise
(tables, dense state and optimizer, RNG streams, id maps, user store, position); a run resumed
from a delta ends in the uninterrupted run's state with the same metrics rows, on 1 and 2
processes, also after a SIGKILL inside a delta save; a delta of a few users is a small
fraction of a full checkpoint's stream files; keep_last_n never removes a link a kept
checkpoint needs, and a broken link is refused in one line (or skipped by "auto").
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_utils import run_multiprocess
from tests.training.test_online import (
    ROOT,
    _env,
    _params,
    assert_same,
    data,  # noqa: F401 - the module's dataset fixture
    killed_then_resumed,
    newest,
    rows,
    run,
)

DELTA = ["StreamArgs.full_checkpoint_every=4", "TrainerArgs.ckpt_save_interval=1"]
FULL = ["StreamArgs.full_checkpoint_every=1", "TrainerArgs.ckpt_save_interval=1"]


# ------------------------------------------------------------------------------ helpers
def chain_of(folder: Path) -> list[Path]:
    """The folders of ``folder``'s chain, its base first, itself last."""
    info = json.loads((folder / "online.json").read_text())["checkpoint"]
    return [folder.parent / n for n in info["chain"]] + [folder]


def rebuilt_state(folder: Path, world: int = 1) -> dict:
    """What ``folder`` restores to, rebuilt by hand from its chain: the base's id maps and
    store snapshots, then each delta's new ids, written rows and deleted users in order."""

    links = chain_of(folder)
    base = links[0]
    assert json.loads((base / "online.json").read_text())["checkpoint"]["kind"] == "full"
    users = np.load(base / "user_ids.npy")
    items = np.load(base / "item_ids.npy")
    stores: list[dict[int, tuple]] = []
    for r in range(world):
        conn = sqlite3.connect(base / f"user_store.rank{r}-of-{world}.sqlite")
        stores.append({row[0]: row for row in conn.execute("SELECT * FROM history")})
        max_len = int(dict(conn.execute("SELECT key, value FROM meta"))["max_sequence_length"])
        conn.close()
    for link in links[1:]:
        saved = json.loads((link / "stream.json").read_text())
        if (link / "user_ids.npy").exists():  # hashed ids: whole in every checkpoint
            users, items = np.load(link / "user_ids.npy"), np.load(link / "item_ids.npy")
        else:
            assert saved["delta_from"] == {"num_users": len(users), "num_items": len(items)}
            users = np.concatenate([users, np.load(link / "user_ids.delta.npy")])
            items = np.concatenate([items, np.load(link / "item_ids.delta.npy")])
            users, items = users[:saved["num_users"]], items[:saved["num_items"]]
        for r in range(world):
            conn = sqlite3.connect(link / f"user_store_delta.rank{r}-of-{world}.sqlite")
            for user, n, *blobs, last, tail in conn.execute("SELECT * FROM history"):
                if tail:  # events appended: after the stored ones, the newest max_len kept
                    old = stores[r][user]
                    n = min(old[1] + n, max_len)
                    blobs = [(a + b)[len(a + b) - 8 * n:] for a, b in zip(old[2:5], blobs)]
                stores[r][user] = (user, n, *blobs, last)
            for (user,) in conn.execute("SELECT user FROM deleted"):
                stores[r].pop(user, None)  # (also users added and dropped since)
            conn.close()
    stream = json.loads((folder / "stream.json").read_text())
    stream.pop("delta_from", None)
    online = json.loads((folder / "online.json").read_text())
    online.pop("checkpoint")
    state = {
        "tables": rebuilt_tables(links),
        "dense": torch.load(folder / "dense_tp0.pt", weights_only=False),
        "rng": [torch.load(folder / f"rng_rank{r}.pt", weights_only=False) for r in range(world)],
        "users": users, "items": items, "stream": stream, "online": online,
        "store": [sorted(s.values()) for s in stores],
    }
    return state


def _dcp(folder: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / f"{folder.name}.tables.pt"
    dcp_to_torch_save(str(folder), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return state


def row_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("table_rows.rank*.pt"))


def rebuilt_tables(links: list[Path]) -> dict:
    """The DCP state (global tensors) the last link restores to, by hand: its own DCP files,
    and where it is a row delta the tables of the newest link holding them whole with the
    rows of each later link written on them in order (each row once, by one rank's file)."""
    folder = links[-1]
    own = _dcp(folder)
    if not row_files(folder):
        return own
    start = max(i for i, link in enumerate(links) if not row_files(link))
    tables = _dcp(links[start])["embeddings"]  # (DCP's keys under the TableState's key)
    mine = own.get("embeddings", {})
    for link in links[start + 1:]:
        seen: dict[str, set[int]] = {}
        for path in row_files(link):
            for key, entry in torch.load(path, weights_only=False).items():
                assert key not in mine, key  # a row delta's DCP part holds no table rows
                if "whole" in entry:
                    tables[key] = entry["whole"]
                    continue
                rows = entry["rows"].tolist()
                assert not seen.setdefault(key, set()) & set(rows), f"{path}: {key} twice"
                seen[key] |= set(rows)
                tables[key][entry["rows"]] = entry["values"].to(tables[key].dtype)
    return {**own, "embeddings": {**tables, **mine}}


def kinds(run_dir: Path) -> dict[str, str]:
    return {p.name: json.loads((p / "online.json").read_text())["checkpoint"]["kind"]
            for p in sorted((run_dir / "ckpt").glob("iter_*"))}


def same_rows(a: Path, b: Path, lag: bool = True) -> None:
    """The metrics rows of two runs (test_online.rows: without the checkpoint rows) and,
    without ``lag``, the lag rows left out (a stream folder that grew between the runs)."""
    skip = () if lag else ("events_waiting", "seconds_behind")

    def keep(run_dir: Path) -> list:
        return [r for r in rows(run_dir) if r[2] not in skip]

    assert keep(a) == keep(b)


# ------------------------------------------------------------------ a folder stream (fast)
def _partition(folder: Path, name: str, users: np.ndarray, t0: int, per_user: int = 1) -> None:
    part = folder / name
    part.mkdir(parents=True)
    with open(part / "part-0000.csv", "w") as fh:
        fh.write("user_id,item_id,timestamp\n")
        t = t0
        for _ in range(per_user):
            for u in users:
                fh.write(f"{u},{1000 + (u * 7 + t) % 50},{t}\n")
                t += 1
    (part / "_SUCCESS").touch()


def _folder_cmd(data: Path, run_dir: Path, folder: Path,  # noqa: F811
                extra: list[str]) -> list[str]:
    base = [p for p in _params(data, run_dir, "retrieval", [])
            if not p.startswith("StreamArgs.replay")]
    cmd = [sys.executable, str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file",
           str(ROOT / "configs" / "debug_retrieval.gin")]
    for p in [*base, f'StreamArgs.path="{folder}"', "TrainerArgs.ckpt_save_interval=1", *extra]:
        cmd += ["--gin-param", p]
    return cmd


def _run_folder(data: Path, run_dir: Path, folder: Path,  # noqa: F811
                extra: list[str]) -> str:
    proc = subprocess.run(_folder_cmd(data, run_dir, folder, extra), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow  # (several online runs and resumes)
def test_deltas_small_chains_kept_and_resume_bitwise(data, tmp_path):  # noqa: F811
    """A stream whose first partition brings 3,000 users (one event each) and whose later
    partitions touch 5 of them: the delta's stream files are a small fraction of the full
    checkpoint's; the users expired at p03 (StreamArgs.user_ttl_days) travel as the delta's
    deleted users; keep_last_n=1 keeps the newest checkpoint and its chain only; a run
    resumed from base + 2 deltas (with a full checkpoint asked for by the full_checkpoint
    file) ends bitwise where an all-full uninterrupted run ends, with the same rows. In-batch
    negatives: the deltas hold the table rows looked up since (StreamArgs.table_row_deltas),
    restored on resume from the base's tables and both deltas' rows."""
    rng = np.random.default_rng(0)
    many = np.arange(10_000, 13_000)
    few = rng.choice(many, 5, replace=False)
    folder = tmp_path / "events"
    _partition(folder, "p01", many, 1_000)
    for k in range(2, 6):
        _partition(folder, f"p{k:02d}", few, 100_000 * k, per_user=4)
    # the reference: all five partitions in one run, every checkpoint full
    ttl = "StreamArgs.user_ttl_days=3"  # p03 (day 3.5) drops the users last seen in p01
    ttl = [ttl, 'RetrievalArgs.negative_sampling="in_batch"']
    ref = tmp_path / "ref"
    _run_folder(data, ref, folder, ["StreamArgs.full_checkpoint_every=1", *ttl])
    # the run under test sees p01..p03 first (the others hidden), then all five
    hidden = [folder / f"p{k:02d}" for k in (4, 5)]
    for p in hidden:
        p.rename(p.with_name("." + p.name))
    run_dir = tmp_path / "delta"
    extra = ["StreamArgs.full_checkpoint_every=3", "TrainerArgs.keep_last_n=1", *ttl]
    out = _run_folder(data, run_dir, folder, extra)
    assert list(kinds(run_dir).values()) == ["full", "delta", "delta"], kinds(run_dir)
    # the newest is a delta: its base and the delta before it are kept (keep_last_n=1)
    assert [p.name for p in chain_of(newest(run_dir))] == list(kinds(run_dir))
    sizes = [float(r[3]) for r in _all_rows(run_dir) if r[2] == "checkpoint_stream_bytes"]
    assert sizes[1] * 10 < sizes[0], sizes  # p02's delta: 5 users; measured about 1/40
    conn = sqlite3.connect(newest(run_dir) / "user_store_delta.rank0-of-1.sqlite")
    deleted = [u for (u,) in conn.execute("SELECT user FROM deleted")]
    conn.close()
    assert len(deleted) == 3000 - 5, len(deleted)  # expired at p03
    assert "checkpoint iter_0: full (the first of the run)" in out
    assert " delta 2 on base iter_0, " in out
    assert len(re.findall(r"delta \d on base iter_0, .* tables .* rows action \d+ of 5, item \d+ of 61",
                          out)) == 2, out  # the tables' touched rows
    assert [len(row_files(p)) for p in chain_of(newest(run_dir))] == [0, 1, 1]
    from hstu.export import StreamMaps

    for name in kinds(run_dir):  # each checkpoint rebuilt from its chain = the all-full run's
        assert_same(rebuilt_state(ref / "ckpt" / name), rebuilt_state(run_dir / "ckpt" / name),
                    name)
        # the id maps an export writes beside the model (hstu.export), through the chain
        full, delta = StreamMaps(ref / "ckpt" / name), StreamMaps(run_dir / "ckpt" / name)
        assert_same([m.state_dict() for m in (full.users, full.items)],
                    [m.state_dict() for m in (delta.users, delta.items)], name)
    # resume (from base + 2 deltas) with a full checkpoint asked for
    for p in hidden:
        p.with_name("." + p.name).rename(p)
    (run_dir / "ckpt" / "full_checkpoint").touch()
    out = _run_folder(data, run_dir, folder, extra)
    assert "stream: resumed after 3 windows" in out
    assert "asked for by" in out and not (run_dir / "ckpt" / "full_checkpoint").exists()
    left = kinds(run_dir)
    assert list(left.values()) == ["full", "delta"], left  # the old chain pruned
    assert_same(rebuilt_state(newest(ref)), rebuilt_state(newest(run_dir)), "state")
    assert newest(ref).name == newest(run_dir).name
    same_rows(ref, run_dir, lag=False)  # p04, p05 landed between the two runs


@pytest.mark.slow
def test_delta_table_bytes_follow_the_rows_touched(tmp_path):
    """A stream of 50 items into an item table of 20,000 rows (StreamArgs.item_capacity), a
    checkpoint after every window, a base every 3: a delta's table files hold the item rows
    its windows' training looked up (at most the 51 the stream reaches), each row's 16 weights,
    its momentum and its index (84 B) plus a fixed few kB, against the base's whole table."""
    from tests.training.test_stream_runs import run as stream_run
    from tests.training.test_stream_runs import write_stream

    stream, work = tmp_path / "stream", tmp_path / "work"
    write_stream(stream, seed=1, partitions=5)
    work.mkdir()
    out = stream_run(work, stream, [
        "StreamArgs.item_capacity=20000", 'RetrievalArgs.negative_sampling="in_batch"',
        "StreamArgs.full_checkpoint_every=3", "TrainerArgs.ckpt_save_interval=1",
        'TrainerArgs.run_dir="run"'])
    got: dict[str, list[float]] = {}
    for row in _all_rows(work / "run"):
        if row[1] == "stream" and row[2].startswith("checkpoint_"):
            got.setdefault(row[2], []).append(float(row[3]))
    full, tables, items = got["checkpoint_full"], got["checkpoint_table_bytes"], \
        got["checkpoint_rows_item"]
    assert full == [1.0, 0.0, 0.0, 1.0, 0.0], full
    per_row = 8 + 16 * 4 + 8 + 4  # index + weights, index + row-wise Adagrad momentum
    for k, is_full in enumerate(full):
        if is_full:
            assert items[k] == 20_001 and tables[k] >= 20_001 * (16 * 4 + 4), (k, tables)
            continue
        assert 0 < items[k] <= 51, items
        assert per_row * items[k] <= tables[k] <= per_row * items[k] + 8_000, (k, tables, items)
        assert tables[k] * 50 < tables[0], tables
    assert re.search(r"delta 1 on base iter_\d+, .* tables .* rows item \d+ of 20001\)", out), out
    # an export of a delta reads the tables through its chain (one process)
    delta = sorted((work / "run" / "checkpoints").glob("iter_*"), key=lambda p: int(p.name[5:]))[1]
    assert row_files(delta) and len(chain_of(delta)) == 2
    run_multiprocess(_export_equals_rebuilt, world_size=1, tmp=str(delta))


def _export_equals_rebuilt(rank: int, world_size: int, tmp: str) -> None:
    """hstu.export's load of checkpoint ``tmp``: its tables equal the chain rebuilt by hand."""
    from hstu.embeddings import embedding_state_dict
    from hstu.export import load_for_export

    model = load_for_export(tmp, None, [])[0]
    want = rebuilt_tables(chain_of(Path(tmp)))["embeddings"]
    got = embedding_state_dict(model)
    assert "sparse.tables.embeddings.item.weight" in got
    for key, value in got.items():
        if hasattr(value, "local_shards"):  # (one process: one shard, the whole table)
            value = value.local_shards()[0].tensor
        assert torch.equal(value, want[key]), key


def _all_rows(run_dir: Path) -> list[list[str]]:
    import csv

    with open(run_dir / "metrics.csv") as fh:
        return list(csv.reader(fh))[1:]


# ------------------------------------------------------------------ lifecycle (fast, no run)
def _fake_checkpoint(root: Path, step: int, needs: dict[str, int] | None = None) -> Path:
    from hstu.training import checkpoint as ckpt

    folder = root / f"iter_{step}"
    folder.mkdir(parents=True)
    (folder / "meta.pt").write_bytes(b"x" * (step + 1))
    manifest = {"step": step, "world_size": 1,
                "files": ckpt.describe_written_files(str(folder), ["meta.pt"])}
    if needs:
        manifest["needs"] = needs
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _chain(root: Path, steps: list[int], every: int) -> None:
    """Checkpoints at ``steps``, a base every ``every``, each delta needing the ones since."""
    from hstu.training import checkpoint as ckpt

    links: list[str] = []
    for k, step in enumerate(steps):
        if k % every == 0:
            links = []
        _fake_checkpoint(root, step, {n: ckpt.manifest_crc(str(root / n)) for n in links})
        links.append(f"iter_{step}")


def test_keep_last_n_never_breaks_a_chain(tmp_path):
    from hstu.training import checkpoint as ckpt
    from hstu.training.lifecycle import CheckpointLifecycle

    root = tmp_path / "ckpt"
    _chain(root, [1, 2, 3, 4, 5, 6, 7], every=3)  # bases 1, 4, 7
    life = CheckpointLifecycle(str(root), keep_last_n=2, log=lambda _m: None)
    life.prune()
    # 7 (a base) and 6 (a delta on 4, after 5) are kept, with 4 and 5
    assert sorted(p.name for p in root.iterdir()) == ["iter_4", "iter_5", "iter_6", "iter_7"]
    for p in root.iterdir():
        assert ckpt.chain_problem(str(p)) is None, p
    life.keep_last_n = 1
    life.prune()
    assert sorted(p.name for p in root.iterdir()) == ["iter_7"]


def test_broken_link_refused_in_one_line_and_auto_falls_back(tmp_path):
    from hstu.training.checkpoint import CheckpointError
    from hstu.training.lifecycle import CheckpointLifecycle

    root = tmp_path / "ckpt"
    _chain(root, [1, 2, 3, 4, 5], every=3)  # 1 <- 2 <- 3, 4 <- 5
    logged: list[str] = []
    life = CheckpointLifecycle(str(root), log=logged.append)
    assert life.resolve("auto") == str(root / "iter_5")
    (root / "iter_4" / "meta.pt").write_bytes(b"damaged")  # 5's base is damaged
    assert life.resolve("auto") == str(root / "iter_3")  # the newest complete chain
    assert any("iter_4" in m and "iter_5" in m for m in logged), logged
    with pytest.raises(CheckpointError) as err:
        life.resolve(str(root / "iter_5"))
    line = str(err.value)
    assert "\n" not in line and "iter_4/meta.pt" in line and "iter_5" in line, line
    # a link missing, and a link saved again since (another checkpoint of the same step)
    import shutil

    shutil.rmtree(root / "iter_1")
    with pytest.raises(CheckpointError, match=r"iter_1: missing .*chain of .*iter_3"):
        life.resolve(str(root / "iter_3"))
    _fake_checkpoint(root, 1)  # back as it was: the chain is whole again
    assert life.resolve(str(root / "iter_3")) == str(root / "iter_3")
    manifest = json.loads((root / "iter_2" / "manifest.json").read_text())
    manifest["step"] = 22  # iter_2 saved again (other content, other manifest)
    (root / "iter_2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"iter_2: not the checkpoint .*iter_3"):
        life.resolve(str(root / "iter_3"))


def test_id_map_deltas_extend_the_full_maps(tmp_path):
    """save_stream(since=...) writes the ids added since; load_stream rebuilds the maps from
    the full one and the deltas in order, and refuses a delta that does not follow on."""
    from hstu.data.errors import DataError
    from hstu.data.stream import StreamPosition, load_stream, save_stream
    from hstu.data.stream.core import IdMap

    class Source:
        def __init__(self) -> None:
            self.users, self.items, self.state = IdMap("user"), IdMap("item"), {}

        def state_dict(self):
            return {"x": 1, "users": self.users.state_dict(), "items": self.items.state_dict()}

        def load_state_dict(self, state):
            self.state = state

    src = Source()
    folders = [tmp_path / f"c{k}" for k in range(3)]
    since = None
    for k, folder in enumerate(folders):
        src.users.map(np.array([f"u{k}", f"u{k}{k}", "u0"]))
        src.items.map(np.arange(k * 3, k * 3 + 5))
        folder.mkdir()
        names = save_stream(folder, StreamPosition("p", k), src, since)
        assert ("user_ids.delta.npy" in names) == (since is not None)
        since = (len(src.users), len(src.items))
    back = Source()
    assert load_stream(folders[2], back, folders[:2]) == StreamPosition("p", 2)
    assert list(back.users.raw(np.arange(1, len(src.users) + 1))) == \
        list(src.users.raw(np.arange(1, len(src.users) + 1)))
    assert np.array_equal(back.state["items"]["keys"], src.items.state_dict()["keys"])
    with pytest.raises(DataError, match=r"c2/user_ids.delta.npy.*after the first 4.*holds 2"):
        load_stream(folders[2], Source(), [folders[0]])  # the delta c1 left out
    with pytest.raises(DataError, match=r"c1/stream.json.*a delta checkpoint"):
        load_stream(folders[1], Source())


# ------------------------------------------------------------------ a replay (slow)
ROW_DELTAS = ['RetrievalArgs.negative_sampling="in_batch"',
              'item/EmbeddingArgs.feature_names=["item_id"]', 'item/EmbeddingArgs.table_name="item"',
              'item/EmbeddingArgs.sharding_type="model_parallel"',
              'item/EmbeddingArgs.sharding_override="row_wise"',
              "item/EmbeddingArgs.item_vocab_size_or_capacity=100"]
"""In-batch negatives (the full-corpus loss updates every item row: tables whole) and the item
table sharded row-wise: the deltas hold the item rows touched, split over the ranks (100 rows,
the ~60 items in both halves: a window touches some, and rows with their indices weigh less
than the table whole, which a delta writes instead when they would not)."""


@pytest.fixture(scope="module")
def all_full(data, tmp_path_factory) -> dict[int, Path]:  # noqa: F811
    """The replay uninterrupted with a checkpoint after every window, all full, on 1 and 2
    processes, with the full-corpus loss or ROW_DELTAS (made on first use)."""
    made: dict[tuple[int, bool], Path] = {}

    def get(nproc: int, rows: bool = False) -> Path:
        if (nproc, rows) not in made:
            made[nproc, rows] = tmp_path_factory.mktemp(f"all_full{nproc}{'rows' * rows}")
            run(data, made[nproc, rows], extra=[*FULL, *(ROW_DELTAS if rows else [])],
                nproc=nproc)
        return made[nproc, rows]

    return get  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "rows"), [
    pytest.param(1, False, id="1-tables_whole"),
    pytest.param(1, True, id="1-table_rows", marks=pytest.mark.extended),
    pytest.param(2, False, id="2-tables_whole", marks=pytest.mark.extended),
    pytest.param(2, True, id="2-table_rows"),
])
def test_resume_from_base_and_deltas_is_bitwise(all_full, data, tmp_path, nproc,  # noqa: F811
                                                rows):
    """Stopped at a checkpoint that is the 3rd delta on its base, then resumed: every
    checkpoint rebuilt from its chain equals the all-full run's of the same step, and the
    end state and rows equal the uninterrupted run's. With the full-corpus loss the deltas
    hold the tables whole (said once); with ROW_DELTAS the rows touched since the checkpoint
    before, from each rank's shard of the row-wise item table."""
    ref = all_full(nproc, rows)
    run_dir = tmp_path / "run"
    delta = [*DELTA, *(ROW_DELTAS if rows else [])]
    # the stop lands on the 3rd delta (a window is 3 steps on 1 process, 2 on 2)
    stop = {1: 10, 2: 7}[nproc]
    out = run(data, run_dir, extra=[*delta, f"TrainerArgs.max_train_iters={stop}"], nproc=nproc)
    whole = "delta checkpoints hold the embedding tables whole: negative_sampling="
    assert (out.count(whole) == 1) != rows, out
    stopped = newest(run_dir)
    assert len(chain_of(stopped)) == 4, kinds(run_dir)  # base, 3 deltas
    if rows:
        files = [row_files(p) for p in chain_of(stopped)]
        assert [len(f) for f in files] == [0, nproc, nproc, nproc], files
        held = [torch.load(f, weights_only=False)["sparse.tables.embeddings.item.weight"]["rows"]
                for f in files[1]]
        assert all(len(h) for h in held), held  # both ranks' shards hold touched rows
    out = run(data, run_dir, extra=delta, nproc=nproc)
    assert f"resumed from {stopped}" in out and "stream: resumed after" in out
    found = kinds(run_dir)
    assert "delta" in found.values() and list(found.values()).count("full") >= 2, found
    for name in found:
        assert_same(rebuilt_state(ref / "ckpt" / name, nproc),
                    rebuilt_state(run_dir / "ckpt" / name, nproc), name)
    assert newest(ref).name == newest(run_dir).name
    same_rows(ref, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.extended), 2])
def test_kill_during_a_delta_save_resumes_bitwise(all_full, data, tmp_path, nproc):  # noqa: F811
    """SIGKILL right after the 2nd user-store delta was written into a checkpoint being
    saved (on 2 processes: rank 1): the half-written checkpoint is never read; the restart
    resumes the chain before it and ends in the uninterrupted run's state."""
    ref = all_full(nproc)
    point = "delta_save:2" + (":1" if nproc > 1 else "")
    out = killed_then_resumed(data, tmp_path / "run", point, nproc, extra=DELTA)
    assert "stream: resumed after" in out and "removed unfinished checkpoint folders" in out
    assert_same(rebuilt_state(newest(ref), nproc), rebuilt_state(newest(tmp_path / "run"), nproc),
                "state")
    same_rows(ref, tmp_path / "run")


@pytest.mark.slow
def test_hashed_ids_and_expiry_with_deltas(tmp_path):
    """StreamArgs.ids = "hashed" (no numbered map: the remembered names are written whole),
    a dynamic item table, users and rows expiring: read in two goes with deltas (the resume
    from a base and a delta), every checkpoint rebuilt from its chain holds the tables, dense
    state, id keys and user store of the one-go all-full run at the same step."""
    from tests.training.test_stream_runs import _ranking, write_rated_stream

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    write_rated_stream(whole, seed=5, first=0, partitions=4)
    write_rated_stream(parts, seed=5, first=0, partitions=2)
    _ranking(tmp_path, whole, tmp_path / "once")
    every = ["StreamArgs.full_checkpoint_every=3"]
    _ranking(tmp_path, parts, tmp_path / "twice", every)
    write_rated_stream(parts, seed=5, first=2, partitions=2)
    for p in ("p002", "p003"):
        (parts / p / "part-00000.csv").write_text((whole / p / "part-00000.csv").read_text())
    out = _ranking(tmp_path, parts, tmp_path / "twice", every)
    assert "stream: resumed after 2 windows" in out
    twice = {p.name: p for p in (tmp_path / "twice" / "checkpoints").glob("iter_*")}
    assert [len(chain_of(twice[n])) for n in sorted(twice, key=lambda n: int(n[5:]))] == \
        [1, 2, 3, 1]
    for name, folder in twice.items():
        a = rebuilt_state(tmp_path / "once" / "checkpoints" / name)
        b = rebuilt_state(folder)
        for key in ("tables", "dense", "users", "items", "store"):
            assert_same(a[key], b[key], f"{name}.{key}")
