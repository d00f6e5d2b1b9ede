"""Builds the ranking or retrieval model from the argument dataclasses (no gin here).

The layer variant knobs that NetworkArgs may not carry yet (relative attention bias and the
research-model flags) are read with their documented defaults when absent, so the
production behaviour is unchanged until a gin file sets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup

from hstu.model.hstu_block import HSTUBlock
from hstu.model.model import GenerativeRecommender, RetrievalRecommender
from hstu.model.ranking import MLP, RankingModel
from hstu.model.retrieval import RetrievalModel
from hstu.model.tokens import TokenBuilder, max_token_seqlen

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    @property
    def feature_names(self) -> list[str]:
        names = [self.item_feature_name]
        if self.action_feature_name is not None:
            names.append(self.action_feature_name)
        return names + list(self.contextual_feature_names)


@dataclass
class LayerVariant:
    """HSTU layer knobs beyond NetworkArgs' documented fields (defaults = production)."""

    relative_attention_bias: bool = False
    rab_use_time: bool = True
    attention_alpha: float | None = None
    attn_scaling_seqlen: int | None = None
    uvqk_bias: bool = True
    norm_affine: bool = True
    output_bias: bool = False
    use_position_embedding: bool = True

    @classmethod
    def from_network_args(cls, network_args: Any) -> LayerVariant:
        defaults = cls()
        return cls(
            **{f: getattr(network_args, f, getattr(defaults, f)) for f in cls.__dataclass_fields__}
        )

    @classmethod
    def research(cls, padded_width: int) -> LayerVariant:
        """The paper's research model (use with norm eps 1e-6): rab, alpha 1, N = padded width."""
        return cls(
            relative_attention_bias=True,
            rab_use_time=True,
            attention_alpha=1.0,
            attn_scaling_seqlen=padded_width,
            uvqk_bias=False,
            norm_affine=False,
            output_bias=True,
        )


def build_block(
    network_args: Any,
    max_seqlen: int,
    variant: LayerVariant | None = None,
    tp_group: ProcessGroup | None = None,
) -> HSTUBlock:
    """HSTUBlock from NetworkArgs; ``max_seqlen`` is the longest token sequence."""
    variant = variant or LayerVariant.from_network_args(network_args)
    return HSTUBlock(
        network_args.num_layers,
        network_args.hidden_size,
        network_args.num_attention_heads,
        network_args.kv_channels,
        num_position_buckets=network_args.num_position_buckets,
        use_position_embedding=variant.use_position_embedding,
        dropout=network_args.hidden_dropout,
        norm_eps=network_args.norm_epsilon,
        kernel_backend=network_args.kernel_backend,
        is_causal=network_args.is_causal,
        target_group_size=network_args.target_group_size,
        alpha=variant.attention_alpha,
        attn_scaling_seqlen=variant.attn_scaling_seqlen,
        uvqk_bias=variant.uvqk_bias,
        norm_affine=variant.norm_affine,
        output_bias=variant.output_bias,
        relative_attention_bias=variant.relative_attention_bias,
        rab_num_positions=max_seqlen,
        rab_use_time=variant.rab_use_time,
        recompute_input_layernorm=network_args.recompute_input_layernorm,
        recompute_input_silu=network_args.recompute_input_silu,
        dtype=DTYPES[network_args.dtype_str],
        tp_group=tp_group,
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
    )


def build_model(
    task: Literal["ranking", "retrieval"],
    network_args: Any,
    task_args: Any,
    embedding_module: nn.Module,
    data: ModelDataInfo,
    tp_group: ProcessGroup | None = None,
    variant: LayerVariant | None = None,
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
    if task == "retrieval":
        dense = RetrievalModel(
            tokens,
            block,
            num_items=data.num_items,
            num_negatives=task_args.num_negatives,
            negative_sampling=task_args.negative_sampling,
            temperature=task_args.temperature,
            l2_norm_eps=task_args.l2_norm_eps,
            min_item_id=data.min_item_id,
            max_item_seqlen=data.max_item_seqlen,
            tp_group=tp_group,
        )
        keys = data.feature_names + ([dense.negatives_feature] if dense.uses_negatives_key else [])
        return RetrievalRecommender(embedding_module, dense, keys)
    raise ValueError(f"task {task!r} is not 'ranking' or 'retrieval'")


__all__ = [
    "DTYPES",
    "LayerVariant",
    "ModelDataInfo",
    "build_block",
    "build_model",
    "build_token_builder",
]
