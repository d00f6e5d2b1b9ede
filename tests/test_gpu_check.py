"""`python -m hstu.gpu_check`: the dry run on this host, its plan and JSON as documented, and
the dense block importable without the sparse-side packages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hstu import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "hstu.gpu_check"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )


def test_dry_run_lists_every_check_and_writes_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    done = _run("--dry-run", "--json", str(out))
    assert done.returncode == 0, done.stderr
    for name in gpu_check.CHECKS:
        assert re.search(rf"^{name}\s+\|.*\| planned$", done.stdout, re.MULTILINE), name
    assert "tests/ops/test_gpu_kernels.py" in done.stdout
    stepped = re.search(r"^trainer_steps would step \(on 1 GPU, memory permitting\): (.*)$",
                        done.stdout, re.MULTILINE)
    assert stepped and stepped.group(1).split()[:2] == ["debug_ranking", "debug_retrieval"]
    assert re.search(r"^trainer_steps would skip tp2_ranking: needs 2 GPUs", done.stdout,
                     re.MULTILINE)
    plan = json.loads(out.read_text())
    assert tuple(plan) == gpu_check.RESULT_KEYS
    assert plan["schema"] == gpu_check.SCHEMA and plan["dry_run"] is True
    assert [c["name"] for c in plan["checks"]] == list(gpu_check.CHECKS)
    assert all(tuple(c) == gpu_check.CHECK_KEYS for c in plan["checks"])
    assert {c["status"] for c in plan["checks"]} == {"planned"}


def test_docs_list_the_same_checks_and_json_fields() -> None:
    text = (ROOT / "docs" / "kernels.md").read_text()
    section = text.split("## GPU check", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)
    assert documented == list(gpu_check.CHECKS)
    for key in (*gpu_check.RESULT_KEYS, *gpu_check.CHECK_KEYS, *gpu_check.ROW_KEYS):
        assert f"`{key}`" in section, key
    assert gpu_check.SCHEMA in section
    assert "Measured" in section


PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.gin"))
# the presets whose data is made on the spot (synthetic, in-memory benchmark batches)
NEED_NO_FILES = {"debug_ranking", "debug_retrieval", "default_retrieval",
                 "long_synthetic_retrieval", "benchmark_ranking", "benchmark_retrieval"}


def test_trainer_steps_selects_every_preset_that_fits(tmp_path: Path) -> None:
    """Every preset of configs/ has a verdict: stepped, or skipped with why (its GPUs, its
    data); the debug ones come first; data put in place or a second GPU turns a skip into a
    step."""
    from hstu.data.layout import METADATA_FILE

    assert gpu_check.METADATA_FILE == METADATA_FILE
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # a root with no tmp_data/
    plans = gpu_check.trainer_presets(tmp_path, num_gpus=1)
    assert sorted(p.preset for p in plans) == PRESETS
    assert [p.preset for p in plans][:2] == ["debug_ranking", "debug_retrieval"]
    by_name = {p.preset: p for p in plans}
    assert {p.preset for p in plans if p.skip is None} == NEED_NO_FILES
    assert by_name["tp2_ranking"].skip == (
        "needs 2 GPUs (TensorModelParallelArgs.tensor_model_parallel_size=2); this machine has 1")
    assert by_name["ml-1m_retrieval"].skip == (
        "its data is not on this machine (tmp_data/ml-1m/metadata.json): "
        "python -m hstu.data.preprocess --dataset ml-1m")
    assert by_name["ml-100k_stream_ranking"].skip.startswith("an online-training preset")
    # a preset that includes another reads the dataset it names
    assert by_name["ml-100k_sid_collab_retrieval"].skip == (
        "its data is not on this machine (tmp_data/ml-100k/metadata.json): "
        "python -m hstu.data.preprocess --dataset ml-100k")
    assert by_name["debug_ranking"].params == (
        'DatasetArgs.dataset_path="{workdir}/data/debug_ranking"',)
    assert by_name["benchmark_ranking"].params == ()
    assert {p.task for p in plans if "ranking" in p.preset} == {"ranking"}
    (tmp_path / "tmp_data" / "ml-1m").mkdir(parents=True)
    (tmp_path / "tmp_data" / "ml-1m" / METADATA_FILE).write_text("{}")
    by_name = {p.preset: p for p in gpu_check.trainer_presets(tmp_path, num_gpus=2)}
    assert by_name["ml-1m_retrieval"].skip is None and by_name["tp2_ranking"].skip is None
    assert by_name["ml-20m_retrieval"].skip is not None


def test_trainer_steps_rows_say_what_happened_to_each_preset(monkeypatch) -> None:
    """The check's rows, with each preset's process stood in for: a step passes, an
    out-of-memory exit is a skip naming the GPU, an error fails with its last line, a skipped
    preset says why, and a spent budget skips the rest."""
    plans = [
        gpu_check.PresetPlan("fits", "retrieval"),
        gpu_check.PresetPlan("too_big", "ranking"),
        gpu_check.PresetPlan("broken", "ranking"),
        gpu_check.PresetPlan("no_data", "ranking", skip="its data is not on this machine"),
        gpu_check.PresetPlan("late", "retrieval"),
    ]
    outcomes = {
        "fits": (0, "one step, no host sync; loss 1.5\n", ""),
        "too_big": (gpu_check.OUT_OF_MEMORY_EXIT, "",
                    "does not fit this GPU (79 GiB): OutOfMemoryError: CUDA out of memory\n"),
        "broken": (1, "", "Traceback ...\nRuntimeError: a host sync\n"),
    }
    clock = iter([0.0, 1.0, 2.0, 3.0, 1000.0])

    def fake_run(command, **kwargs):
        preset = next(name for name in outcomes if repr(name) in command[-1])
        code, out, err = outcomes[preset]
        return subprocess.CompletedProcess(command, code, out, err)

    monkeypatch.setattr(gpu_check, "_module_present", lambda name: True)
    monkeypatch.setattr(gpu_check, "trainer_presets", lambda root, num_gpus: plans)
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    result = gpu_check.CheckResult("trainer_steps", "")
    gpu_check.check_trainer_steps(result, deadline=100.0)
    assert [(r["case"], r["result"], r["status"]) for r in result.rows] == [
        ("fits", "one step, no host sync; loss 1.5", "pass"),
        ("too_big", ("skipped: does not fit this GPU (79 GiB): OutOfMemoryError: CUDA out "
                     "of memory"), "skip"),
        ("broken", "RuntimeError: a host sync", "fail"),
        ("no_data", "skipped: its data is not on this machine", "skip"),
        ("late", "skipped: the time budget is spent (-900 s left)", "skip"),
    ]
    assert result.summary == "host sync or error in broken"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU host")
def test_without_cuda_it_says_so_in_one_line() -> None:
    done = _run("--json", os.devnull)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "hstu.gpu_check: no CUDA device here; use --dry-run to list the checks"
    ]


LIGHT_IMPORT = """
import sys
sys.modules["torchrec"] = None  # as on a bare GPU host: `import torchrec` fails
sys.modules["megatron"] = None
import torch
from hstu import gpu_check
block_cls = gpu_check.import_dense_block()
block = block_cls(2, 32, 2, 16, kernel_backend="pytorch")
x = torch.randn(7, 32)
out = block(x, torch.tensor([0, 3, 7]), 4)
out.square().mean().backward()
print(tuple(out.shape), "torchrec" in sys.modules and sys.modules["torchrec"] is not None)
"""


def test_dense_block_imports_without_torchrec_and_megatron() -> None:
    done = _run(code=LIGHT_IMPORT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "(7, 32) False"


MISSING_DEPENDENCY = """
import sys
sys.modules["torchrec"] = None
sys.modules["hstu.ops.jagged"] = None  # stands for a module the block itself imports
from hstu import gpu_check
try:
    gpu_check.import_dense_block()
except gpu_check.SkipPart as exc:
    print(exc)
"""


def test_a_missing_block_dependency_is_one_skip_line() -> None:
    done = _run(code=MISSING_DEPENDENCY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "the dense HSTU block needs hstu.ops.jagged, absent here; carry its wheel "
        "(docs/kernels.md, 'GPU check')"
    )


def test_only_runs_the_checks_it_names_and_refuses_unknown_ones() -> None:
    done = _run("--dry-run", "--only", "environment,kernels_vs_reference")
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^([a-z_]+)\s+\|.*\| planned$", done.stdout, re.MULTILINE)
    assert listed == ["environment", "kernels_vs_reference"]
    assert "dry run: 2 checks listed" in done.stdout
    done = _run("--dry-run", "--only", "environment,kernel_speed")
    assert done.returncode == 2
    assert "--only: unknown check kernel_speed; the checks are environment, pytest_gpu" in (
        done.stderr
    )
