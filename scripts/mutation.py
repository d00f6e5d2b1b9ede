"""Mutation score of the core modules: mutmut over each module with the tests that guard it.

    .venv/bin/python scripts/mutation.py                  # every group below
    .venv/bin/python scripts/mutation.py metrics jagged   # some groups
    .venv/bin/python scripts/mutation.py --list           # the groups, their files and tests

A mutant is a copy of one function with one small change (``<`` for ``<=``, ``1`` for ``0``, an
argument dropped, ...). It is *killed* when a test fails on it and *survives* when every test
passes. mutmut runs each mutant against the tests that called its function in this process; a
function also checked inside rank processes (``tests.dist_utils.run_multiprocess``) is not seen
there, so each survivor is run again against its group's test files that start processes (the
``MUTANT_UNDER_TEST`` environment reaches the rank processes). What still survives is either
listed in ``scripts/mutation_equivalent.txt`` with why no test can tell it from the original
(an equivalent mutant), or a gap in the tests: the script prints its diff and exits 1.

The work happens in ``.mutation/<group>/`` (git-ignored): a copy of the tree and mutmut's
``mutants/`` with its results (each run starts afresh: mutmut would keep a survivor's verdict
after the tests changed).
Runs outside the default tier (minutes per group on 2 cores); docs/testing.md "Mutation score".
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.txt"

# group -> (the module mutated, the tests that guard it (files or pytest node ids)[, its
# top-level functions and classes mutated, when not all of them])
GROUPS: dict[str, tuple] = {
    "metrics": ("hstu/model/metrics.py", ["tests/model/test_metrics.py"]),
    "jagged": (
        "hstu/ops/jagged.py",
        ["tests/ops/test_jagged.py", "tests/model/test_history_exclusion.py"],
    ),
    "masks": (
        "hstu/ops/masks.py",
        [
            "tests/ops/test_masks.py",
            "tests/ops/test_mask_conventions.py",
            "tests/ops/test_window_mask.py",
        ],
    ),
    "negatives": (
        "hstu/data/negatives.py",
        ["tests/model/test_retrieval_negatives.py", "tests/model/test_sampled_fused.py"],
    ),
    "loss_common": (
        "hstu/ops/losses/common.py",
        ["tests/model/test_full_softmax.py", "tests/model/test_sampled_fused.py"],
    ),
    "loss_full_corpus": (
        "hstu/ops/losses/full_corpus.py",
        ["tests/model/test_full_softmax.py", "tests/model/test_full_corpus_loss.py",
         "tests/model/test_history_exclusion.py"],
    ),
    "loss_sampled": (
        "hstu/ops/losses/sampled.py",
        ["tests/model/test_sampled_fused.py", "tests/model/test_sampled_loss.py",
         "tests/model/test_retrieval_negatives.py",
         *(f"tests/model/test_dynamic_retrieval.py::{t}" for t in (
             "test_sampled_live_loss_is_logits_minus_log_q_with_the_positive_left_out",
             "test_sampled_live_leaves_each_querys_history_out_of_its_negatives",
             "test_targets_not_admitted_are_neither_targets_nor_negatives",
             "test_the_model_leaves_targets_not_admitted_out_of_the_global_mean"))],
    ),
    "stream_maps": (
        "hstu/data/stream/core.py",
        [
            "tests/data/test_id_maps.py",
            "tests/data/test_stream_source.py",
            "tests/data/test_hashed_ids.py",
            "tests/data/test_stream_writers.py",
            "tests/data/test_streaming.py",
        ],
        ["StreamPosition", "Window", "_as_keys", "IdMap", "_text_keys", "HashedIds",
         "_load_map", "load_id_maps"],
    ),
    "checkpoint_manifest": (
        "hstu/training/checkpoint.py",
        ["tests/training/test_manifest.py", "tests/training/test_lifecycle.py"],
        ["_crc32", "_DigestingWriter", "describe_written_files", "step_of", "pin",
         "pinned_folders", "manifest_of", "check_files", "manifest_crc", "needed",
         "chain_problem", "row_files", "table_links", "verify", "checkpoint_folders",
         "newest_complete", "is_checkpoint_dir", "resolve_checkpoint_dir"],
    ),
}

# the default tier's tests (the slow tier's end-to-end runs are minutes per mutant)
TIER = ["-m", "not slow"]

# mutmut's states that a test caught: a failure, or a run that never finished or crashed
_CAUGHT = ("killed", "timeout", "segfault")


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return [p for p in out.split("\0") if p]


def _prepare(group: str) -> Path:
    """Copy the tree into WORK/<group> (keeping mutmut's mutants/ and results there) and write
    the mutmut section naming the group's module and tests; returns that folder."""
    work = WORK / group
    # mutmut keeps a survivor's verdict while its function is unchanged, even when the tests
    # changed: every run starts from no results
    shutil.rmtree(work / "mutants", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    for rel in _tracked_files():
        src, dst = ROOT / rel, work / rel
        if src.is_symlink() or not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copy2(src, dst)
    module, tests, *only = GROUPS[group]
    if only:
        (work / module).write_text(_only(module, only[0]))
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["hstu"]',
            f"only_mutate = {json.dumps([module])}",
            f"pytest_add_cli_args = {json.dumps(TIER)}",
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
            'also_copy = ["configs", "scripts", "docs"]',
            # torch in the test process: rank processes and forks need a clean parent
            'process_isolation = "forkserver"',
            "",
        ]
    )
    (work / "pyproject.toml").write_text(pyproject + section)
    return work


