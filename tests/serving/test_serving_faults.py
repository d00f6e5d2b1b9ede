"""The serving path's faults are one line each, as the trainer's (issue 30, points 2, 3, 6):
damaged checkpoints and artifacts, an unwritable --out, unknown users and segments, training's
column names in an events file, and a finished run resumed. One tiny retrieval run (saves at
steps 10 and 20) and one export serve every test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.serving.test_export import BLOCKED, ROOT, _env

# the slow tier (make test-slow, run by CI): one training run and export serve every test;
# the default tier keeps the artifact's one-line refusals in tests/serving/test_export.py
pytestmark = pytest.mark.slow


def _run(cmd: list[str], timeout: int = 300, warnings: bool = False) -> subprocess.CompletedProcess:
    env = _env()
    if warnings:  # Python's default warning filters, as a user's shell has them
        env.pop("PYTHONWARNINGS")
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _export(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "hstu.export", *args, "--no-aoti"])


def _recommend(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", BLOCKED, *args])


def _one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The fault's line: the only line on stderr, exit ``code``, no traceback anywhere."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def _truncate(path: Path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    run_dir, data = tmp / "run", tmp / "data" / "synthetic"
    cmd = [
        sys.executable,
        str(ROOT / "pretrain_gr_retrieval.py"),
        "--gin-config-file",
        str(ROOT / "configs" / "debug_retrieval.gin"),
        "--gin-param",
        f'TrainerArgs.run_dir="{run_dir}"',
        "--gin-param",
        f'DatasetArgs.dataset_path="{data}"',
        "--gin-param",
        "TrainerArgs.ckpt_save_interval=10",
        "--gin-param",
        f'TrainerArgs.ckpt_save_dir="{run_dir / "ckpt"}"',
    ]
    proc = _run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # a copy of the checkpoints whose newest one has a truncated shard
    damaged = tmp / "damaged_ckpt"
    shutil.copytree(run_dir / "ckpt", damaged)
    _truncate(damaged / "iter_20" / "__0_0.distcp")
    return {"tmp": tmp, "run_dir": run_dir, "data": data, "cmd": cmd, "damaged": damaged}


@pytest.fixture(scope="module")
def art(run) -> dict:
    """Exported from the root whose newest checkpoint is damaged: the older one, said so."""
    out = run["tmp"] / "art"
    proc = _export("--ckpt", str(run["damaged"]), "--out", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return {"path": out, "proc": proc}


# ------------------------------------------------------------------------------- export


def test_export_from_a_root_whose_newest_checkpoint_is_damaged_names_it(run, art) -> None:
    shard = run["damaged"] / "iter_20" / "__0_0.distcp"
    skipped = [
        ln for ln in art["proc"].stdout.splitlines() if "skipping a damaged checkpoint" in ln
    ]
    assert len(skipped) == 1 and str(shard) in skipped[0] and "truncated" in skipped[0], art[
        "proc"
    ].stdout
    assert f"checkpoint {run['damaged'] / 'iter_10'} (step 10" in art["proc"].stdout
    manifest = json.loads((art["path"] / "manifest.json").read_text())
    assert manifest["checkpoint"]["step"] == 10
    # the artifact's manifest holds size and CRC32 of its other files, as checkpoints do
    names = {p.name for p in art["path"].iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names and "user_map.parquet" in names
    assert manifest["files"]["tables.pt"]["size"] == (art["path"] / "tables.pt").stat().st_size


def test_export_of_a_checkpoint_with_a_truncated_shard(run) -> None:
    shard = run["damaged"] / "iter_20" / "__0_0.distcp"
    line = _one_line(
        _export("--ckpt", str(run["damaged"] / "iter_20"), "--out", str(run["tmp"] / "never")), 3
    )
    manifest = json.loads((run["damaged"] / "iter_20" / "manifest.json").read_text())
    size = manifest["files"]["__0_0.distcp"]["size"]
    assert line == f"error: {shard}: 100 bytes, the manifest says {size} (truncated or damaged)", (
        line
    )
    assert not (run["tmp"] / "never").exists() and not (run["tmp"] / "never.tmp").exists()


def test_export_of_a_folder_without_a_complete_checkpoint(run) -> None:
    empty = run["tmp"] / "no_ckpt"
    (empty / "iter_5.tmp").mkdir(parents=True)  # a save cut short: no manifest
    line = _one_line(_export("--ckpt", str(empty), "--out", str(run["tmp"] / "never")), 3)
    assert line == (
        f"error: --ckpt {empty}: no complete checkpoint there (no iter_<step> folder "
        "whose files match its manifest)"
    ), line


def test_export_to_a_read_only_out(run) -> None:
    folder = run["tmp"] / "read_only"
    folder.mkdir()
    out = folder / "art"
    cmd = [
        sys.executable,
        "-m",
        "hstu.export",
        "--ckpt",
        str(run["run_dir"] / "ckpt"),
        "--out",
        str(out),
        "--no-aoti",
    ]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            proc = _run(cmd)
        finally:
            folder.chmod(0o755)
        want = "Permission denied (EACCES)"
    else:  # root writes anywhere: a read-only bind mount in a private mount namespace
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: no read-only folder to write to")
        script = (
            f'mount --bind "{folder}" "{folder}" && mount -o remount,ro,bind "{folder}" && '
            'exec "$@"'
        )
        proc = _run(["unshare", "-m", "sh", "-c", script, "sh", *cmd])
        if "mount:" in proc.stderr or "unshare:" in proc.stderr:
            pytest.skip(f"no read-only mount here: {proc.stderr.strip()[:200]}")
        want = "Read-only file system (EROFS)"
    line = _one_line(proc, 3)
    assert line.startswith(f"error: --out {out}: cannot write {out}.tmp: {want}"), line


# ---------------------------------------------------------------------------- recommend


def test_recommend_on_a_truncated_tables_file_or_program(run, art) -> None:
    for name in ("tables.pt", "dense.pt2"):
        broken = run["tmp"] / f"broken_{name}"
        shutil.copytree(art["path"], broken)
        _truncate(broken / name, keep=(broken / name).stat().st_size // 2)
        line = _one_line(
            _recommend(
                "--model",
                str(broken),
                "--input",
                str(run["data"]),
                "--out",
                str(run["tmp"] / "x.csv"),
            ),
            3,
        )
        size = (art["path"] / name).stat().st_size
        assert line == (
            f"error: {broken / name}: {size // 2} bytes, the manifest says {size} "
            "(truncated or damaged); re-export the checkpoint"
        ), line


def test_recommend_counts_unknown_users_and_segments_and_reads_training_column_names(
    run, art
) -> None:
    """An events file with training's own-data column names (``user`` for ``user_id``): raw
    user ids mapped through the artifact's user map; a user and a segment the model does
    not know are counted in one line."""
    table = pq.read_table(run["data"] / "sequences.parquet").slice(0, 3).to_pylist()
    events = run["tmp"] / "events.csv"
    with open(events, "w") as fh:
        fh.write("user,item,timestamp,action,segment\n")
        for k, row in enumerate(table):
            user = row["raw_user_id"] if k else "ghost"  # a user the model never saw
            segment = 99 if k == 2 else row["segment"]  # a segment value it does not know
            fh.writelines(
                f"{user},{item},{ts},{act},{segment}\n"
                for item, ts, act in zip(
                    row["item_ids"][:5], row["timestamps"][:5], row["actions"][:5]
                )
            )
    out = run["tmp"] / "events_top5.csv"
    proc = _recommend(
        "--model", str(art["path"]), "--input", str(events), "--out", str(out), "--top-k", "5"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "does not know" in ln]
    want = (
        "[recommend] values the model does not know, scored with a zero embedding: "
        "user_id of 1 user, segment of 1 user"
    )
    assert lines == [want], proc.stderr
    assert len(out.read_text().splitlines()) == 1 + 3 * 5  # every user scored


# ------------------------------------------------------------------------ resume, quiet


def test_resuming_a_finished_run_says_nothing_is_left_and_stays_quiet(run) -> None:
    resumed = run["tmp"] / "resumed"
    shutil.copytree(run["run_dir"], resumed)
    cmd = [c.replace(str(run["run_dir"]), str(resumed)) for c in run["cmd"]]
    proc = _run([*cmd, "--gin-param", 'TrainerArgs.ckpt_load_dir="auto"'], warnings=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    nothing = [ln for ln in proc.stdout.splitlines() if "nothing left to train" in ln]
    assert len(nothing) == 1 and "step 20 of 20" in nothing[0] and "HR@10" in nothing[0], (
        proc.stdout
    )
    assert "final retrieval metrics" not in proc.stdout, proc.stdout
    assert "last evaluation: \n" not in proc.stdout
    # the quiet start keeps DCP's ShardedTensor FutureWarning off the console (in the run log)
    assert "FutureWarning" not in proc.stderr and "DTensor" not in proc.stderr, proc.stderr[-3000:]
    assert "Please use DTensor" in (resumed / "third_party_warnings.log").read_text()
