"""No unnamed host sync in a trainer step, for every switch that changes the step.

Each cell builds a real trainer on a debug preset with one switch (or one combination) turned
on, and runs a few steps exactly as ``Trainer.train`` does (the trainer's Feed with its input
stage, its pipeline, the optimizers, the weight average) under :func:`hstu.sync_audit.sync_audit`:
an op that would make the host wait for a CUDA device raises, naming the op and our line. The
syncs that remain are named (``allowed_sync``) and must be among :data:`KNOWN_REASONS`, the
list docs/kernels.md explains, each at a call site :data:`KNOWN_SITES` lists under its reason
(a reason covers the calls that need it, not everything in its block).

:data:`SWITCHES` classifies every field of the step's gin classes: the cells that exercise it,
or why it does not change what a step runs. A new field that is in neither fails
:func:`test_every_switch_is_classified`: add a cell for it (or say why it needs none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hstu.sync_audit import TORCH_OPTIM_STEP
from tests.dist_utils import run_multiprocess
from tests.training.test_pipelines import DYNAMIC_ITEM
from tests.training.test_sync_audit import KNOWN_REASONS, KNOWN_SITES

STEPS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

UNIFORM = ['RetrievalArgs.negative_sampling="uniform"', "RetrievalArgs.num_negatives=8"]
FULL = ['RetrievalArgs.negative_sampling="full_corpus"', "RetrievalArgs.num_negatives=-1"]
TWO_LAYERS = ["NetworkArgs.num_layers=2"]
# the ranking preset's item and user tables replicated too (its action and segment ones are)
ALL_REPLICATED = [
    'item/EmbeddingArgs.feature_names=["item_id"]', 'item/EmbeddingArgs.table_name="item"',
    'item/EmbeddingArgs.sharding_type="data_parallel"',
    'user/EmbeddingArgs.feature_names=["user_id"]', 'user/EmbeddingArgs.table_name="user_id"',
    'user/EmbeddingArgs.sharding_type="data_parallel"',
]

# cell -> (task, processes, gin params)
CELLS: dict[str, tuple[str, int, list[str]]] = {
    # each negative sampling (debug_retrieval.gin: num_negatives=-1, i.e. in-batch only)
    "retrieval": ("retrieval", 1, []),
    "uniform": ("retrieval", 1, UNIFORM),
    "in_batch": ("retrieval", 1, ['RetrievalArgs.negative_sampling="in_batch"']),
    "mixed": ("retrieval", 1, ['RetrievalArgs.negative_sampling="mixed"',
                               "RetrievalArgs.num_negatives=8"]),
    "shared": ("retrieval", 1, ['RetrievalArgs.negative_sampling="shared"',
                                "RetrievalArgs.num_negatives=8"]),
    "mixed_logq": ("retrieval", 1, ['RetrievalArgs.negative_sampling="mixed_logq"',
                                    "RetrievalArgs.num_negatives=8"]),
    "sampled_live": ("retrieval", 1, ['RetrievalArgs.negative_sampling="sampled_live"',
                                      "RetrievalArgs.num_negatives=8", *DYNAMIC_ITEM,
                                      "RetrievalArgs.exclude_history_from_loss=True"]),
    # admission: the first steps' items are not admitted (misses in training, targets left out)
    "admission": ("retrieval", 1, ['RetrievalArgs.negative_sampling="sampled_live"',
                                   "RetrievalArgs.num_negatives=8", *DYNAMIC_ITEM,
                                   "item/DynamicEmbeddingArgs.admit_min_count=3",
                                   "item/DynamicEmbeddingArgs.admit_sketch_width=4096"]),
    # generative retrieval with semantic ids (codes written for the synthetic items: {tmp})
    "sid": ("retrieval", 1, ['NetworkArgs.architecture="hstu_sid"',
                             'NetworkArgs.sid_codes="{tmp}/sid"', "NetworkArgs.sid_decoder_layers=2",
                             "NetworkArgs.sid_decoder_heads=2",
                             "NetworkArgs.sid_item_embedding=True",
                             "NetworkArgs.sid_decoder_dropout=0.1",
                             "NetworkArgs.sid_decoder_attention_dropout=0.0",
                             "NetworkArgs.sid_decoder_ffn_multiplier=2",
                             "RetrievalArgs.sid_exclude_history_from_loss=True"]),
    "full_corpus": ("retrieval", 1, [*FULL, 'RetrievalArgs.full_corpus_matmul_dtype="float32"',
                                     "RetrievalArgs.temperature=0.1"]),
    "exclude_history": ("retrieval", 1, [*FULL, "RetrievalArgs.exclude_history_from_loss=True"]),
    # dynamic tables (the input stage remaps host ids)
    "dynamic_lru": ("retrieval", 1, [*UNIFORM, *DYNAMIC_ITEM,
                                     'item/DynamicEmbeddingArgs.evict_strategy="lru"']),
    "dynamic_lfu": ("retrieval", 1, [*UNIFORM, *DYNAMIC_ITEM,
                                     'item/DynamicEmbeddingArgs.evict_strategy="lfu"']),
    # attention variants
    "truncation": ("retrieval", 1, [*TWO_LAYERS, "NetworkArgs.attn_truncation_layers=1",
                                    "NetworkArgs.attn_truncation_len=8"]),
    "window": ("retrieval", 1, ["NetworkArgs.max_attn_len=8",
                                "NetworkArgs.min_full_attn_seq_len=4"]),
    "rab": ("retrieval", 1, ["NetworkArgs.relative_attention_bias=True",
                             "NetworkArgs.rab_use_time=True"]),
    "padded": ("ranking", 1, ['NetworkArgs.sequence_layout="padded"']),
    "ranking_window_truncation": ("ranking", 1, [
        *TWO_LAYERS, "NetworkArgs.attn_truncation_layers=1", "NetworkArgs.attn_truncation_len=8",
        "NetworkArgs.max_attn_len=8"]),
    "stochastic_length": ("retrieval", 1, ["DatasetArgs.stochastic_length_alpha=1.6",
                                           'DatasetArgs.stochastic_length_sampling="mix"']),
    "ema": ("retrieval", 1, ["TrainerArgs.ema_decay=0.99"]),
    "ranking_ema": ("ranking", 1, ["TrainerArgs.ema_decay=0.99"]),
    # precision, clipping and schedules
    "bf16": ("retrieval", 1, ['NetworkArgs.dtype_str="bfloat16"']),
    "bf16_full_corpus": ("retrieval", 1, [*FULL, 'NetworkArgs.dtype_str="bfloat16"',
                                          'RetrievalArgs.full_corpus_matmul_dtype="bfloat16"',
                                          "RetrievalArgs.exclude_history_from_loss=True"]),
    "fp16": ("ranking", 1, ['NetworkArgs.dtype_str="float16"', "OptimizerArgs.clip_grad_norm=1.0",
                            "OptimizerArgs.lr_warmup_iters=2", 'OptimizerArgs.lr_decay_style="cosine"',
                            "OptimizerArgs.weight_decay=0.01", 'OptimizerArgs.optimizer_str="adamw"']),
    "fp16_retrieval": ("retrieval", 1, ['NetworkArgs.dtype_str="float16"',
                                        "OptimizerArgs.clip_grad_norm=1.0"]),
    # float16 with each table optimizer family (the skip of an overflowing step differs by
    # family; "fp16" above is row-wise Adagrad, the presets' own): FBGEMM's fused SGD on the
    # sharded tables, and Adam on replicated ones (FBGEMM has no CPU Adam: its fused
    # Adam-family kernels are checked on a GPU, python -m hstu.gpu_check)
    "fp16_sgd": ("ranking", 1, ['NetworkArgs.dtype_str="float16"',
                                'OptimizerArgs.sparse_optimizer_str="sgd"']),
    "fp16_adam": ("ranking", 1, ['NetworkArgs.dtype_str="float16"',
                                 'OptimizerArgs.sparse_optimizer_str="adam"', *ALL_REPLICATED]),
    "ranking": ("ranking", 1, ["RankingArgs.num_tasks=2", "RankingArgs.history_loss_weight=0.5",
                               'OptimizerArgs.sparse_lr_schedule="constant"']),
    "mlp_baseline": ("ranking", 1, ['NetworkArgs.architecture="mlp_baseline"']),
    "sasrec": ("retrieval", 2, ['NetworkArgs.architecture="sasrec"', *FULL, "NetworkArgs.hidden_dropout=0.2",
                                'NetworkArgs.sasrec_ffn_activation="gelu"', "NetworkArgs.sasrec_ffn_multiplier=2",
                                "NetworkArgs.sasrec_gated_residual=False"]),
    # process layouts and pipelines
    "tp2": ("retrieval", 2, ["TensorModelParallelArgs.tensor_model_parallel_size=2",
                             "NetworkArgs.relative_attention_bias=True",
                             "DatasetArgs.action_tokens=False", "NetworkArgs.rab_query_time=True"]),
    "ranking_tp2": ("ranking", 2, ["TensorModelParallelArgs.tensor_model_parallel_size=2",
                                   "NetworkArgs.hidden_dropout=0.2"]),
    "dp2": ("retrieval", 2, ["NetworkArgs.hidden_dropout=0.2", "TrainerArgs.dropout_per_rank=True",
                             "DatasetArgs.balance_ranks=True", "TrainerArgs.ddp_bucket_cap_mb=1.0"]),
    "dp2_full_corpus": ("retrieval", 2, [*FULL, "RetrievalArgs.exclude_history_from_loss=True"]),
    "native": ("retrieval", 2, ['TrainerArgs.pipeline_type="native"', *UNIFORM]),
    "native_live": ("retrieval", 2, ['TrainerArgs.pipeline_type="native"', *DYNAMIC_ITEM,
                                     'RetrievalArgs.negative_sampling="sampled_live"',
                                     "RetrievalArgs.num_negatives=8"]),
    "native_dynamic": ("retrieval", 2, ['TrainerArgs.pipeline_type="native"', *UNIFORM,
                                        *DYNAMIC_ITEM]),
    "prefetch": ("ranking", 2, ['TrainerArgs.pipeline_type="prefetch"']),
    "data_parallel_table": ("retrieval", 2, ['item/EmbeddingArgs.feature_names=["item_id"]',
                                             'item/EmbeddingArgs.table_name="item"',
                                             'item/EmbeddingArgs.sharding_type="data_parallel"']),
}

_ALL = "every cell"
_NO = "does not change what a step runs: "
_HOST = "host-side loader work, outside the step: "
# "Class.field" -> the cells that exercise it, or why none is needed
SWITCHES: dict[str, list[str] | str] = {
    # TrainerArgs
    "TrainerArgs.train_batch_size": _ALL,
    "TrainerArgs.eval_batch_size": _NO + "evaluation only",
    "TrainerArgs.eval_interval": _NO + "when evaluation runs, between steps",
    "TrainerArgs.log_interval": _NO + "log boundaries are between steps (their host reads are there)",
    "TrainerArgs.max_train_iters": _NO + "the number of steps",
    "TrainerArgs.time_budget_minutes": _NO + "the number of steps (decided once, on the host)",
    "TrainerArgs.max_train_epochs": _NO + "the number of steps (from the loader's length)",
    "TrainerArgs.eval_interval_epochs": _NO + "when evaluation runs, between steps",
    "TrainerArgs.max_eval_iters": _NO + "evaluation only",
    "TrainerArgs.seed": _ALL,
    "TrainerArgs.dropout_per_rank": ["dp2"],
    "TrainerArgs.ema_decay": ["ema", "ranking_ema"],
    "TrainerArgs.profile": _NO + "the profiler records, between steps it starts and stops",
    "TrainerArgs.profile_step_start": _NO + "profiler window",
    "TrainerArgs.profile_step_end": _NO + "profiler window",
    "TrainerArgs.ckpt_save_interval": _NO + "saves happen between steps",
    "TrainerArgs.ckpt_save_dir": _NO + "a path",
    "TrainerArgs.ckpt_load_dir": _NO + "a path",
    "TrainerArgs.keep_last_n": _NO + "checkpoint retention",
    "TrainerArgs.pipeline_type": ["native", "native_dynamic", "prefetch", "retrieval"],
    "TrainerArgs.ddp_bucket_cap_mb": ["dp2"],
    "TrainerArgs.run_dir": _NO + "a path",
    "TrainerArgs.best_metric": _NO + "selection among evaluations",
    "TrainerArgs.early_stopping_patience": _NO + "selection among evaluations",
    "TrainerArgs.best_requires_loss_below_prior": _NO + "selection among evaluations",
    "TrainerArgs.best_within_stderr": _NO + "selection among evaluations",
    # tables
    "EmbeddingArgs.feature_names": _ALL,
    "EmbeddingArgs.table_name": _ALL,
    "EmbeddingArgs.item_vocab_size_or_capacity": _ALL,
    "EmbeddingArgs.sharding_type": ["data_parallel_table", "fp16_adam"],
    "EmbeddingArgs.sharding_override": _NO + "which rank holds which rows (the same kernels; "
                                       "tests/embeddings cover each type)",
    "DynamicEmbeddingArgs.global_hbm_for_values": _NO + "sizes the capacity (dynamic cells)",
    "DynamicEmbeddingArgs.item_vocab_gpu_capacity": ["dynamic_lru", "dynamic_lfu", "native_dynamic"],
    "DynamicEmbeddingArgs.item_vocab_gpu_capacity_ratio": _NO + "sizes the capacity (dynamic cells)",
    "DynamicEmbeddingArgs.evict_strategy": ["dynamic_lru", "dynamic_lfu"],
    "DynamicEmbeddingArgs.caching": _NO + "GPU only (UVM caching kernel); refused or ignored on CPU",
    "DynamicEmbeddingArgs.admit_min_count": ["admission"],
    "DynamicEmbeddingArgs.admit_sketch_width": ["admission"],
    "DynamicEmbeddingArgs.admit_sketch_depth": _NO + "sizes the admission sketch (host state)",
    # data
    "DatasetArgs.dataset_name": _ALL,
    "DatasetArgs.max_sequence_length": _ALL,
    "DatasetArgs.dataset_path": _NO + "a path",
    "DatasetArgs.max_num_candidates": ["ranking", "fp16", "prefetch"],
    "DatasetArgs.shuffle": _HOST + "batch order",
    "DatasetArgs.holdout_validation": _HOST + "which events train",
    "DatasetArgs.train_full_history": _HOST + "which events train",
    "DatasetArgs.eval_split": _NO + "evaluation only",
    "DatasetArgs.cold_items": _HOST + "which events train (evaluation adds host-side subsets)",
    "DatasetArgs.cold_items_seed": _HOST + "which items are cold",
    "DatasetArgs.action_tokens": ["tp2"],
    "DatasetArgs.contextual_features": _HOST + "more KJT keys, the same lookup path",
    "DatasetArgs.balance_ranks": ["dp2"],
    "DatasetArgs.balance_ranks_by": _HOST + "how the loader balances",
    "DatasetArgs.stochastic_length_alpha": ["stochastic_length"],
    "DatasetArgs.stochastic_length_sampling": ["stochastic_length"],
    "DatasetArgs.stochastic_length_mix_prob": _HOST + "a sampling probability",
    # network
    "NetworkArgs.num_layers": ["truncation", "ranking_window_truncation"],
    "NetworkArgs.hidden_size": _ALL,
    "NetworkArgs.num_attention_heads": _ALL,
    "NetworkArgs.kv_channels": _ALL,
    "NetworkArgs.hidden_dropout": ["dp2", "ranking_tp2"],
    "NetworkArgs.norm_epsilon": _NO + "a constant",
    "NetworkArgs.is_causal": _NO + "the mask's shape, not its sizes",
    "NetworkArgs.mask_convention": _NO + "the mask's shape, not its sizes",
    "NetworkArgs.dtype_str": ["bf16", "bf16_full_corpus", "fp16", "fp16_retrieval", "fp16_sgd",
                              "fp16_adam"],
    "NetworkArgs.kernel_backend": _NO + "CPU runs the pytorch kernel; triton/cutlass are checked "
                                  "on a GPU by python -m hstu.gpu_check",
    "NetworkArgs.target_group_size": _NO + "the mask's shape, not its sizes",
    "NetworkArgs.num_position_buckets": _NO + "a table size",
    "NetworkArgs.recompute_input_layernorm": _NO + "recomputation of the same ops in backward",
    "NetworkArgs.recompute_input_silu": _NO + "recomputation of the same ops in backward",
    "NetworkArgs.item_embedding_dim": _NO + "a projection's width",
    "NetworkArgs.contextual_embedding_dim": _NO + "a projection's width",
    "NetworkArgs.relative_attention_bias": ["rab", "tp2"],
    "NetworkArgs.rab_use_time": ["rab"],
    "NetworkArgs.rab_query_time": ["tp2"],
    "NetworkArgs.attention_alpha": _NO + "a constant",
    "NetworkArgs.attn_scaling_seqlen": _NO + "a constant",
    "NetworkArgs.uvqk_bias": _NO + "a bias",
    "NetworkArgs.norm_affine": _NO + "a norm's weights",
    "NetworkArgs.output_bias": _NO + "a bias",
    "NetworkArgs.use_position_embedding": _NO + "one more lookup by position",
    "NetworkArgs.architecture": ["mlp_baseline", "sasrec", "sid"],
    "NetworkArgs.sid_codes": ["sid"],
    "NetworkArgs.sid_item_embedding": ["sid"],
    "NetworkArgs.sid_decoder_layers": ["sid"],
    "NetworkArgs.sid_decoder_heads": ["sid"],
    "NetworkArgs.sid_decoder_dropout": ["sid"],
    "NetworkArgs.sid_decoder_attention_dropout": ["sid"],
    "NetworkArgs.sid_decoder_ffn_multiplier": ["sid"],
    "NetworkArgs.sasrec_ffn_activation": ["sasrec"],
    "NetworkArgs.sasrec_ffn_multiplier": ["sasrec"],
    "NetworkArgs.sasrec_gated_residual": ["sasrec"],
    "NetworkArgs.sequence_layout": ["padded"],
    "NetworkArgs.compile": _NO + "torch.compile of the same ops (refused on CPU hosts without a compiler)",
    "NetworkArgs.max_attn_len": ["window", "ranking_window_truncation"],
    "NetworkArgs.min_full_attn_seq_len": ["window"],
    "NetworkArgs.attn_truncation_layers": ["truncation", "ranking_window_truncation"],
    "NetworkArgs.attn_truncation_len": ["truncation", "ranking_window_truncation"],
    # optimizer
    "OptimizerArgs.optimizer_str": ["fp16"],
    "OptimizerArgs.learning_rate": _ALL,
    "OptimizerArgs.adam_beta1": _NO + "a constant",
    "OptimizerArgs.adam_beta2": _NO + "a constant",
    "OptimizerArgs.adam_eps": _NO + "a constant",
    "OptimizerArgs.weight_decay": ["fp16"],
    "OptimizerArgs.sparse_optimizer_str": ["fp16", "fp16_sgd", "fp16_adam"],
    "OptimizerArgs.sparse_learning_rate": _ALL,
    "OptimizerArgs.sparse_adam_beta2": _NO + "a constant",
    "OptimizerArgs.clip_grad_norm": ["fp16", "fp16_retrieval"],
    "OptimizerArgs.sparse_lr_schedule": ["ranking"],
    "OptimizerArgs.lr_warmup_iters": ["fp16"],
    "OptimizerArgs.lr_decay_style": ["fp16"],
    "OptimizerArgs.lr_decay_iters": _NO + "a schedule's length",
    "OptimizerArgs.min_learning_rate": _NO + "a schedule's floor",
    "TensorModelParallelArgs.tensor_model_parallel_size": ["tp2", "ranking_tp2"],
    # heads and losses
    "RankingArgs.prediction_head_arch": _ALL,
    "RankingArgs.prediction_head_act_type": _NO + "an activation",
    "RankingArgs.prediction_head_bias": _NO + "a bias",
    "RankingArgs.num_tasks": ["ranking"],
    "RankingArgs.eval_metrics": _NO + "evaluation only",
    "RankingArgs.history_loss_weight": ["ranking"],
    "RetrievalArgs.num_negatives": ["uniform", "mixed", "shared", "mixed_logq", "sampled_live"],
    "RetrievalArgs.negative_sampling": ["uniform", "in_batch", "mixed", "shared", "mixed_logq",
                                        "full_corpus", "sampled_live"],
    "RetrievalArgs.full_corpus_max_items": _NO + "chooses negative_sampling (its cells) once, "
                                             "before the run",
    "RetrievalArgs.temperature": ["full_corpus"],
    "RetrievalArgs.full_corpus_matmul_dtype": ["full_corpus", "bf16_full_corpus"],
    "RetrievalArgs.l2_norm_eps": _NO + "a constant",
    "RetrievalArgs.eval_metrics": _NO + "evaluation only",
    "RetrievalArgs.eval_exclude_history": _NO + "evaluation only",
    "RetrievalArgs.exclude_history_from_loss": ["exclude_history", "bf16_full_corpus",
                                                "dp2_full_corpus", "sampled_live"],
    "RetrievalArgs.eval_num_users": _NO + "evaluation only",
    "RetrievalArgs.eval_memory_mb": _NO + "evaluation only",
    "RetrievalArgs.sid_beam_width": _NO + "evaluation only (decoding)",
    "RetrievalArgs.sid_certify": _NO + "evaluation only (decoding)",
    "RetrievalArgs.sid_new_item_spread": _NO + "evaluation only (decoding)",
    "RetrievalArgs.sid_exclude_history_from_loss": ["sid"],
}

STEP_CLASSES = (
    "TrainerArgs", "EmbeddingArgs", "DynamicEmbeddingArgs", "DatasetArgs", "NetworkArgs",
    "OptimizerArgs", "TensorModelParallelArgs", "RankingArgs", "RetrievalArgs",
)


def test_every_switch_is_classified():
    """Every gin field of the step's classes has cells that turn it on, or a reason."""
    import hstu.args

    fields = set()
    for name in STEP_CLASSES:
        cls = getattr(hstu.args, name)
        own = {f.name for f in dataclasses.fields(cls)}
        if name == "DynamicEmbeddingArgs":
            own -= {f.name for f in dataclasses.fields(hstu.args.EmbeddingArgs)}
        fields |= {f"{name}.{f}" for f in own}
    missing = sorted(fields - set(SWITCHES))
    assert not missing, f"switches with no cell in the sync matrix and no reason: {missing}"
    assert not sorted(set(SWITCHES) - fields), "SWITCHES names fields that no longer exist"
    for field, cells in SWITCHES.items():
        if isinstance(cells, str):
            assert cells == _ALL or cells.startswith((_NO, _HOST)), (field, cells)
            continue
        for cell in cells:
            assert cell in CELLS, (field, cell)
            task, _, params = CELLS[cell]
            short = field.split(".", 1)[1]
            with open(os.path.join(ROOT, "configs", f"debug_{task}.gin")) as fh:
                preset = fh.read()
            # the cell (its params or its preset) really sets the field; a default-valued
            # field is covered by the plain "retrieval" cell
            assert (cell == "retrieval" or any(f".{short}=" in p for p in params)
                    or re.search(rf"^{re.escape(field)}\s*=", preset, re.MULTILINE)), (field, cell)


