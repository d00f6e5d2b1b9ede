"""Serving the latest model (issue 40, point 5): a versioned serving root holds complete
artifacts ``v<step>`` and a ``LATEST`` pointer; publishing writes a hidden staging folder,
renames it into place and then swaps the pointer; old versions are pruned to the newest K
(never the served one, never one a reader holds). ``hstu.recommend`` and ``load_artifact``
given the root read the version the pointer names, and never a partial one: checked with a
crash mid-publish (a real SIGKILL) and with a second process publishing in a loop while this
one reads recommendations.

The artifacts are real (a torch.export program of a random-weight HSTU retrieval model, its
tables and manifest, as ``hstu.export`` writes them); versions differ by their item table (a
permutation of the rows per version), so each version's top-k differs. The end-to-end path
from checkpoints through ``python -m hstu.export --versioned`` is the slow test at the end.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hstu.serving import versions
from hstu.serving.artifact import ArtifactError, load_artifact
from hstu.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]
NUM_ITEMS = 60
VARIANTS = 4  # version v<step> carries item-table permutation step % VARIANTS
HISTORIES = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [20, 30, 40]]


def _cfg() -> dict:
    """A one-layer retrieval model without contextual features or actions."""
    return {
        "task": "retrieval", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "head_dim": 8,
        "alpha": 0.35, "scaling_seqlen": 16, "norm_eps": 1e-5, "norm_affine": True, "uvqk_bias": True,
        "output_bias": False, "is_causal": True, "mask_convention": "hstu", "max_attn_len": 0,
        "min_full_attn_seq_len": 0, "attn_truncation_layers": 0, "attn_truncation_len": 0,
        "target_group_size": 1, "num_position_buckets": 64, "use_position_embedding": True,
        "relative_attention_bias": False, "rab_num_positions": 0, "rab_use_time": False,
        "rab_query_time": False, "num_contextual": 0, "has_action": False, "projections": {},
        "item_feature_name": "item_id", "action_feature_name": None, "contextual_feature_names": [],
        "max_item_seqlen": 16, "l2_norm_eps": 1e-6, "num_items": NUM_ITEMS, "min_item_id": 1,
        "feature_dims": {"item_id": 16},
    }


def build_base(folder: Path) -> None:
    """The parts every version shares: the dense program and weights, the item vectors."""
    from hstu.export import export_programs
    from hstu.serving.model import InferenceHSTU

    torch.manual_seed(11)
    cfg = _cfg()
    model = InferenceHSTU(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "dense_weights.pt")
    export_programs(model, cfg, folder, aoti=False, log=lambda m: None)
    torch.save(torch.randn(NUM_ITEMS, 16), folder / "vectors.pt")


def write_version(base: Path, out: Path, step: int, delay: float = 0.0) -> None:
    """An artifact of version ``step`` into ``out`` (files one by one, ``delay`` s apart, the
    manifest last, as hstu.export writes them): item-table rows permuted by ``step % VARIANTS``."""
    from hstu.training.checkpoint import describe_written_files

    out.mkdir(parents=True)
    vectors = torch.load(base / "vectors.pt", weights_only=True)
    perm = torch.randperm(NUM_ITEMS, generator=torch.Generator().manual_seed(step % VARIANTS))
    tables = {"item_id": {"ids": torch.arange(NUM_ITEMS), "vectors": vectors[perm].contiguous()}}
    torch.save(tables, out / "tables.pt")
    time.sleep(delay)
    for name in ("dense.pt2", "dense_weights.pt"):
        shutil.copyfile(base / name, out / name)
        time.sleep(delay)
    manifest = {
        "format": "hstu-artifact", "format_version": 4, "task": "retrieval",
        "checkpoint": {"path": "synthetic", "step": step},
        "dataset": {"name": "synthetic", "num_items": NUM_ITEMS, "first_item_id": 1,
                    "max_sequence_length": 16, "max_num_candidates": 0, "item_map": None, "user_map": None},
        "model": _cfg(), "contents": {"tables": "tables.pt", "weights": "dense_weights.pt", "forward": "dense.pt2"},
        "files": describe_written_files(str(out), sorted(p.name for p in out.iterdir())),
        "aoti": None,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


def top_k(art) -> tuple[list, list]:
    """The top-10 ids and scores of HISTORIES through the Python API."""
    hist = [torch.tensor(h) for h in HISTORIES]
    ts = [torch.arange(len(h)) * 100 for h in HISTORIES]
    ids, scores = art.recommend(hist, ts, k=10)
    return ids.tolist(), scores.tolist()


def _events_csv(path: Path) -> None:
    with open(path, "w") as fh:
        fh.write("user_id,item_id,timestamp\n")
        for u, h in enumerate(HISTORIES):
            fh.writelines(f"u{u},{item},{1000 + 100 * j}\n" for j, item in enumerate(h))


def recommend_cli(model: Path, events: Path, out: Path, capsys=None) -> tuple[list, str]:
    """``python -m hstu.recommend`` in this process: (output rows, stderr)."""
    from hstu.recommend import main

    rc = main(["--model", str(model), "--input", str(events), "--out", str(out), "--top-k", "10"])
    err = capsys.readouterr().err if capsys is not None else ""
    assert rc == 0, err
    with open(out) as fh:
        return [tuple(r.values()) for r in csv.DictReader(fh)], err


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("versions") / "base"
    build_base(folder)
    return folder


@pytest.fixture(scope="module")
def expected(base, tmp_path_factory) -> dict[int, tuple]:
    """Variant -> the top-10 of that version's own artifact, read as a plain artifact folder."""
    out = {}
    for variant in range(VARIANTS):
        folder = tmp_path_factory.mktemp("plain") / f"variant{variant}"
        write_version(base, folder, variant)
        with load_artifact(folder) as art:
            assert art.version is None and art.root is None  # a plain folder, as today
            out[variant] = top_k(art)
    assert len({str(v) for v in out.values()}) == VARIANTS, "the variants must give different top-10s"
    return out


