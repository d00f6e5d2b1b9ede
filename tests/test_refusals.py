"""Every refusal of user input a user can reach through gin is one line naming the field,
raised by ``--check-config`` as by the run (issue 42): each case below runs the retrieval
entry point's ``main`` on the debug preset with the bindings that trigger it, and it must end
non-zero with exactly one ``error:`` line that names the gin source and the field, and no
traceback. The device and world size a refusal depends on are passed as the run would know
them (``--device``, ``--world-size``). The cases share one process (its imports paid once),
each with its own stdout and stderr; the tests below the cases run the entry script itself, as
a user does, in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESET = "configs/debug_retrieval.gin"

ITEM_TABLE = (
    'item/EmbeddingArgs.table_name = "item"',
    'item/EmbeddingArgs.feature_names = ["item_id"]',
    'item/EmbeddingArgs.sharding_type = "model_parallel"',
)
DYNAMIC_ITEM = (
    'item/DynamicEmbeddingArgs.table_name = "item"',
    'item/DynamicEmbeddingArgs.feature_names = ["item_id"]',
    "item/DynamicEmbeddingArgs.item_vocab_size_or_capacity = 800",
    "item/DynamicEmbeddingArgs.item_vocab_gpu_capacity = 400",
)
FULL_CORPUS = ('RetrievalArgs.negative_sampling = "full_corpus"',)

# (case id, gin bindings, extra arguments, the field the line must name, words it must hold)
CASES = [
    ("sparse-adam-on-cpu", ["OptimizerArgs.sparse_optimizer_str = 'adam'"], ["--device", "cpu"],
     "OptimizerArgs.sparse_optimizer_str", "no fused CPU kernel"),
    ("sparse-adamw-on-cpu", ["OptimizerArgs.sparse_optimizer_str = 'adamw'"], ["--device", "cpu"],
     "OptimizerArgs.sparse_optimizer_str", "no fused CPU kernel"),
    ("override-not-offered-on-cpu",
     [*ITEM_TABLE, 'item/EmbeddingArgs.sharding_override = "table_row_wise"'], ["--device", "cpu"],
     "EmbeddingArgs.sharding_override", "does not offer 'table_row_wise' on cpu"),
    ("full-corpus-fused-adam", [*FULL_CORPUS, "OptimizerArgs.sparse_optimizer_str = 'adam'"],
     ["--device", "cuda", "--world-size", "2"],
     "OptimizerArgs.sparse_optimizer_str", "second, zero-gradient"),
    ("full-corpus-column-wise",
     [*FULL_CORPUS, *ITEM_TABLE, 'item/EmbeddingArgs.sharding_override = "column_wise"'],
     ["--world-size", "2"], "EmbeddingArgs.sharding_override", "column-wise shard"),
    ("float16-behind-a-cache",
     [*DYNAMIC_ITEM, "item/DynamicEmbeddingArgs.caching = True", 'NetworkArgs.dtype_str = "float16"'],
     ["--device", "cuda"], "NetworkArgs.dtype_str", "UVM cache"),
    ("compile-with-tp", ["NetworkArgs.compile = True", "TensorModelParallelArgs.tensor_model_parallel_size = 2"],
     ["--world-size", "2"], "NetworkArgs.compile", "tensor_model_parallel_size=2"),
    ("tp-larger-than-world", ["TensorModelParallelArgs.tensor_model_parallel_size = 2"], [],
     "TensorModelParallelArgs.tensor_model_parallel_size", "does not divide the world size 1"),
    ("heads-over-tp", ["NetworkArgs.num_attention_heads = 3",
                       "TensorModelParallelArgs.tensor_model_parallel_size = 2"],
     ["--world-size", "2"], "NetworkArgs.num_attention_heads", "do not divide evenly"),
    ("non-causal-retrieval", ["NetworkArgs.is_causal = False"], [],
     "NetworkArgs.is_causal", "see the item it predicts"),
    ("ema-over-a-dynamic-table", [*DYNAMIC_ITEM, "TrainerArgs.ema_decay = 0.9"], [],
     "TrainerArgs.ema_decay", "dynamic table 'item'"),
    ("full-corpus-over-a-dynamic-item-table", [*DYNAMIC_ITEM, *FULL_CORPUS], [],
     "RetrievalArgs.negative_sampling", "use negative_sampling='sampled_live'"),
    ("sampled-live-over-a-static-item-table",
     [*ITEM_TABLE, 'RetrievalArgs.negative_sampling = "sampled_live"', "RetrievalArgs.num_negatives = 16"],
     [], "RetrievalArgs.negative_sampling", "item table 'item' is static"),
    ("mlp-baseline-retrieval", ['NetworkArgs.architecture = "mlp_baseline"'], [],
     "NetworkArgs.architecture", "ranking baseline"),
    ("time-budget-not-positive", ["TrainerArgs.time_budget_minutes = 0"], [],
     "TrainerArgs.time_budget_minutes", "must be > 0"),
    ("two-run-lengths", ["TrainerArgs.max_train_iters = 10", "TrainerArgs.max_train_epochs = 2"],
     [], "TrainerArgs.max_train_epochs", "one length"),
    ("best-metric-not-evaluated", ['TrainerArgs.best_metric = "AUC"'], [],
     "TrainerArgs.best_metric", "not among the evaluated metrics"),
    ("batch-past-int32-offsets", ["TrainerArgs.train_batch_size = 99999999999"], [],
     "TrainerArgs.train_batch_size", "32-bit offsets"),
    ("query-time-without-time-bias", ["NetworkArgs.rab_query_time = True"], [],
     "NetworkArgs.rab_query_time", "relative_attention_bias"),
    ("peer-mask-with-contextual", ['NetworkArgs.mask_convention = "peer"', "NetworkArgs.num_layers = 2"],
     [], "NetworkArgs.mask_convention", "contextual token"),
    ("truncation-as-deep-as-the-model", ["NetworkArgs.attn_truncation_layers = 1",
                                         "NetworkArgs.attn_truncation_len = 8"],
     [], "NetworkArgs.attn_truncation_layers", "num_layers"),
    ("padded-non-causal", ['NetworkArgs.sequence_layout = "padded"', "NetworkArgs.is_causal = False"],
     [], "NetworkArgs.sequence_layout", "is_causal=True"),
    ("table-of-an-unknown-feature",
     ['item/EmbeddingArgs.table_name = "item"', 'item/EmbeddingArgs.feature_names = ["movie"]',
      'item/EmbeddingArgs.sharding_type = "model_parallel"'],
     [], "EmbeddingArgs.feature_names", "'movie'"),
    ("admission-below-one", [*DYNAMIC_ITEM, "item/DynamicEmbeddingArgs.admit_min_count = 0"], [],
     "DynamicEmbeddingArgs.admit_min_count", "must be >= 1"),
    ("admission-on-a-static-table", [*ITEM_TABLE, "item/EmbeddingArgs.admit_min_count = 3"], [],
     "EmbeddingArgs.admit_min_count", "a field of DynamicEmbeddingArgs only"),
    ("field-typo", ["NetworkArgs.num_layer = 2"], [], "num_layer", "did you mean"),
    ("field-of-the-wrong-type", ['NetworkArgs.num_layers = "two"'], [], "NetworkArgs.num_layers",
     "expected int"),
    ("a-choice-not-offered", ['OptimizerArgs.sparse_optimizer_str = "lamb"'], [],
     "OptimizerArgs.sparse_optimizer_str", "'lamb' is not one of"),
]


def _args(bindings: list[str], extra: list[str], check: bool = True) -> list[str]:
    """The entry point's arguments: the preset, the bindings, and --check-config with ``extra``."""
    args = ["--gin-config-file", PRESET]
    for binding in bindings:
        args += ["--gin-param", binding]
    return [*args, "--check-config", *extra] if check else args