def audited_trainer_steps(
    task: str, tmp: str, tag: str, params: list[str], steps: int = STEPS,
    check: Callable[[Any, set[str]], None] | None = None,
) -> set[str]:
    """``steps`` trainer steps (configs/debug_<task>.gin + ``params``) as ``Trainer.train``
    runs them, under :func:`sync_audit` (raises at the first unnamed sync); asserts the named
    ones are known and calls ``check(trainer, reasons)`` before the trainer closes. Returns the
    reasons named (the dense optimizer's step counts left out). Call inside the processes."""
    from hstu.sync_audit import allowed_sync, sync_audit
    from tests.training.test_distributed import _trainer

    trainer, _env = _trainer(task, tmp, tag, params)
    try:
        dense_step = trainer.optimizer.dense.step

        def step_naming_its_syncs(*args, **kwargs):
            with allowed_sync(TORCH_OPTIM_STEP):
                return dense_step(*args, **kwargs)

        trainer.optimizer.dense.step = step_naming_its_syncs
        feed = trainer.open_batches()
        trainer.model.train()
        batches = iter(feed)
        # raises at the first unnamed sync, or at a sync of an allowed block at a site not
        # listed under the block's reason
        with contextlib.closing(feed), sync_audit(sites=KNOWN_SITES) as audit:
            losses = [trainer.train_step(batches) for _ in range(steps)]
        assert bool(torch.isfinite(torch.stack([x.float().sum() for x in losses])).all())
        reasons = {e.reason for e in audit.allowed} - {TORCH_OPTIM_STEP}
        assert reasons <= KNOWN_REASONS, reasons - KNOWN_REASONS
        if check is not None:
            check(trainer, reasons)
        return reasons
    finally:
        trainer.close()