def _publish(root: Path, base: Path, step: int, keep: int, logs: list | None = None) -> Path:
    return versions.publish(root, lambda staging: write_version(base, staging, step), keep=keep,
                            log=(logs.append if logs is not None else lambda m: None))


def _version_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and versions.step_of(p.name) is not None)


def test_publish_prunes_to_the_newest_k_and_readers_get_the_newest(base, expected, tmp_path) -> None:
    root = tmp_path / "serving"
    for step in (5, 10, 15, 20):
        _publish(root, base, step, keep=2)
        with load_artifact(root) as art:  # the newest, through the pointer
            assert art.version == f"v{step}" and art.root == root
            assert top_k(art) == expected[step % VARIANTS]
    assert _version_dirs(root) == ["v15", "v20"]
    assert (root / "LATEST").read_text().strip() == "v20"
    assert versions.current_version(root) == "v20"
    # the step from the staged manifest when none is given (hstu.export's checkpoint step)
    assert versions.publish(root, lambda s: write_version(base, s, 25), keep=2).name == "v25"
    assert _version_dirs(root) == ["v20", "v25"]


def test_a_version_a_reader_holds_is_not_pruned_until_released(base, expected, tmp_path) -> None:
    root = tmp_path / "serving"
    _publish(root, base, 1, keep=1)
    held = load_artifact(root)
    assert held.version == "v1"
    logs: list[str] = []
    _publish(root, base, 2, keep=1, logs=logs)
    _publish(root, base, 3, keep=1, logs=logs)
    assert _version_dirs(root) == ["v1", "v3"]  # v1 held; v2 neither held nor served
    assert any("kept v1" in line and "a reader holds it" in line for line in logs), logs
    assert top_k(held) == expected[1 % VARIANTS]  # still readable, files and all
    held.close()
    _publish(root, base, 4, keep=1)
    assert _version_dirs(root) == ["v4"]


def test_steps_already_published_or_older_than_the_served_one(base, tmp_path) -> None:
    root = tmp_path / "serving"
    _publish(root, base, 10, keep=3)
    _publish(root, base, 20, keep=3)
    before = (root / "v10" / "manifest.json").read_text()
    logs: list[str] = []
    _publish(root, base, 10, keep=3, logs=logs)  # a resumed run reaching v10 again: kept as is
    assert any("v10 is already published" in line for line in logs), logs
    assert (root / "v10" / "manifest.json").read_text() == before
    assert versions.read_pointer(root) == "v20"  # the pointer never goes back
    called = []
    with pytest.raises(versions.VersionError, match="step 15 is older than the version served"):
        versions.publish(root, called.append, step=15, keep=3)
    assert not called, "refused before anything is written"
    assert _version_dirs(root) == ["v10", "v20"]


def test_a_writer_that_fails_publishes_nothing(base, expected, tmp_path) -> None:
    root = tmp_path / "serving"
    _publish(root, base, 1, keep=3)

    def half_then_fail(staging: Path) -> None:
        write_version(base, staging, 2)
        (staging / "tables.pt").write_bytes(b"truncated")  # the manifest no longer matches

    with pytest.raises(versions.VersionError, match="tables.pt: 9 bytes"):
        versions.publish(root, half_then_fail, keep=3)
    assert _version_dirs(root) == ["v1"] and versions.read_pointer(root) == "v1"
    with load_artifact(root) as art:
        assert art.version == "v1" and top_k(art) == expected[1]