def _env(env_vars: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without a launcher's rank variables (one plain process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, **(env_vars or {})}


def _run(bindings: list[str], extra: list[str], check: bool = True,
         env_vars: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pretrain_gr_retrieval.py", *_args(bindings, extra, check)],
                          cwd=ROOT, env=_env(env_vars), capture_output=True, text=True,
                          timeout=600, check=False)


# runs each argv list read from stdin through the entry point's main in this one process and
# prints what each printed and returned; an exception is its traceback in the case's stderr
_ALL_IN_ONE = """
import contextlib, io, json, sys, traceback
from hstu.cli import main
answers = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main("retrieval", argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    answers.append({"stdout": out.getvalue(), "stderr": err.getvalue(), "returncode": code})
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def answers() -> dict[str, SimpleNamespace]:
    """Each case's stdout, stderr and return code, by case id."""
    argvs = [_args(bindings, extra) for _case, bindings, extra, _field, _words in CASES]
    proc = subprocess.run([sys.executable, "-c", _ALL_IN_ONE], input=json.dumps(argvs), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert len(got) == len(CASES), got
    return {case[0]: SimpleNamespace(**answer) for case, answer in zip(CASES, got)}


def _the_one_line(proc: subprocess.CompletedProcess | SimpleNamespace) -> str:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert "configuration OK" not in proc.stdout, proc.stdout
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, text
    assert proc.returncode != 0, text
    return errors[0]


@pytest.mark.parametrize(("case", "field", "words"),
                         [(case[0], *case[3:]) for case in CASES], ids=[case[0] for case in CASES])
def test_a_refusal_is_one_line_naming_its_field(answers, case, field, words) -> None:
    line = _the_one_line(answers[case])
    assert f"{field}:" in line or f"{field} " in line, line
    assert words in line, line
    # the gin source that set it: the preset, or the --gin-param binding
    assert PRESET in line or "--gin-param" in line, line


@pytest.mark.parametrize(("name", "value", "words"), [
    ("HSTU_PIN_RANKS", "yes", "must be 0 or 1"), ("HSTU_FEED_NICE", "low", "must be an integer"),
])
def test_a_malformed_host_setting_is_one_line(name, value, words) -> None:
    """The HSTU_* variables the run applies (hstu.training.host_settings) are read before
    --check-config answers."""
    line = _the_one_line(_run([], [], env_vars={name: value}))
    assert f"{name}={value!r}: {words}" in line, line


def test_without_the_triggering_binding_the_preset_passes() -> None:
    """The cases' refusals come from their bindings: the preset itself is accepted."""
    proc = _run([], ["--device", "cpu"])
    assert proc.returncode == 0 and "configuration OK" in proc.stdout, proc.stdout + proc.stderr


def test_the_run_refuses_what_check_config_refuses_before_it_starts() -> None:
    """The issue's example: the run itself (no --check-config) ends in the same one line,
    not in a traceback from the sharding."""
    if _cuda_here():
        pytest.skip("this host's runs use CUDA, where FBGEMM has a fused Adam")
    proc = _run(["OptimizerArgs.sparse_optimizer_str = 'adam'"], [], check=False)
    line = _the_one_line(proc)
    assert "OptimizerArgs.sparse_optimizer_str:" in line and "no fused CPU kernel" in line, line


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()
