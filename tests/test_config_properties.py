"""Property: any mutation of a preset or of --gin-params ends in a valid plan or in one error
line (exit 2), never in a traceback."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hstu import args as A
from hstu.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["debug_retrieval.gin", "debug_ranking.gin", "ml-1m_ranking.gin", "kuairand-27k_retrieval.gin",
           "benchmark_retrieval.gin", "tp2_ranking.gin"]
VALUES = ["0", "-1", "1", "3", "1e39", "-1e39", "1e-45", "0.5", "None", "True", "False", '"auto"', '"x"',
          '""', "()", "(1, 2)", '("HR@10",)', "[]", "((", "@nope", "%NOPE", "'unterminated", "1 2",
          '"float16"', '"bfloat16"', '"adam"', '"rowwise_adagrad"', '"native"', '"cutlass"', "64", "2**40"]
CLASSES = [cls.__name__ for cls in A.ARG_CLASSES]


def _fields(name: str) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(getattr(A, name))]


@st.composite
def mutated_file(draw) -> str:
    lines = (ROOT / "configs" / draw(st.sampled_from(PRESETS))).read_text().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["value", "drop", "dup", "field", "truncate", "insert"]))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        line = lines[i] if lines else ""
        if kind == "value" and "=" in line:
            lines[i] = line.split("=", 1)[0] + "= " + draw(st.sampled_from(VALUES))
        elif kind == "drop" and lines:
            del lines[i]
        elif kind == "dup" and lines:
            lines.insert(i, line)
        elif kind == "field" and "." in line.split("=", 1)[0]:
            head, _, rest = line.partition("=")
            cls = head.strip().rsplit(".", 1)[0]
            lines[i] = f"{cls}.{draw(st.text('abcdefghijklmnopqrstuvwxyz_', min_size=1, max_size=12))} ={rest}"
        elif kind == "truncate" and line:
            lines[i] = line[: draw(st.integers(0, len(line)))]
        elif kind == "insert":
            lines.insert(i, draw(st.text(max_size=30)))
    return "\n".join(lines) + "\n"


@st.composite
def gin_param(draw) -> str:
    cls = draw(st.sampled_from(CLASSES))
    field = draw(st.sampled_from(_fields(cls) + ["nope"]))
    scope = draw(st.sampled_from(["", "", "item/", "bad scope/"]))
    return f"{scope}{cls}.{field}={draw(st.sampled_from(VALUES))}"


def _check(tmp_path: Path, text: str, params: list[str], task: str) -> None:
    path = tmp_path / "mutated.gin"
    path.write_text(text)
    argv = ["--gin-config-file", str(path), "--check-config"]
    for p in params:
        argv += ["--gin-param", p]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(task, argv)  # an exception escaping here is the failure we look for
    if code == 0:
        assert "configuration OK" in out.getvalue()
    else:
        # warnings (a scoped binding nothing reads) may come first; then one error line
        lines = [ln for ln in err.getvalue().strip().splitlines() if not ln.startswith("warning: ")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err.getvalue())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated_file(), params=st.lists(gin_param(), max_size=3), task=st.sampled_from(["retrieval", "ranking"]))
@example(text="TrainerArgs.seed = Tru\n", params=[], task="retrieval")  # gin's message spanned two lines
def test_mutated_configs_end_in_a_plan_or_one_error_line(tmp_path, text, params, task):
    _check(tmp_path, text, params, task)