_KILLER = """
import os, signal, sys
from pathlib import Path
from hstu.serving import versions
from hstu.training import checkpoint
from tests.serving.test_versions import write_version

root, base, step, where = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if where == "writing":  # after the tables and one program, before the manifest
    def write(staging):
        write_version(base, staging, step)
        (staging / "manifest.json").unlink()
        die()
else:  # "pointer": the version renamed into place, killed while replacing LATEST
    write = lambda staging: write_version(base, staging, step)
    checkpoint.write_text_atomic = die
versions.publish(root, write, keep=3)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    return env


@pytest.mark.parametrize("where", ["writing", "pointer"])
def test_a_publisher_killed_mid_publish_leaves_the_previous_version_served(base, expected, tmp_path,
                                                                           where, capsys) -> None:
    root = tmp_path / "serving"
    _publish(root, base, 1, keep=3)
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(root), str(base), "2", where],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert versions.read_pointer(root) == "v1"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".staging-")]
    if where == "writing":
        assert _version_dirs(root) == ["v1"] and leftovers, "the partial version stays hidden"
    else:
        assert _version_dirs(root) == ["v1", "v2"] and not leftovers  # complete, not yet served
    events = tmp_path / "events.csv"
    _events_csv(events)
    with load_artifact(root) as art:
        assert art.version == "v1" and top_k(art) == expected[1]
    rows, err = recommend_cli(root, events, tmp_path / "top.csv", capsys)
    assert "[recommend] model: v1 of the versioned root" in err
    plain_rows, _ = recommend_cli(root / "v1", events, tmp_path / "plain.csv", capsys)
    assert rows == plain_rows
    # the next publish removes what the killed one left, and serves its step
    logs: list[str] = []
    _publish(root, base, 2, keep=3, logs=logs)
    assert versions.read_pointer(root) == "v2"
    assert not [p.name for p in root.iterdir() if p.name.startswith((".staging-", ".trash-"))]
    assert (where == "pointer") == any("v2 is already published" in line for line in logs), logs
    with load_artifact(root) as art:
        assert art.version == "v2" and top_k(art) == expected[2]


_PUBLISHER = """
import sys, time
from pathlib import Path
from hstu.serving import versions
from tests.serving.test_versions import write_version

root, base, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
step = 1
while not stop.exists():
    step += 1
    versions.publish(root, lambda s: write_version(base, s, step, delay=0.02), keep=2)
    print("published", step, flush=True)
    time.sleep(0.1)  # a publish interval (a training window); the reader loads in about 0.5 s
