"""Issue 14 end to end: a newcomer's JSON-lines and CSV files go from raw to a trained debug
model with the documented commands and no code; a clean run's console holds our lines only
(third-party warnings are in the run directory's log); a bad config's last console line under
torchrun is the one-line error; the run directory holds report.html with the curves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# what third-party warnings look like on a console (python warnings, logging, torch's logs)
THIRD_PARTY = re.compile(r"Warning|WARNING|warnings\.warn|^\[rank\d+\]:[WE]\d{4}|site-packages")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # torchrun warns about it otherwise (the launcher's own line)
    env.pop("PYTHONWARNINGS", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    # stderr merged into stdout, as a terminal shows them
    return subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)


def _train(task: str, name: str, data_dir: Path, run_dir: Path, *params: str, nproc: int | None = None):
    entry = [str(ROOT / f"pretrain_gr_{task}.py"), "--gin-config-file", str(ROOT / "configs" / f"debug_{task}.gin")]
    for p in (f'DatasetArgs.dataset_name="{name}"', f'DatasetArgs.dataset_path="{data_dir}"',
              f'TrainerArgs.run_dir="{run_dir}"', "TrainerArgs.max_train_iters=6",
              "TrainerArgs.eval_interval=3", "TrainerArgs.log_interval=3", *params):
        entry += ["--gin-param", p]
    cmd = [sys.executable, *entry] if nproc is None else [*TORCHRUN, "--nproc_per_node", str(nproc), *entry]
    return _run(cmd)


def _rows(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_json_lines_string_ids_float_ratings_raw_to_trained_ranking(tmp_path):
    # an Amazon-reviews-like file: string ids, half-star ratings, fields we do not use
    lines = []
    for u in range(48):
        for k in range(10):
            item = f"B{(u * 7 + k * 3) % 40:04d}"
            lines.append(json.dumps({"reviewerID": f"A{u:03d}X", "asin": item,
                                     "overall": [1.0, 2.5, 3.0, 4.5, 5.0][(u + k) % 5],
                                     "unixReviewTime": 1_600_000_000 + 86400 * k, "summary": "ok"}))
    (tmp_path / "reviews.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "reviews.gin").write_text(
        'CustomDataArgs.user_column = "reviewerID"\nCustomDataArgs.item_column = "asin"\n'
        'CustomDataArgs.timestamp_column = "unixReviewTime"\nCustomDataArgs.action_column = "overall"\n')
    prep = _run([sys.executable, "-m", "hstu.data.preprocess", "--dataset", "custom", "--raw",
                 str(tmp_path / "reviews.jsonl"), "--name", "reviews", "--gin-file",
                 str(tmp_path / "reviews.gin"), "--out", str(tmp_path / "tmp_data")])
    assert prep.returncode == 0, prep.stdout
    meta = json.loads((tmp_path / "tmp_data" / "reviews" / "metadata.json").read_text())
    assert meta["num_action_values"] == 5 and meta["num_items"] == 41
    run = _train("ranking", "reviews", tmp_path / "tmp_data" / "reviews", tmp_path / "run")
    assert run.returncode == 0, run.stdout[-4000:]
    # every day-resolution timestamp differs per user here: no tie warning; sizes from the data
    assert "[hstu] ranking on reviews:" in run.stdout and "41 items" in run.stdout
    rows = _rows(tmp_path / "run")
    assert any(r["split"] == "eval" and r["name"] == "AUC" for r in rows)
    assert {r["name"] for r in rows if r["split"] == "baseline"} == {
        "loss", "AUC", "per_item/loss", "per_item/AUC"}


def test_csv_string_ids_raw_to_trained_retrieval(tmp_path):
    lines = ["user_id,item_id,timestamp"]
    for u in range(40):
        for k in range(12):
            lines.append(f"user-{u},sku-{(u + k * k) % 30},{1000 * u + k // 2}")  # pairs tie in time
    (tmp_path / "clicks.csv").write_text("\n".join(lines) + "\n")
    prep = _run([sys.executable, "-m", "hstu.data.preprocess", "--dataset", "custom", "--raw",
                 str(tmp_path / "clicks.csv"), "--name", "clicks", "--out", str(tmp_path / "tmp_data")])
    assert prep.returncode == 0, prep.stdout
    run = _train("retrieval", "clicks", tmp_path / "tmp_data" / "clicks", tmp_path / "run")
    assert run.returncode == 0, run.stdout[-4000:]
    assert "[hstu] retrieval on clicks:" in run.stdout
    # the last two of each user's 12 clicks share a timestamp: the split's tie is reported
    assert "[hstu] warning: 40 of 40 evaluation items share their timestamp" in run.stdout
    rows = _rows(tmp_path / "run")
    assert {r["name"] for r in rows if r["split"] == "baseline"} == {"HR@10", "NDCG@10", "MRR"}


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def clean_torchrun(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("console")
    run = _train("retrieval", "synthetic", tmp / "data" / "synthetic", tmp / "run", nproc=2)
    return run, tmp / "run"


def test_clean_torchrun_console_has_no_third_party_warnings(clean_torchrun):
    run, run_dir = clean_torchrun
    assert run.returncode == 0, run.stdout[-4000:]
    noisy = [line for line in run.stdout.splitlines() if THIRD_PARTY.search(line)]
    assert noisy == [], "\n".join(noisy)
    kept = (run_dir / "third_party_warnings.log").read_text()
    assert "topology was constructed directly" in kept
    # a run without tensor parallelism never imports megatron-core, nor gets its warning
    assert "Transformer Engine and Apex" not in kept
    assert "[hstu] summary of this retrieval run" in run.stdout


def test_report_has_the_curves(clean_torchrun):
    run, run_dir = clean_torchrun
    assert run.returncode == 0, run.stdout[-4000:]
    parser = _Images()
    parser.feed((run_dir / "report.html").read_text())
    assert {"curve_loss.png", "curve_HR_10.png", "curve_NDCG_10.png", "curve_MRR.png"} <= set(parser.sources)
    for src in parser.sources:
        assert (run_dir / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert "popularity" in run.stdout and "report.html" in run.stdout


def test_bad_config_under_torchrun_ends_with_the_one_line_error(tmp_path):
    run = _train("retrieval", "synthetic", tmp_path / "data" / "synthetic", tmp_path / "run",
                 "RetrievalArgs.temperature=-1", nproc=2)
    assert run.returncode != 0
    last = run.stdout.rstrip().splitlines()[-1]
    assert last == ("error: --gin-param 'RetrievalArgs.temperature=-1': RetrievalArgs.temperature: "
                    "must be > 0, got -1.0"), run.stdout[-3000:]
    assert "ChildFailedError" in run.stdout  # the launcher's report comes before it