def _cell_checks(cell: str, params: list[str]) -> Callable[[Any, set[str]], None]:
    def check(trainer: Any, reasons: set[str]) -> None:
        if cell == "uniform":  # the fused CPU loss names its host reads
            assert any("CPU-only kernel" in r for r in reasons), reasons
        if cell == "dp2":  # in-batch negatives over 2 ranks: the query counts, host tensors
            from hstu.ops.gather import HOST_COUNTS

            assert HOST_COUNTS in reasons, reasons
        if 'architecture="hstu_sid"' in " ".join(params):  # the semantic-id model really ran
            assert getattr(trainer.model.dense_module, "decodes_codes", False)
        if "exclude_history_from_loss=True" in " ".join(params):
            assert trainer.model.dense_module.exclude_history_from_loss
        remapped = any(getattr(m, "remappers", None) for m in trainer.model.sparse.modules())
        if remapped:  # the cell really ran the dynamic tables' input stage
            from hstu.embeddings.dynamic import HOST_REMAP

            assert HOST_REMAP in reasons, reasons
            if "native" in cell:  # the rows of the batches in flight are protected
                from hstu.embeddings.dynamic import PIPELINE_IN_FLIGHT

                held = {r.in_flight_steps for m in trainer.model.sparse.modules()
                        for r in getattr(m, "remappers", {}).values()}
                assert held == {PIPELINE_IN_FLIGHT}, held
        if 'dtype_str="float16"' in " ".join(params):
            _check_float16_tables(cell, trainer, reasons)
        if "pipeline_type" in " ".join(params):
            from hstu.training.pipeline import pipelined_module_names

            assert pipelined_module_names(trainer.pipeline), "the pipeline overlapped nothing"

    return check


