"""Generative retrieval with semantic ids through the trainer (configs/ml-100k_sid_retrieval.gin
on the real MovieLens-100K): codes from u.item, training, beam-search evaluation."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_presets import header_command
from tests.training.test_e2e import _env, read_metrics

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> tuple[Path, Path]:
    """(the preprocessed dataset, its codes folder)."""
    if not (RAW / "u.data").is_file():
        pytest.skip(f"needs the real ML-100K at {RAW}")
    tmp = tmp_path_factory.mktemp("sid")
    from hstu.data.preprocess import main as preprocess
    from hstu.sid.tokenize import main as tokenize

    assert preprocess(["--dataset", "ml-100k", "--raw", str(RAW), "--out", str(tmp)]) == 0
    assert tokenize(["--items", str(RAW / "u.item"), "--text-columns",
                     "title,release_date,genres", "--levels", "2", "--codes", "64",
                     "--seed", "1", "--out", str(tmp / "sid")]) == 0
    return tmp / "ml-100k", tmp / "sid"


def _run(data: Path, codes: Path, run_dir: Path, params: list[str]) -> tuple[str, list[dict]]:
    cmd = [sys.executable, str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file",
           str(ROOT / "configs" / "ml-100k_sid_retrieval.gin")]
    for p in [f'TrainerArgs.run_dir="{run_dir}"', f'DatasetArgs.dataset_path="{data}"',
              f'NetworkArgs.sid_codes="{codes}"', *params]:
        cmd += ["--gin-param", p]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out, read_metrics(run_dir)


def _final(rows: list[dict], split: str, name: str) -> float:
    return [float(r["value"]) for r in rows if r["split"] == split and r["name"] == name][-1]


# histories cut to their last 50 items (ML-100K's average is 106) and evaluations on a fixed
# subset of 400 of the 943 users at beam 20: the preset as it is took 9 minutes here
SHORT = "DatasetArgs.max_sequence_length=50"
SUBSET = [SHORT, "RetrievalArgs.eval_num_users=400", "RetrievalArgs.sid_beam_width=20"]


@pytest.mark.slow  # two runs of the preset, shortened: ~2 min
def test_the_sid_preset_learns_to_decode_the_next_movie(ml100k, tmp_path):
    data, codes = ml100k
    short = ["TrainerArgs.max_train_iters=160", "TrainerArgs.eval_interval=160",
             "TrainerArgs.log_interval=20", "TrainerArgs.train_batch_size=128", *SUBSET]
    out, rows = _run(data, codes, tmp_path / "run", short)
    assert "400 of 943" in out, out[-3000:]  # the subset is what was evaluated
    losses = [float(r["value"]) for r in rows if r["split"] == "train" and r["name"] == "loss"]
    assert losses[-1] < losses[0] - 1.0, losses  # the summed per-level cross-entropy falls
    hr = _final(rows, "eval", "test/HR@10")
    # an untrained model (learning rate ~0, below) decodes near chance
    _, rows0 = _run(data, codes, tmp_path / "untrained",
                       [*short, "OptimizerArgs.learning_rate=1e-30",
                        "TrainerArgs.max_train_iters=2", "TrainerArgs.eval_interval=2"])
    hr0 = _final(rows0, "eval", "test/HR@10")
    print(f"trained HR@10 {hr:.4f}, untrained {hr0:.4f}, losses {losses[0]:.2f} -> {losses[-1]:.2f}")
    # chance is 10 / 1,682 = 0.006; 160 steps on histories of 50 reach ~0.06 on these 400 users
    assert hr > max(0.03, 2 * hr0), (hr, hr0)


def test_items_without_codes_are_refused_in_one_line(ml100k, tmp_path):
    """A codes file that misses some of the dataset's items: one line naming the file, how many
    and an example raw id (matched through the dataset's item map)."""
    from types import SimpleNamespace

    from hstu.args import ConfigError
    from hstu.data.semantic_ids import SidCodes, load_codes, save_codes
    from hstu.training.builder import semantic_ids

    data, codes = ml100k
    sid = load_codes(codes)
    keep = ~np.isin(sid.item_ids, [5, 17, 1682])
    save_codes(SidCodes(sid.item_ids[keep], sid.codes[keep], {**sid.config, "n_items": 1679},
                        sid.centroids),
               tmp_path / "part")
    cfg = SimpleNamespace(network=SimpleNamespace(sid_codes=str(tmp_path / "part")),
                          dataset=SimpleNamespace(resolved_path=str(data)))
    info = SimpleNamespace(num_items=1683, first_item_id=1)
    with pytest.raises(ConfigError, match=r"NetworkArgs.sid_codes: .*part: 3 of the dataset's "
                                          r"1682 items have no codes \(e.g. raw item id "):
        semantic_ids(cfg, info)
    full, num_codes = semantic_ids(
        SimpleNamespace(network=SimpleNamespace(sid_codes=str(codes)), dataset=cfg.dataset),
        info)
    assert full.shape == (1683, 3) and (full[0] == -1).all() and (full[1:] >= 0).all()
    assert num_codes[:2] == [64, 64] and num_codes[2] == int(sid.codes[:, 2].max()) + 1


@pytest.mark.slow  # a short run, its export and hstu.recommend: ~3 min
def test_the_sid_artifact_recommends_the_trainers_top_k_in_raw_ids(ml100k, tmp_path):
    """Export of a semantic-id checkpoint, read with torch alone (torchrec, megatron and gin
    blocked): for every test user, hstu.recommend's top-10 in raw ids (history of all but the
    last event) are the trainer's own beam-search top-10 of that user, mapped through the
    dataset's item map, with the same scores; its HR@10 is the trainer's test HR@10."""
    import csv
    import json
    from collections import defaultdict

    import pyarrow.parquet as pq
    import torch

    from tests.serving.test_export import recommend

    data, codes = ml100k
    run_dir, ckpt, art = tmp_path / "run", tmp_path / "ckpt", tmp_path / "art"
    _run(data, codes, run_dir, ["TrainerArgs.max_train_iters=80", "TrainerArgs.eval_interval=80",
                                "TrainerArgs.ckpt_save_interval=80",
                                "RetrievalArgs.sid_new_item_spread=0.3",
                                "RetrievalArgs.sid_exclude_history_from_loss=True",
                                "NetworkArgs.sid_decoder_ffn_multiplier=2",
                                "RetrievalArgs.sid_beam_width=20", SHORT,
                                f'TrainerArgs.ckpt_save_dir="{ckpt}"'])
    env = _env()
    for cmd in ([sys.executable, "-m", "hstu.export", "--ckpt", str(ckpt), "--out", str(art),
                 "--no-aoti"],
                [sys.executable, "-m", "tests.serving.reference", "sid", str(data), str(ckpt),
                 str(tmp_path / "ref_run"), str(tmp_path / "ref.pt"), str(codes),
                 "RetrievalArgs.sid_new_item_spread=0.3", "RetrievalArgs.sid_beam_width=20",
                 "RetrievalArgs.sid_exclude_history_from_loss=True",
                 "NetworkArgs.sid_decoder_ffn_multiplier=2", SHORT]):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["sid"]["num_codes"][:2] == [64, 64]
    assert manifest["model"]["sid"]["spread"] == 0.3  # decoded as the trainer decodes
    assert manifest["model"]["sid"]["beam_width"] == 20
    assert manifest["model"]["sid"]["renormalise"] is True  # history left out in training
    assert manifest["model"]["sid"]["decoder_ffn_multiplier"] == 2
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    out = tmp_path / "top10.csv"
    proc = recommend("--model", str(art), "--input", str(data), "--out", str(out), "--top-k", "10",
                     "--holdout-last", "1")
    m = pq.read_table(art / "item_map.parquet")
    to_raw = dict(zip(m.column("item_id").to_pylist(), m.column("raw_item_id").to_pylist()))
    raw_users = pq.read_table(data / "sequences.parquet").column("raw_user_id").to_pylist()
    got_ids, got_scores = defaultdict(list), defaultdict(list)
    with open(out) as fh:
        for row in csv.DictReader(fh):
            got_ids[row["user_id"]].append(row["item_id"])
            got_scores[row["user_id"]].append(float(row["score"]))
    assert len(got_ids) == len(ref["users"]) == 943
    for i, u in enumerate(ref["users"].tolist()):
        user = str(raw_users[u])
        assert got_ids[user] == [str(to_raw[j]) for j in ref["top_ids"][i].tolist()], user
        torch.testing.assert_close(torch.tensor(got_scores[user]), ref["top_scores"][i],
                                   rtol=0, atol=1e-4)
    hr = float(proc.stdout.split("HR@10 of the held-out items ")[1].split()[0])
    assert hr == pytest.approx(ref["metrics"]["HR@10"], abs=1e-4)


@pytest.mark.slow  # a short run of the preset: ~1 min
def test_cold_items_through_the_sid_preset(ml100k, tmp_path):
    """DatasetArgs.cold_items with the semantic-id model: the run reports cold/<metric> over
    the test targets that are cold, as many as the real ML-100K test split has."""
    from hstu.args import DatasetArgs
    from hstu.data import build_data

    data, codes = ml100k
    out, rows = _run(data, codes, tmp_path / "run",
                     ["TrainerArgs.max_train_iters=40", "TrainerArgs.eval_interval=40",
                      "DatasetArgs.cold_items=0.1"])
    assert "[hstu] cold items: 168 of 1682 items held out of training" in out
    args = DatasetArgs(dataset_name="ml-100k", max_sequence_length=200, dataset_path=str(data),
                       holdout_validation=True, cold_items=0.1)
    _, test, _ = build_data(args, "retrieval", 64, 128, 0, 1, 0, split="test",
                            holdout_validation=True)
    labels = np.concatenate([b.labels.numpy() for b in test])
    want = int(np.isin(labels, test.cold_items).sum())
    assert want > 0
    assert _final(rows, "eval", "test/cold/events") == want
    assert 0.0 <= _final(rows, "eval", "test/cold/HR@10") <= 1.0


def _before_the_run(preset: Path) -> list[list[str]]:
    """The commands of ``preset``'s header after "Before the run" up to the first line after
    them that is no command (continuation lines joined), each as an argv."""
    commands, lines, reading = [], preset.read_text().splitlines(), False
    for line in lines:
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if "Before the run" in text:
            reading = True
            continue
        if not reading:
            continue
        if commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1][:-1] + " " + text
        elif text.startswith(("torchrun ", "python ")):
            commands.append(text)
        elif commands:  # the first line after the commands ends them
            break
    return [shlex.split(c) for c in commands]


