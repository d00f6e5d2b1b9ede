"""A stack of HSTU layers with the input scaling and learned position embedding.

Legend: T jagged tokens, B samples, D hidden width, n_b tokens of sample b, c_b its candidate
(target) tokens.

Positions: token t of sample b gets position min(t, n_b - c_b) (candidates share the position of
the first candidate, so their order carries nothing), clamped to ``num_position_buckets - 1``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed import ProcessGroup

from hstu.model.hstu_layer import HSTULayer
from hstu.model.jagged import positions_within


class HSTUBlock(nn.Module):
    """x -> Dropout(x * sqrt(D) + pos_emb) -> num_layers x HSTULayer.

    Every argument after ``num_position_buckets`` is passed to each :class:`HSTULayer`
    (see its docstring); ``dropout`` is used on the input embeddings and inside the layers.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        num_position_buckets: int = 8192,
        use_position_embedding: bool = True,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        kernel_backend: str = "pytorch",
        is_causal: bool = True,
        target_group_size: int = 1,
        alpha: float | None = None,
        attn_scaling_seqlen: int | None = None,
        uvqk_bias: bool = True,
        norm_affine: bool = True,
        output_bias: bool = False,
        relative_attention_bias: bool = False,
        rab_num_positions: int = 256,
        rab_use_time: bool = True,
        recompute_input_layernorm: bool = False,
        recompute_input_silu: bool = False,
        dtype: torch.dtype = torch.float32,
        tp_group: ProcessGroup | None = None,
        strict_kernel: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.num_position_buckets = num_position_buckets
        self.position_embedding = (
            nn.Embedding(num_position_buckets, hidden_size, dtype=dtype)
            if use_position_embedding
            else None
        )
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            HSTULayer(
                hidden_size,
                num_heads,
                head_dim,
                dropout=dropout,
                norm_eps=norm_eps,
                kernel_backend=kernel_backend,
                is_causal=is_causal,
                target_group_size=target_group_size,
                alpha=alpha,
                attn_scaling_seqlen=attn_scaling_seqlen,
                uvqk_bias=uvqk_bias,
                norm_affine=norm_affine,
                output_bias=output_bias,
                relative_attention_bias=relative_attention_bias,
                rab_num_positions=rab_num_positions,
                rab_use_time=rab_use_time,
                recompute_input_layernorm=recompute_input_layernorm,
                recompute_input_silu=recompute_input_silu,
                dtype=dtype,
                tp_group=tp_group,
                strict_kernel=strict_kernel,
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        max_seqlen: int,
        num_contextual: torch.Tensor | None = None,
        num_targets: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, D] token embeddings, offsets int64 [B+1] -> [T, D] in ``dtype``."""
        x = x.to(self.dtype) * math.sqrt(self.hidden_size)
        if self.position_embedding is not None:
            pos = positions_within(offsets, num_targets).clamp(max=self.num_position_buckets - 1)
            x = x + self.position_embedding(pos)
        x = self.input_dropout(x)
        for layer in self.layers:
            x = layer(x, offsets, max_seqlen, num_contextual, num_targets, timestamps)
        return x


__all__ = ["HSTUBlock"]
