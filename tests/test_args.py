"""The gin argument classes: binding, documented defaults, errors, HBM sizing."""

from __future__ import annotations

import dataclasses
import re
import textwrap

import gin
import pytest

from hstu import args as A
from hstu.config import load_config
from hstu.data.data_args import DATA_ARG_CLASSES

# The reference interface's defaults (issue "Foundation"), written out independently of the code.
DOCUMENTED_DEFAULTS = {
    "TrainerArgs": {
        "eval_interval": 100, "log_interval": 100, "max_train_iters": None, "max_eval_iters": None,
        "seed": 1234, "profile": False, "profile_step_start": 100, "profile_step_end": 200,
        "ckpt_save_interval": -1, "ckpt_save_dir": None, "ckpt_load_dir": "",
        "pipeline_type": "native",
    },
    "EmbeddingArgs": {},
    "DynamicEmbeddingArgs": {
        "global_hbm_for_values": None, "item_vocab_gpu_capacity": None,
        "item_vocab_gpu_capacity_ratio": None, "evict_strategy": "lru", "caching": False,
        "sharding_type": "model_parallel",
    },
    "DatasetArgs": {"dataset_path": None, "max_num_candidates": 0, "shuffle": False},
    "FeatureArgs": {"is_jagged": False},
    "BenchmarkDatasetArgs": {"action_feature_name": None, "max_num_candidates": 0},
    "NetworkArgs": {
        "hidden_dropout": 0.2, "norm_epsilon": 1e-5, "is_causal": True, "dtype_str": "bfloat16",
        "kernel_backend": "cutlass", "target_group_size": 1, "num_position_buckets": 8192,
        "recompute_input_layernorm": False, "recompute_input_silu": False,
        "item_embedding_dim": -1, "contextual_embedding_dim": -1,
    },
    "OptimizerArgs": {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8},
    "TensorModelParallelArgs": {"tensor_model_parallel_size": 1},
    "RankingArgs": {
        "prediction_head_act_type": "relu", "prediction_head_bias": True, "num_tasks": 1,
        "eval_metrics": ("AUC",),
    },
    "RetrievalArgs": {
        "num_negatives": -1, "temperature": 0.05, "l2_norm_eps": 1e-6, "eval_metrics": ("HR@10", "NDCG@10"),
    },
}

REQUIRED_BINDINGS = {
    "TrainerArgs": "TrainerArgs.train_batch_size = 8\nTrainerArgs.eval_batch_size = 16",
    "EmbeddingArgs": (
        "EmbeddingArgs.feature_names = ['item']\nEmbeddingArgs.table_name = 'item'\n"
        "EmbeddingArgs.item_vocab_size_or_capacity = 100\n"
        "EmbeddingArgs.sharding_type = 'data_parallel'"
    ),
    "DynamicEmbeddingArgs": (
        "DynamicEmbeddingArgs.feature_names = ['item']\nDynamicEmbeddingArgs.table_name = 'item'\n"
        "DynamicEmbeddingArgs.item_vocab_size_or_capacity = 100"
    ),
    "DatasetArgs": "DatasetArgs.dataset_name = 'ml-1m'\nDatasetArgs.max_sequence_length = 200",
    "FeatureArgs": "FeatureArgs.feature_names = ['item']\nFeatureArgs.max_sequence_length = 10",
    "BenchmarkDatasetArgs": (
        "item/FeatureArgs.feature_names = ['item']\nitem/FeatureArgs.max_sequence_length = 10\n"
        "item/EmbeddingArgs.feature_names = ['item']\nitem/EmbeddingArgs.table_name = 'item'\n"
        "item/EmbeddingArgs.item_vocab_size_or_capacity = 100\n"
        "item/EmbeddingArgs.sharding_type = 'model_parallel'\n"
        "BenchmarkDatasetArgs.feature_args = [@item/FeatureArgs()]\n"
        "BenchmarkDatasetArgs.embedding_args = [@item/EmbeddingArgs()]\n"
        "BenchmarkDatasetArgs.item_feature_name = 'item'\n"
        "BenchmarkDatasetArgs.contextual_feature_names = []"
    ),
    "NetworkArgs": (
        "NetworkArgs.num_layers = 2\nNetworkArgs.hidden_size = 32\n"
        "NetworkArgs.num_attention_heads = 4\nNetworkArgs.kv_channels = 8"
    ),
    "OptimizerArgs": "OptimizerArgs.optimizer_str = 'adam'\nOptimizerArgs.learning_rate = 0.001",
    "TensorModelParallelArgs": "",
    "RankingArgs": "RankingArgs.prediction_head_arch = [64, 1]",
    "RetrievalArgs": "",
}


