"""`python -m hstu.gpu_check`: the dry run on this host, its plan and JSON as documented, and
the dense block importable without the sparse-side packages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