@pytest.mark.slow  # the header's three commands, shortened: ~2 min
def test_the_collab_sid_preset_header_runs_as_written(ml100k, tmp_path):
    """configs/ml-100k_sid_collab_retrieval.gin's header, run as written from a fresh working
    folder (its relative paths: runs/, tmp_data/): the dense preset, the codes of its best
    checkpoint's item table, then the preset on them. Only the step counts are shortened and
    torchrun's 2 processes made one."""
    data, _ = ml100k
    work = tmp_path / "work"
    (work / "tmp_data").mkdir(parents=True)
    for name in ("configs", "pretrain_gr_retrieval.py"):
        (work / name).symlink_to(ROOT / name)
    (work / "tmp_data" / "ml-100k").symlink_to(data)
    preset = ROOT / "configs" / "ml-100k_sid_collab_retrieval.gin"
    steps = ["TrainerArgs.max_train_iters=24", "TrainerArgs.eval_interval=12", SHORT]
    env = dict(_env(), PYTHONPATH=str(ROOT))

    def run(argv: list[str], extra: list[str]) -> str:
        if argv[0] == "torchrun":  # one plain process in place of torchrun's options
            argv = [sys.executable, *argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]]
        elif argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        for p in extra:
            argv += ["--gin-param", p]
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        assert proc.returncode == 0, (" ".join(argv), (proc.stdout + proc.stderr)[-5000:])
        return proc.stdout + proc.stderr

    before = _before_the_run(preset)
    assert [c[0] for c in before] == ["torchrun", "python"], before
    run(before[0], steps)
    assert (work / "runs" / "ml-100k-dense" / "best").is_dir()
    out = run(before[1], [])
    assert "the checkpoint's item table" in out, out[-3000:]
    from hstu.sid import load_codes

    sid = load_codes(work / "tmp_data" / "sid" / "ml-100k-collab")
    assert sid.config["source"]["kind"] == "checkpoint" and sid.config["dim"] == 50
    assert len(sid.item_ids) == 1682 and sid.codes.shape[1] == 4  # 3 levels + the collision one
    run(header_command(preset), [*steps, *SUBSET, 'TrainerArgs.run_dir="runs/collab"'])
    rows = read_metrics(work / "runs" / "collab")
    assert 0.0 <= _final(rows, "eval", "test/HR@10") <= 1.0