pytestmark = pytest.mark.usefixtures("clean_gin")


@pytest.mark.parametrize("cls", A.ARG_CLASSES, ids=lambda c: c.__name__)
def test_binds_from_gin_with_documented_defaults(cls):
    gin.parse_config(REQUIRED_BINDINGS[cls.__name__])
    obj = cls()
    for name, expected in DOCUMENTED_DEFAULTS[cls.__name__].items():
        assert getattr(obj, name) == expected, f"{cls.__name__}.{name}"
    # every field bound from gin reached the object
    for line in REQUIRED_BINDINGS[cls.__name__].splitlines():
        key, value = (s.strip() for s in line.split("=", 1))
        scope_cls, field_name = key.rsplit(".", 1)
        if "/" not in scope_cls and not value.startswith("[@"):
            assert getattr(obj, field_name) == eval(value), key


@pytest.mark.parametrize("cls", [*A.ARG_CLASSES, *DATA_ARG_CLASSES], ids=lambda c: c.__name__)
def test_every_field_has_a_one_line_docstring(cls):
    docs = A.field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        assert "\n" not in docs[f.name]


def test_gin_reference_is_up_to_date():
    from hstu.docs_gen import main

    assert main(["--check"]) == 0, "docs/gin_reference.md is stale: python -m hstu.docs_gen"


# --------------------------------------------------------------------------- bad input

BASE = """
TrainerArgs.train_batch_size = 8
TrainerArgs.eval_batch_size = 8
DatasetArgs.dataset_name = "synthetic"
DatasetArgs.max_sequence_length = 16
NetworkArgs.num_layers = 1
NetworkArgs.hidden_size = 16
NetworkArgs.num_attention_heads = 2
NetworkArgs.kv_channels = 8
OptimizerArgs.optimizer_str = "adam"
OptimizerArgs.learning_rate = 0.001
"""