step += 1  # one more with no reader left: the root ends with exactly `keep` versions
versions.publish(root, lambda s: write_version(base, s, step), keep=2)
print("published", step, flush=True)
"""


@pytest.mark.slow  # (a stress of readers against swaps)
def test_reading_while_versions_are_swapped_never_fails_nor_reads_a_partial_version(
        base, expected, tmp_path, capsys) -> None:
    """The acceptance check: a second process publishes versions in a loop (staging written
    file by file, pointer swapped, pruned to 2) while this one reads recommendations through
    load_artifact and hstu.recommend's main; every read succeeds and equals what the version
    it read gives as a plain artifact."""
    root = tmp_path / "serving"
    _publish(root, base, 1, keep=2)
    events = tmp_path / "events.csv"
    _events_csv(events)
    cli_expected = {}
    for variant in range(VARIANTS):
        plain = tmp_path / f"plain{variant}"
        write_version(base, plain, variant)
        cli_expected[variant] = recommend_cli(plain, events, tmp_path / f"p{variant}.csv", capsys)[0]
    stop = tmp_path / "stop"
    publisher = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(root), str(base), str(stop)],
                                 cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reads = cli_reads = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(set(seen)) < 4 or reads < 12):
            assert publisher.poll() is None, publisher.communicate()[1][-3000:]
            with load_artifact(root) as art:
                step = versions.step_of(art.version)
                assert top_k(art) == expected[step % VARIANTS], f"{art.version} read wrong"
            seen.append(art.version)
            reads += 1
            if reads % 3 == 0:
                rows, err = recommend_cli(root, events, tmp_path / "top.csv", capsys)
                name = err.split("[recommend] model: ")[1].split()[0]
                assert rows == cli_expected[versions.step_of(name) % VARIANTS], f"{name} read wrong"
                seen.append(name)
                cli_reads += 1
    finally:
        stop.touch()
        out, err = publisher.communicate(timeout=120)
    assert publisher.returncode == 0, err[-3000:]
    published = [int(line.split()[1]) for line in out.splitlines() if line.startswith("published")]
    assert len(set(seen)) >= 4 and reads >= 12, f"{len(set(seen))} versions seen in {reads} reads"
    assert len(published) >= 4
    last = published[-1]
    assert versions.read_pointer(root) == f"v{last}"
    assert _version_dirs(root) == sorted([f"v{last - 1}", f"v{last}"])
    assert not [p.name for p in root.iterdir() if p.name.startswith((".staging-", ".trash-"))]
    print(f"{reads} reads ({cli_reads} through hstu.recommend's main) of {len(set(seen))} versions "
          f"while {len(published)} were published")


def test_bad_roots_are_one_line(base, tmp_path, capsys) -> None:
    from hstu.recommend import main

    events = tmp_path / "events.csv"
    _events_csv(events)
    root = tmp_path / "serving"
    root.mkdir()
    (root / "v3").mkdir()  # a version folder, no pointer: nothing complete was published
    with pytest.raises(ArtifactError, match="no complete version yet"):
        load_artifact(root)
    _publish(root, base, 4, keep=3)
    (root / "LATEST").write_text("garbage\n")
    assert main(["--model", str(root), "--input", str(events), "--out", str(tmp_path / "o.csv")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LATEST: holds 'garbage\\n', not a version name" in err[0]
    (root / "LATEST").write_text("v9\n")
    with pytest.raises(ArtifactError, match=r"names v9, which is not there"):
        load_artifact(root)
    with pytest.raises(versions.VersionError, match="a plain artifact folder"):
        _publish(root / "v4", base, 5, keep=1)
    with pytest.raises(versions.VersionError, match="keep at least 1"):
        _publish(root, base, 5, keep=0)


def test_publish_schedule() -> None:
    """The online loop's schedule (StreamArgs.publish_*): every N-th window from the stream's
    start, or once T seconds passed; refused in one line when negative."""
    from hstu.data.data_args import StreamArgs

    by_windows = StreamArgs(publish_every_windows=3)
    assert [w for w in range(10) if by_windows.publish_due(w, 0.0)] == [2, 5, 8]
    by_time = StreamArgs(publish_every_seconds=60.0)
    assert not by_time.publish_due(0, 59.9) and by_time.publish_due(0, 60.0)
    assert not StreamArgs().publishes and by_windows.publishes
    with pytest.raises(ConfigError, match="StreamArgs.publish_keep"):
        StreamArgs(publish_keep=0)
    with pytest.raises(ConfigError, match="StreamArgs.publish_every_windows"):
        StreamArgs(publish_every_windows=-1)


# ------------------------------------------------------------------ end to end, from checkpoints


@pytest.mark.slow
def test_export_versioned_from_checkpoints_and_recommend_reads_the_newest(tmp_path) -> None:
    """Trains the debug retrieval preset 20 steps (checkpoints at 10 and 20), publishes both
    with python -m hstu.export --versioned --keep 1, and reads the root with hstu.recommend:
    the same output as the plain export of the step-20 checkpoint."""
    run_dir, data = tmp_path / "run", tmp_path / "data" / "synthetic"

    def run(*cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc

    run(str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file", str(ROOT / "configs" / "debug_retrieval.gin"),
        "--gin-param", f'TrainerArgs.run_dir="{run_dir}"', "--gin-param", f'DatasetArgs.dataset_path="{data}"',
        "--gin-param", "TrainerArgs.ckpt_save_interval=10",
        "--gin-param", f'TrainerArgs.ckpt_save_dir="{run_dir / "ckpt"}"')
    root = tmp_path / "serving"
    first = run("-m", "hstu.export", "--ckpt", str(run_dir / "ckpt" / "iter_10"), "--out", str(root),
                "--versioned", "--keep", "1", "--no-aoti")
    assert f"published v10 in {root}" in first.stdout
    second = run("-m", "hstu.export", "--ckpt", str(run_dir / "ckpt"), "--out", str(root),
                 "--versioned", "--keep", "1", "--no-aoti")
    assert "published v20" in second.stdout and "removed v10 (keep=1)" in second.stdout
    assert _version_dirs(root) == ["v20"] and versions.read_pointer(root) == "v20"
    manifest = json.loads((root / "v20" / "manifest.json").read_text())
    assert manifest["checkpoint"]["step"] == 20
    plain = tmp_path / "plain20"
    run("-m", "hstu.export", "--ckpt", str(run_dir / "ckpt" / "iter_20"), "--out", str(plain), "--no-aoti")
    refused = subprocess.run([sys.executable, "-m", "hstu.export", "--ckpt", str(run_dir / "ckpt"), "--out",
                              str(root), "--no-aoti"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=600, check=False)
    assert refused.returncode == 2 and "a versioned serving root" in refused.stderr
    assert _version_dirs(root) == ["v20"], "a plain export never replaces a versioned root"
    outs = {}
    for name, model in (("root", root), ("plain", plain)):
        out = tmp_path / f"{name}.csv"
        proc = run("-m", "hstu.recommend", "--model", str(model), "--input", str(data), "--out", str(out),
                   "--holdout-last", "1")
        outs[name] = out.read_text()
        if name == "root":
            assert f"[recommend] model: v20 of the versioned root {root}" in proc.stderr
    assert outs["root"] == outs["plain"]
