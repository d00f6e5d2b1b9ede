"""Builds the ranking or retrieval model from the argument dataclasses (no gin here).

The HSTU layer's knobs live in one place, :class:`hstu.model.hstu_layer.LayerOptions`, read
from NetworkArgs by field name (fields it lacks keep their defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup

from hstu.model.hstu_block import HSTUBlock
from hstu.model.hstu_layer import LayerOptions, research_options
from hstu.model.model import GenerativeRecommender, RetrievalRecommender
from hstu.model.ranking import MLP, RankingModel
from hstu.model.retrieval import RetrievalModel
from hstu.model.tokens import TokenBuilder, max_token_seqlen


@dataclass
class ModelDataInfo:
    """What the model needs to know about the data.

    num_items: item ids lie in [0, num_items). max_item_seqlen: longest H + C per sample.
    feature_dims: embedding dim per feature (missing ones: hidden_size).
    min_item_id: first real item id (1 when 0 is padding).
    """

    num_items: int
    item_feature_name: str
    max_item_seqlen: int
    action_feature_name: str | None = None
    contextual_feature_names: list[str] = field(default_factory=list)
    feature_dims: dict[str, int] = field(default_factory=dict)
    min_item_id: int = 0
    sid_codes: torch.Tensor | None = None
    """architecture="hstu_sid": int64 [num_items, L], each item id's codes (-1: none)."""
    sid_num_codes: list[int] = field(default_factory=list)
    """architecture="hstu_sid": K_l, codes per level."""

    @property
    def feature_names(self) -> list[str]:
        names = [self.item_feature_name]
        if self.action_feature_name is not None:
            names.append(self.action_feature_name)
        return names + list(self.contextual_feature_names)


def build_block(
    network_args: Any,
    max_seqlen: int,
    variant: dict[str, Any] | None = None,
    tp_group: ProcessGroup | None = None,
) -> nn.Module:
    """HSTUBlock from NetworkArgs; ``max_seqlen`` is the longest token sequence (the relative
    attention bias' position range); ``variant``: LayerOptions fields to override (e.g.
    :func:`research_options`). ``NetworkArgs.architecture = "sasrec"``: a
    :class:`hstu.model.sasrec.SASRecBlock` instead (same contract; one process per TP group)."""
    if getattr(network_args, "architecture", "hstu") == "sasrec":
        if tp_group is not None or variant:
            raise ValueError(
                'NetworkArgs.architecture="sasrec" has no tensor-parallel or research variant'
            )
        from hstu.model.sasrec import SASRecBlock, SASRecOptions

        block_cls, options = SASRecBlock, SASRecOptions.from_network_args(network_args)
        layout = {"sequence_layout": getattr(network_args, "sequence_layout", "jagged")}
    else:
        options = LayerOptions.from_network_args(
            network_args, rab_num_positions=max_seqlen, **(variant or {})
        )
        names = ("sequence_layout", "attn_truncation_layers", "attn_truncation_len")
        block_cls, layout = HSTUBlock, {"tp_group": tp_group}
        layout.update((k, getattr(network_args, k)) for k in names if hasattr(network_args, k))
    return block_cls(
        network_args.num_layers,
        network_args.hidden_size,
        network_args.num_attention_heads,
        network_args.kv_channels,
        options,
        num_position_buckets=network_args.num_position_buckets,
        use_position_embedding=getattr(network_args, "use_position_embedding", True),
        **layout,
    )


def build_token_builder(network_args: Any, data: ModelDataInfo) -> TokenBuilder:
    dims = dict(data.feature_dims)
    dims.setdefault(data.item_feature_name, network_args.resolved_item_embedding_dim)
    if data.action_feature_name is not None:
        dims.setdefault(data.action_feature_name, dims[data.item_feature_name])
    for name in data.contextual_feature_names:
        dims.setdefault(name, network_args.resolved_contextual_embedding_dim)
    return TokenBuilder(
        network_args.hidden_size,
        data.item_feature_name,
        data.action_feature_name,
        data.contextual_feature_names,
        dims,
        query_time=getattr(network_args, "rab_query_time", False),
    )