# what an overflowing float16 step must undo in the tables, per cell: the FBGEMM kernels'
# optimizers (sharded tables) and the replicated tables' optimizer kinds
FLOAT16_TABLES = {
    "fp16": ({"exact_row_wise_adagrad"}, {"rowwise_adagrad"}),
    "fp16_retrieval": ({"exact_row_wise_adagrad"}, {"rowwise_adagrad"}),
    "fp16_sgd": ({"exact_sgd"}, {"SGD"}),
    "fp16_adam": (set(), {"adam"}),
}


def _check_float16_tables(cell: str, trainer: Any, reasons: set[str]) -> None:
    """The audit's verdict on a float16 cell: the step ran the table guard over the tables of
    the cell's optimizer family, and the one host read of the overflow flag
    (FUSED_ADAM_SKIP, FBGEMM's fused Adam family, GPU only) was named exactly when a kernel
    needs it: never here."""
    from hstu.training.optimizer import FUSED_ADAM_SKIP

    guard = trainer.optimizer.table_guard
    assert guard is not None, "float16 with tables runs the table guard"
    fused = {getattr(k.tbe.optimizer, "value", str(k.tbe.optimizer)) for k in guard.kernels}
    replicated = {r.opt.param_groups[0].get("kind", type(r.opt).__name__) for r in guard.replicated}
    assert (fused, replicated) == FLOAT16_TABLES[cell], (fused, replicated)
    assert (FUSED_ADAM_SKIP in reasons) == guard.host_step, reasons
    assert not guard.host_step, "no fused Adam-family kernel on a CPU host"