def _only(module: str, names: list[str]) -> str:
    """``module``'s source with every top-level def and class not in ``names`` between
    mutmut's ``# pragma: no mutate start`` and ``end`` lines (the copy mutmut mutates)."""
    lines = (ROOT / module).read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    unknown = set(names) - {n.name for n in tree.body if isinstance(n, defs)}
    if unknown:
        raise SystemExit(f"mutation: {module} has no top-level {sorted(unknown)}")
    for node in reversed(tree.body):
        if isinstance(node, defs) and node.name not in names:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines.insert(node.end_lineno, "# pragma: no mutate end")
            lines.insert(first - 1, "# pragma: no mutate start")
    return "\n".join(lines) + "\n"


def _mutmut(work: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH="")
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=work,
        env=env,
        text=True,
        capture_output=capture,
        check=False,
    )


def _results(work: Path, module: str) -> dict[str, int]:
    meta = work / "mutants" / (module + ".meta")
    if not meta.exists():
        raise SystemExit(f"mutation: no results for {module} ({meta} missing: did mutmut run?)")
    return json.loads(meta.read_text())["exit_code_by_key"]


def _equivalents() -> dict[str, tuple[str, str]]:
    """name -> (the changed line as the mutant has it, why no test can tell it apart)."""
    out: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(EQUIVALENT.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(" || ")]
        if len(parts) != 3:
            raise SystemExit(f"{EQUIVALENT}:{number}: expected 'mutant || changed line || why'")
        out[parts[0]] = (parts[1], parts[2])
    return out


def _diff(work: Path, name: str) -> str:
    shown = _mutmut(work, "show", name, capture=True).stdout
    return "\n".join(
        line
        for line in shown.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )


def _process_tests(tests: list[str]) -> list[str]:
    """The test files of ``tests`` that run code in other processes (rank processes, a
    subprocess), which mutmut's per-test tracing does not see: the second pass runs these."""
    marks = ("run_multiprocess", "subprocess")
    return [t for t in tests if any(m in (ROOT / t.split("::")[0]).read_text() for m in marks)]


def _second_pass(work: Path, name: str | None, tests: list[str]) -> bool:
    """True when ``tests`` fail on mutant ``name`` (None: on the original
    code, which must pass for a failure to count as a kill)."""
    env = {k: v for k, v in os.environ.items() if k != "MUTANT_UNDER_TEST"}
    env["PYTHONPATH"] = ""
    if name is not None:
        env["MUTANT_UNDER_TEST"] = name
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TIER, *tests],
        cwd=work / "mutants",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return run.returncode != 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", help=f"groups to run (default all: {list(GROUPS)})")
    parser.add_argument("--list", action="store_true", help="print the groups and stop")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutmut workers")
    parser.add_argument("--report", action="store_true",
                        help="no new mutmut run: classify the results of the last one again "
                             "(after editing the equivalents file)")
    args = parser.parse_args()
    if args.list:
        for name, (module, tests, *only) in GROUPS.items():
            part = f" ({', '.join(only[0])})" if only else ""
            print(f"{name}: {module}{part} <- {', '.join(tests)}")
        return 0
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"mutation: unknown group(s) {unknown}; groups: {list(GROUPS)}")
    groups = args.groups or list(GROUPS)
    try:
        from mutmut.stats import status_by_exit_code
    except ImportError as err:
        raise SystemExit(f"mutation: mutmut is not importable ({err}): .venv/bin/pip install mutmut")
    equivalent = _equivalents()
    rows, gaps, stale = [], [], []
    for group in groups:
        module, tests = GROUPS[group][:2]
        if args.report:
            work = WORK / group
        else:
            work = _prepare(group)
            run = _mutmut(work, "run", "--max-children", str(args.jobs))
            if run.returncode != 0:
                raise SystemExit(f"mutation: mutmut run of {group} exited {run.returncode}")
        counts = {"mutants": 0, "killed": 0, "second pass": 0, "equivalent": 0, "survived": 0}
        others = _process_tests(tests)
        if others and _second_pass(work, None, others):
            raise SystemExit(f"mutation: {group}'s tests fail on the original code in {work}")
        for name, code in sorted(_results(work, module).items()):
            counts["mutants"] += 1
            status = status_by_exit_code[code]
            if status in _CAUGHT:
                counts["killed"] += 1
                continue
            if others and _second_pass(work, name, others):
                counts["second pass"] += 1
                continue
            if name in equivalent:
                changed, _why = equivalent[name]
                if changed in _diff(work, name):
                    counts["equivalent"] += 1
                    continue
                stale.append(f"{name}: the listed line {changed!r} is no longer its change")
            counts["survived"] += 1
            gaps.append(f"{name} ({status}):\n{_diff(work, name)}")
        rows.append((group, module, counts))
    print("\n| group | module | mutants | killed | killed (second pass) | equivalent | survived |")
    print("|---|---|---|---|---|---|---|")
    for group, module, c in rows:
        print(
            f"| {group} | {module} | {c['mutants']} | {c['killed']} | {c['second pass']} | "
            f"{c['equivalent']} | {c['survived']} |"
        )
    for line in stale:
        print(f"stale equivalent: {line}")
    for gap in gaps:
        print(f"\nsurvived: {gap}")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