def build_model(
    task: Literal["ranking", "retrieval"],
    network_args: Any,
    task_args: Any,
    embedding_module: nn.Module,
    data: ModelDataInfo,
    tp_group: ProcessGroup | None = None,
    variant: dict[str, Any] | None = None,
) -> GenerativeRecommender:
    """The whole model for ``task`` (RankingArgs or RetrievalArgs as ``task_args``):
    ``embedding_module`` as the sparse part, a RankingModel or RetrievalModel as the dense part.

    ``tp_group`` None (or of size 1) builds plain torch linears; otherwise the block is
    Megatron tensor-parallel over it and the dense part gathers the group's samples.
    """
    if tp_group is not None and torch.distributed.get_world_size(tp_group) == 1:
        tp_group = None
    max_seqlen = max_token_seqlen(
        data.max_item_seqlen,
        len(data.contextual_feature_names),
        data.action_feature_name is not None,
    )
    block = build_block(network_args, max_seqlen, variant, tp_group)
    tokens = build_token_builder(network_args, data)
    if task == "ranking":
        head = MLP(
            network_args.hidden_size,
            list(task_args.prediction_head_arch),
            task_args.prediction_head_act_type,
            task_args.prediction_head_bias,
        )
        return GenerativeRecommender(embedding_module, RankingModel(
            tokens,
            block,
            head,
            num_tasks=task_args.num_tasks,
            history_loss_weight=task_args.history_loss_weight,
            max_item_seqlen=data.max_item_seqlen,
            tp_group=tp_group,
        ))
    if task == "retrieval" and getattr(network_args, "architecture", "hstu") == "hstu_sid":
        from hstu.model.sid import SidRetrievalModel

        if data.sid_codes is None or tp_group is not None:
            raise ValueError('architecture="hstu_sid" needs ModelDataInfo.sid_codes and one '
                             "process per model replica")
        return GenerativeRecommender(embedding_module, SidRetrievalModel(
            tokens,
            block,
            codes=data.sid_codes,
            num_codes=data.sid_num_codes,
            item_embedding=network_args.sid_item_embedding,
            decoder_layers=network_args.sid_decoder_layers,
            decoder_heads=network_args.sid_decoder_heads,
            dropout=(network_args.hidden_dropout if network_args.sid_decoder_dropout is None
                     else network_args.sid_decoder_dropout),
            eps=network_args.norm_epsilon,
            decoder_ffn_multiplier=network_args.sid_decoder_ffn_multiplier,
            decoder_attention_dropout=network_args.sid_decoder_attention_dropout,
            min_item_id=data.min_item_id,
            max_item_seqlen=data.max_item_seqlen,
            beam_width=task_args.sid_beam_width,
            certify=task_args.sid_certify,
            spread=task_args.sid_new_item_spread,
            eval_exclude_history=task_args.eval_exclude_history,
            exclude_history_from_loss=task_args.sid_exclude_history_from_loss,
        ))
    if task == "retrieval":
        dense = RetrievalModel(
            tokens,
            block,
            num_items=data.num_items,
            num_negatives=task_args.num_negatives,
            negative_sampling=task_args.negative_sampling,
            temperature=task_args.temperature,
            full_corpus_matmul_dtype=task_args.full_corpus_matmul_dtype,
            l2_norm_eps=task_args.l2_norm_eps,
            min_item_id=data.min_item_id,
            max_item_seqlen=data.max_item_seqlen,
            tp_group=tp_group,
            eval_exclude_history=task_args.eval_exclude_history,
            exclude_history_from_loss=task_args.exclude_history_from_loss,
        )
        keys = data.feature_names + ([dense.negatives_feature] if dense.draws is not None else [])
        return RetrievalRecommender(embedding_module, dense, keys)
    raise ValueError(f"task {task!r} is not 'ranking' or 'retrieval'")


__all__ = [
    "LayerOptions",
    "ModelDataInfo",
    "build_block",
    "build_model",
    "build_token_builder",
    "research_options",
]