def _write_codes(folder: str, num_items: int = 1 << 14) -> None:
    """Distinct codes (2 levels of 64 and 16, then a collision level of 16) for ids 0..n-1."""
    import numpy as np

    from hstu.data.semantic_ids import SidCodes, save_codes

    ids = np.arange(num_items, dtype=np.int64)
    codes = np.stack([ids // 256 % 64, ids // 16 % 16, ids % 16], 1).astype(np.int32)
    config = {"format": 1, "levels": 2, "codes": 64, "seed": 0, "source": "test", "dim": 1,
              "n_items": num_items}
    save_codes(SidCodes(ids, codes, config), folder)


def _cell_steps(rank: int, world_size: int, tmp: str, cell: str) -> None:
    task, _, params = CELLS[cell]
    if any("{tmp}" in p for p in params):
        params = [p.replace("{tmp}", tmp) for p in params]
        _write_codes(os.path.join(tmp, "sid"))
    audited_trainer_steps(task, tmp, cell, params, check=_cell_checks(cell, params))


@pytest.mark.parametrize("cell", list(CELLS))
def test_trainer_steps_do_not_sync(tmp_path, cell):
    _task, world_size, _params = CELLS[cell]
    run_multiprocess(_cell_steps, world_size=world_size, tmp=str(tmp_path), cell=cell)
