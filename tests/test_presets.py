"""Every gin preset in configs/: it loads and validates, its header names the command that
runs it, and the presets that need no data files (benchmark_*) train for 2 steps.

The task of a preset comes from its file name ("ranking" in the name: ranking, else retrieval).
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hstu.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.gin"))
# Presets whose data is generated in memory: cheap enough to train in the default test run.
NO_FILE_PRESETS = ["benchmark_ranking", "benchmark_retrieval"]
HEADER_LINES = 3  # the command must appear within the first lines of the file
_COMMAND = re.compile(r"^#\s+(?P<cmd>\S*(?:torchrun|python)\b.*pretrain_gr_\w+\.py.*)$")


def task_of(preset: Path) -> str:
    return "ranking" if "ranking" in preset.stem else "retrieval"


def header_command(preset: Path) -> list[str]:
    """The argv of the command written in the preset's first comment lines."""
    head = preset.read_text().splitlines()[:HEADER_LINES]
    for line in head:
        match = _COMMAND.match(line)
        if match:
            return shlex.split(match.group("cmd"))
    raise AssertionError(f"{preset.name}: no 'torchrun/python pretrain_gr_*.py' command in {head}")


pytestmark = pytest.mark.usefixtures("clean_gin")


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    for dataset in ("ml-1m", "ml-20m", "ml-100k", "kuairand-pure", "kuairand-1k", "kuairand-27k"):
        for task in ("ranking", "retrieval"):
            assert f"{dataset}_{task}" in names
    assert {"benchmark_ranking", "benchmark_retrieval", "tp2_ranking", "default_retrieval"} <= names


# What each ranking preset's dataset calls an action, from the datasets' own documentation:
# ("classes", n) for ratings, whose head ends in the n classes (cross-entropy), or
# ("bitmask", m) for m binary feedback flags, one BCE task per flag (last width == num_tasks).
ACTIONS = {
    "ml-100k": ("classes", 5),  # 1..5 stars
    "ml-1m": ("classes", 5),
    "ml-20m": ("classes", 10),  # 0.5..5.0 in half stars
    "stream": ("classes", 5),  # the ML-100K ratings as a stream
    "synthetic": ("classes", 5),  # ratings 0..4 (docs/data.md)
    "kuairand-pure": ("bitmask", 8),  # click, like, follow, ... (256 values)
    "kuairand-1k": ("bitmask", 8),
    "kuairand-27k": ("bitmask", 8),
    "benchmark": ("bitmask", 8),  # labels drawn from the action vocabulary of 256
}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads(preset):
    cfg = load_config(str(preset), task=task_of(preset))
    assert cfg.task == task_of(preset)
    if cfg.task != "ranking":
        assert cfg.retrieval is not None and cfg.ranking is None
        return
    assert cfg.ranking is not None
    assert cfg.dataset.max_num_candidates >= 1, "a ranking preset needs candidates"
    dataset = getattr(cfg.dataset, "dataset_name", "benchmark")
    assert dataset in ACTIONS, f"{preset.name}: add what {dataset}'s actions are to ACTIONS"
    kind, count = ACTIONS[dataset]
    last, num_tasks = cfg.ranking.prediction_head_arch[-1], cfg.ranking.num_tasks
    if kind == "classes":  # "auto" resolves to the class count; a width == num_tasks is BCE
        width = count if last == "auto" else last
        assert width == count and width != num_tasks, (
            f"{preset.name}: head ends in {last} with {num_tasks} task(s); {dataset} has {count} "
            "rating classes (cross-entropy over them), not bits to decode")
    else:
        assert last in ("auto", num_tasks) and 1 <= num_tasks <= count, (
            f"{preset.name}: head ends in {last} with {num_tasks} task(s); {dataset} has "
            f"{count} feedback flags, one logit per task")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_header_names_its_command(preset):
    argv = header_command(preset)
    entry = next(a for a in argv if a.endswith(".py"))
    assert entry == f"pretrain_gr_{task_of(preset)}.py", f"{preset.name}: wrong entry point {entry}"
    assert "--gin-config-file" in argv, f"{preset.name}: {argv}"
    assert argv[argv.index("--gin-config-file") + 1] == f"configs/{preset.name}"
    if "--nproc_per_node" in argv:
        nproc = int(argv[argv.index("--nproc_per_node") + 1])
        cfg = load_config(str(preset), task=task_of(preset))
        assert nproc % cfg.tp.tensor_model_parallel_size == 0, f"{preset.name}: {nproc} processes"


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_no_file_presets_train_two_steps(tmp_path):
    """Both benchmark presets, shrunk, in one plain python process each (run side by side)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    procs = {}
    for name in NO_FILE_PRESETS:
        preset = ROOT / "configs" / f"{name}.gin"
        params = [
            f'TrainerArgs.run_dir="{tmp_path / name}"',
            "TrainerArgs.max_train_iters=2",
            "TrainerArgs.max_eval_iters=1",
            "TrainerArgs.eval_interval=2",
            "TrainerArgs.log_interval=1",
            "TrainerArgs.train_batch_size=8",
            "TrainerArgs.eval_batch_size=8",
            "item/FeatureArgs.max_sequence_length=16",
        ]
        cmd = [
            sys.executable,
            str(ROOT / f"pretrain_gr_{task_of(preset)}.py"),
            "--gin-config-file",
            str(preset),
        ]
        for p in params:
            cmd += ["--gin-param", p]
        procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    outputs = {}
    for name, proc in procs.items():
        try:
            outputs[name] = proc.communicate(timeout=240)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            outputs[name] = proc.communicate()[0]
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{outputs[name][-4000:]}"
        rows = _metrics(tmp_path / name)
        train_steps = {
            int(r["step"]) for r in rows if r["split"] == "train" and r["name"] == "loss"
        }
        assert train_steps == {1, 2}, f"{name}: {rows}"
        eval_names = {r["name"] for r in rows if r["split"] == "eval"}
        expected = "AUC" if task_of(Path(name)) == "ranking" else "HR@10"
        assert expected in eval_names, f"{name}: eval metrics {eval_names}"
        assert (tmp_path / name / "operative_config.gin").is_file()