def _write(tmp_path, text, name="run.gin"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_base_config_loads(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.trainer.train_batch_size == 8 and cfg.retrieval is not None and cfg.ranking is None


@pytest.mark.parametrize(
    "extra, pattern",
    [
        ("TrainerArg.seed = 3", r"run\.gin:\d+: TrainerArg: unknown gin class \(did you mean 'TrainerArgs'\?\)"),
        ("TrainerArgs.sed = 3", r"run\.gin:\d+: TrainerArgs\.sed: unknown field \(did you mean 'seed'\?\)"),
        ('TrainerArgs.pipeline_type = "fast"', r"run\.gin:\d+: TrainerArgs\.pipeline_type: 'fast' is not one of 'none' \| 'native' \| 'prefetch'"),
        ('NetworkArgs.kernel_backend = "cuda"', r"run\.gin:\d+: NetworkArgs\.kernel_backend: 'cuda' is not one of"),
        ('TrainerArgs.seed = "7"', r"run\.gin:\d+: TrainerArgs\.seed: expected int, got str '7'"),
        ("NetworkArgs.hidden_size = 16.5", r"run\.gin:\d+: NetworkArgs\.hidden_size: 16\.5 is not one of int \| 'auto'"),
        ("NetworkArgs.hidden_size = -16", r"run\.gin:\d+: NetworkArgs\.hidden_size: must be > 0, got -16"),
        ("TrainerArgs.train_batch_size = 0", r"run\.gin:\d+: TrainerArgs\.train_batch_size: must be > 0"),
        ("DatasetArgs.max_num_candidates = -1", r"run\.gin:\d+: DatasetArgs\.max_num_candidates: must be >= 0"),
        ("TrainerArgs.max_train_iters = 0", r"run\.gin:\d+: TrainerArgs\.max_train_iters: must be >= 1"),
        ('DatasetArgs.dataset_name = "ml-1n"', r"run\.gin:\d+: DatasetArgs\.dataset_name: 'ml-1n' is not one of .*\(did you mean 'ml-1m'\?\)"),
        ("RetrievalArgs.eval_metrics = ('HR@0',)", r"RetrievalArgs\.eval_metrics: 'HR@0' is not HR@K, NDCG@K or MRR"),
        (
            "NetworkArgs.num_attention_heads = 3\nTensorModelParallelArgs.tensor_model_parallel_size = 2",
            r"run\.gin:\d+: NetworkArgs\.num_attention_heads: 3 heads do not divide evenly over TensorModelParallelArgs\.tensor_model_parallel_size=2",
        ),
        (
            ("item/EmbeddingArgs.feature_names = ['item']\nitem/EmbeddingArgs.table_name = 'item'\n"
            "item/EmbeddingArgs.item_vocab_size_or_capacity = 10\n"
            "item/EmbeddingArgs.sharding_type = 'data_parallel'\n"
            "item2/DynamicEmbeddingArgs.feature_names = ['item2']\n"
            "item2/DynamicEmbeddingArgs.table_name = 'item'\n"
            "item2/DynamicEmbeddingArgs.item_vocab_size_or_capacity = 10"),
            r"run\.gin:\d+: DynamicEmbeddingArgs\.table_name: table 'item' is declared both static \(EmbeddingArgs\) and dynamic",
        ),
        (
            ("item/EmbeddingArgs.feature_names = ['item']\nitem/EmbeddingArgs.table_name = 'item'\n"
            "item/EmbeddingArgs.item_vocab_size_or_capacity = 10"),
            r"run\.gin: EmbeddingArgs\.sharding_type: required field is not set",
        ),
        (
            ("item/DynamicEmbeddingArgs.feature_names = ['item']\n"
            "item/DynamicEmbeddingArgs.table_name = 'item'\n"
            "item/DynamicEmbeddingArgs.item_vocab_size_or_capacity = 10\n"
            "item/DynamicEmbeddingArgs.sharding_type = 'data_parallel'"),
            r"run\.gin:\d+: DynamicEmbeddingArgs\.sharding_type: dynamic tables are always model_parallel",
        ),
        ("TrainerArgs.eval_batch_size = [8", r"run\.gin: gin: cannot parse"),
        (
            "NetworkArgs.is_causal = False\nNetworkArgs.sequence_layout = 'padded'",
            r"run\.gin:\d+: NetworkArgs\.sequence_layout: \"padded\" needs is_causal=True",
        ),
        ("NetworkArgs.sequence_layout = 'dense'", r"run\.gin:\d+: NetworkArgs\.sequence_layout"),
        (
            "RetrievalArgs.full_corpus_matmul_dtype = 'bfloat16'",
            r"run\.gin:\d+: RetrievalArgs\.full_corpus_matmul_dtype: applies to negative_sampling='full_corpus' only",
        ),
        ("RetrievalArgs.full_corpus_matmul_dtype = 'float16'", r"run\.gin:\d+: RetrievalArgs\.full_corpus_matmul_dtype"),
        (
            "TrainerArgs.best_requires_loss_below_prior = True",
            r"run\.gin:\d+: TrainerArgs\.best_requires_loss_below_prior: needs TrainerArgs\.best_metric",
        ),
        (
            ("TrainerArgs.best_requires_loss_below_prior = True\nTrainerArgs.best_metric = 'MRR'\n"
             "DatasetArgs.holdout_validation = True"),
            r"run\.gin:\d+: TrainerArgs\.best_requires_loss_below_prior: is for ranking .*this is a retrieval run",
        ),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, extra, pattern):
    path = _write(tmp_path, BASE + extra + "\n")
    with pytest.raises(A.ConfigError, match=pattern) as info:
        load_config(path)
    assert "\n" not in str(info.value)


RANKING = "RankingArgs.prediction_head_arch = [8, 5]\n"


@pytest.mark.parametrize(
    "task, extra, pattern",
    [
        (
            "retrieval",
            "NetworkArgs.is_causal = False\n",
            (
                r"NetworkArgs\.is_causal: retrieval trains next-item prediction from every "
                r"history position, and non-causal attention lets each position see the item it "
                r"predicts"
            ),
        ),
        (
            "ranking",
            RANKING + "RankingArgs.history_loss_weight = 0.5\nNetworkArgs.is_causal = False\n",
            (
                r"NetworkArgs\.is_causal: RankingArgs\.history_loss_weight > 0 supervises each "
                r"history item on its own action, and non-causal attention lets the item's token "
                r"see that action"
            ),
        ),
    ],
    ids=["retrieval", "ranking_history_loss"],
)
def test_non_causal_attention_is_refused_where_a_token_would_see_its_label(
    tmp_path, task, extra, pattern
):
    path = _write(tmp_path, BASE + extra)
    line = (BASE + extra).splitlines().index("NetworkArgs.is_causal = False") + 1
    with pytest.raises(A.ConfigError, match=rf"^{re.escape(path)}:{line}: {pattern}") as info:
        load_config(path, task=task)
    assert "\n" not in str(info.value)
    # set by --gin-param instead: the error names the override
    with pytest.raises(A.ConfigError, match=r"^--gin-param 'NetworkArgs\.is_causal=False': "):
        load_config(_write(tmp_path, BASE + extra.replace("NetworkArgs.is_causal = False\n", "")),
                    ["NetworkArgs.is_causal=False"], task=task)


def test_non_causal_ranking_without_history_loss_loads(tmp_path):
    path = _write(tmp_path, BASE + RANKING + "NetworkArgs.is_causal = False\n")
    cfg = load_config(path, task="ranking")
    assert cfg.network.is_causal is False and cfg.ranking.history_loss_weight == 0


def test_error_points_at_the_line_that_set_the_value(tmp_path):
    path = _write(tmp_path, BASE + "TrainerArgs.seed = 'x'\n")
    line = BASE.count("\n") + 1
    with pytest.raises(A.ConfigError, match=rf"run\.gin:{line}: TrainerArgs\.seed"):
        load_config(path)


def test_missing_required_field(tmp_path):
    text = BASE.replace("OptimizerArgs.learning_rate = 0.001\n", "")
    with pytest.raises(A.ConfigError, match=r"run\.gin: OptimizerArgs\.learning_rate: required field is not set"):
        load_config(_write(tmp_path, text))


def test_missing_file_and_gin_param_errors(tmp_path):
    with pytest.raises(A.ConfigError, match=r"nope\.gin: gin: config file not found"):
        load_config(str(tmp_path / "nope.gin"))
    with pytest.raises(A.ConfigError, match=r"--gin-param 'TrainerArgs\.sed=1': TrainerArgs\.sed: unknown field"):
        load_config(_write(tmp_path, BASE), ["TrainerArgs.sed=1"])


def test_gin_param_overrides_file(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["TrainerArgs.seed = 99", "NetworkArgs.num_layers=3"])
    assert cfg.trainer.seed == 99 and cfg.network.num_layers == 3


def test_include_is_followed_and_checked(tmp_path):
    _write(tmp_path, BASE, "base.gin")
    path = _write(tmp_path, "include 'base.gin'\nTrainerArgs.seed = 5\n")
    assert load_config(path).trainer.seed == 5
    _write(tmp_path, BASE + "NetworkArgs.hiden_size = 3\n", "bad_base.gin")
    path = _write(tmp_path, "include 'bad_base.gin'\n", "top.gin")
    with pytest.raises(A.ConfigError, match=r"bad_base\.gin:\d+: NetworkArgs\.hiden_size: unknown field \(did you mean 'hidden_size'\?\)"):
        load_config(path)


def test_tp_must_divide_world(tmp_path):
    path = _write(tmp_path, BASE + "TensorModelParallelArgs.tensor_model_parallel_size = 2\n")
    load_config(path, world_size=4)
    with pytest.raises(A.ConfigError, match="2 does not divide the world size 3"):
        load_config(path, world_size=3)


def test_tables_declared_by_scope(tmp_path):
    text = BASE + textwrap.dedent(
        """
        item/DynamicEmbeddingArgs.feature_names = ["item"]
        item/DynamicEmbeddingArgs.table_name = "item"
        item/DynamicEmbeddingArgs.item_vocab_size_or_capacity = 1000
        item/DynamicEmbeddingArgs.evict_strategy = "lfu"
        user/EmbeddingArgs.feature_names = ["user_id"]
        user/EmbeddingArgs.table_name = "user"
        user/EmbeddingArgs.item_vocab_size_or_capacity = 50
        user/EmbeddingArgs.sharding_type = "data_parallel"
        """
    )
    cfg = load_config(_write(tmp_path, text))
    by_name = {t.table_name: t for t in cfg.tables}
    assert isinstance(by_name["item"], A.DynamicEmbeddingArgs)
    assert by_name["item"].evict_strategy == "lfu" and by_name["item"].sharding_type == "model_parallel"
    assert type(by_name["user"]) is A.EmbeddingArgs and by_name["user"].item_vocab_size_or_capacity == 50


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    from hstu.cli import main

    path = _write(tmp_path, BASE)
    # BASE's sparse Adam (its dense optimizer's) is for a GPU run: FBGEMM has no fused CPU Adam
    assert main("retrieval", ["--gin-config-file", path, "--check-config", "--device", "cuda"]) == 0
    assert "configuration OK" in capsys.readouterr().out
    assert main("retrieval", ["--gin-config-file", path, "--gin-param", "Trainer.seed=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gin-param 'Trainer.seed=1': Trainer: unknown gin class")
    assert err.count("\n") == 1


@pytest.mark.parametrize("preset", ["configs/debug_retrieval.gin", "configs/debug_ranking.gin"])
def test_debug_presets_load(preset):
    task = "ranking" if "ranking" in preset else "retrieval"
    cfg = load_config(preset, task=task)
    assert cfg.trainer.max_train_iters is not None and cfg.network.dtype_str == "float32"


# --------------------------------------------------------------------------- HBM sizing


def _dyn(**kw):
    base = {"feature_names": ["item"], "table_name": "item", "item_vocab_size_or_capacity": 10_000}
    base.update(kw)
    return A.DynamicEmbeddingArgs(**base)


def test_hbm_global_bytes_wins_over_everything():
    plan = _dyn(global_hbm_for_values=1_000_000, item_vocab_gpu_capacity=10, item_vocab_gpu_capacity_ratio=0.1).resolve_hbm(64, "adam")
    # adam: 3 rows of 64 fp32 values per id = 768 B
    assert plan.rule == "global_hbm_for_values"
    assert plan.row_bytes == 768 and plan.capacity_rows == 1_000_000 // 768
    assert plan.hbm_bytes == 1_000_000


def test_hbm_capacity_wins_over_ratio():
    plan = _dyn(item_vocab_gpu_capacity=300, item_vocab_gpu_capacity_ratio=0.1).resolve_hbm(64, "sgd")
    assert (plan.rule, plan.capacity_rows, plan.row_bytes, plan.hbm_bytes) == (
        "item_vocab_gpu_capacity", 300, 256, 300 * 256,
    )


@pytest.mark.parametrize(
    "optimizer, row_bytes",
    [("adam", 64 * 3 * 4), ("adamw", 64 * 3 * 4), ("sgd", 64 * 4), ("rowwise_adagrad", (64 + 1) * 4)],
)
def test_hbm_ratio_only_deduces_capacity_and_bytes(optimizer, row_bytes):
    plan = _dyn(item_vocab_gpu_capacity_ratio=0.25).resolve_hbm(64, optimizer)
    assert plan.rule == "item_vocab_gpu_capacity_ratio"
    assert plan.capacity_rows == 2_500
    assert plan.row_bytes == row_bytes
    assert plan.hbm_bytes == 2_500 * row_bytes


def test_hbm_adam_needs_three_times_sgd():
    ratio = _dyn(item_vocab_gpu_capacity_ratio=0.5)
    assert ratio.resolve_hbm(32, "adam").hbm_bytes == 3 * ratio.resolve_hbm(32, "sgd").hbm_bytes


def test_hbm_nothing_set_plans_whole_table_and_bytes_too_small_fails():
    assert _dyn().resolve_hbm(16, "sgd").rule == "full_table"
    assert _dyn().resolve_hbm(16, "sgd").capacity_rows == 10_000
    with pytest.raises(A.ConfigError, match="hold no row"):
        _dyn(global_hbm_for_values=10).resolve_hbm(16, "adam")
    with pytest.raises(A.ConfigError, match=r"item_vocab_gpu_capacity_ratio: must be in \(0, 1\]"):
        _dyn(item_vocab_gpu_capacity_ratio=1.5)


def test_data_classes_are_known_to_the_loader(tmp_path):
    cfg = load_config(_write(tmp_path, BASE + "SyntheticDataArgs.num_users = 50\n"))
    assert cfg.extras["SyntheticDataArgs"].num_users == 50
    with pytest.raises(A.ConfigError, match=r"SyntheticDataArgs\.num_user: unknown field \(did you mean 'num_users'\?\)"):
        load_config(_write(tmp_path, BASE + "SyntheticDataArgs.num_user = 50\n"))


def test_eval_split_valid_needs_holdout(tmp_path):
    with pytest.raises(A.ConfigError, match=r"DatasetArgs\.eval_split: 'valid' needs DatasetArgs\.holdout_validation = True"):
        load_config(_write(tmp_path, BASE + 'DatasetArgs.eval_split = "valid"\n'))
    cfg = load_config(_write(tmp_path, BASE + 'DatasetArgs.eval_split = "valid"\nDatasetArgs.holdout_validation = True\n'))
    assert cfg.dataset.eval_split == "valid"
