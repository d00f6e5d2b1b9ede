"""SASRec as a block of this trainer: causal softmax self-attention over the token sequence.

Legend: T jagged tokens, B samples, W padded width (the longest token sequence), D hidden
width, NH heads of width d, n_b tokens of sample b, c_b its candidate tokens.

``NetworkArgs.architecture = "sasrec"`` puts :class:`SASRecBlock` where the HSTU block sits:
the same token builder before it (the item table's rows, scaled by sqrt(D)), the same
retrieval head after it (the state of history item j is the query for item j + 1; items
scored through the same table; the same losses and negatives), so only the sequence encoder
differs. Its contract is :class:`hstu.model.hstu_block.HSTUBlock`'s: jagged tokens [T, D]
and offsets in, jagged states [T, D] out.

The layer follows the eSASRec study (RecSys 2025, blondered/transformer_benchmark: SASRec with
LiGR layers and sampled softmax), docs/model.md "SASRec":

    h = LN(x);  x = x + g_a(x) * Dropout(W_o SDPA_causal(h W_q, h W_k, h W_v))
    h = LN(x);  x = x + g_f(x) * Dropout(FFN(h))
    g(x) = sigmoid(W_g x + b_g) (LiGR's gated residual; 1 with ``gated_residual=False``)
    FFN(h) = W_2 (SiLU(h W_1) * h W_3) (SwiGLU, inner width ``ffn_multiplier`` x D, no bias),
             or W_2 act(h W_1 + b_1) + b_2 for "gelu" / "relu" (the original SASRec's)

pre-norm, with a final LayerNorm after the last layer. The input is
Dropout(x * sqrt(D) + P[pos]) with learned absolute positions counted from each sample's first
token (candidates share the first candidate's, as in the HSTU block), so training and
evaluation queries of the same history length sit at the same position.

Attention is ``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True``
(dropout on the attention weights in training) over every sample padded to W tokens: the
padding sits after each sample's real tokens, so under the causal mask no real token sees it,
and padded rows are never read back. The same padded computation (:meth:`SASRecBlock.encode_padded`)
is what :class:`SASRecInference` exports with ``torch.export`` for serving.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hstu.model.jagged import index_within, positions_within, segment_ids

FFN_ACTIVATIONS = ("swiglu", "gelu", "relu")


class SASRecLayer(nn.Module):
    """One pre-norm transformer layer on padded tokens [B, W, D] (module docstring)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        ffn_activation: str = "swiglu",
        ffn_multiplier: int = 4,
        gated_residual: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if ffn_activation not in FFN_ACTIVATIONS:
            raise ValueError(f"ffn_activation must be one of {FFN_ACTIVATIONS}, got {ffn_activation!r}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dropout = dropout
        self.ffn_activation = ffn_activation
        width = num_heads * head_dim
        inner = ffn_multiplier * hidden_size
        self.attn_norm = nn.LayerNorm(hidden_size, eps=norm_eps, dtype=dtype)
        self.qkv = nn.Linear(hidden_size, 3 * width, dtype=dtype)
        self.output = nn.Linear(width, hidden_size, dtype=dtype)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=norm_eps, dtype=dtype)
        swiglu = ffn_activation == "swiglu"
        self.ffn_in = nn.Linear(hidden_size, (2 if swiglu else 1) * inner, bias=not swiglu, dtype=dtype)
        self.ffn_out = nn.Linear(inner, hidden_size, bias=not swiglu, dtype=dtype)
        self.attn_gate = nn.Linear(hidden_size, hidden_size, dtype=dtype) if gated_residual else None
        self.ffn_gate = nn.Linear(hidden_size, hidden_size, dtype=dtype) if gated_residual else None

    def attention(self, h: Tensor) -> Tensor:
        """Causal multi-head softmax attention of normalised tokens h [B, W, D] ->
        [B, W, NH*d] (before the output projection)."""
        bsz, width = h.shape[0], h.shape[1]
        q, k, v = (
            self.qkv(h).view(bsz, width, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )  # each [B, NH, W, d]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(bsz, width, self.num_heads * self.head_dim)

    def ffn(self, h: Tensor) -> Tensor:
        z = self.ffn_in(h)
        if self.ffn_activation == "swiglu":
            gate, up = z.chunk(2, dim=-1)
            z = F.silu(gate) * up
        elif self.ffn_activation == "gelu":
            z = F.gelu(z)
        else:
            z = F.relu(z)
        return self.ffn_out(F.dropout(z, self.dropout, self.training))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, W, D] -> [B, W, D]."""
        a = F.dropout(self.output(self.attention(self.attn_norm(x))), self.dropout, self.training)
        x = x + (a if self.attn_gate is None else torch.sigmoid(self.attn_gate(x)) * a)
        f = F.dropout(self.ffn(self.ffn_norm(x)), self.dropout, self.training)
        return x + (f if self.ffn_gate is None else torch.sigmoid(self.ffn_gate(x)) * f)


class SASRecBlock(nn.Module):
    """x -> Dropout(x * sqrt(D) + pos_emb) -> num_layers x SASRecLayer -> LayerNorm, with
    HSTUBlock's forward contract (jagged in and out; module docstring)."""

    attn_truncation_layers = 0  # read by hstu.model.encode (no attention truncation here)

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        ffn_activation: str = "swiglu",
        ffn_multiplier: int = 4,
        gated_residual: bool = True,
        num_position_buckets: int = 8192,
        use_position_embedding: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.num_position_buckets = num_position_buckets
        self.position_embedding = (
            nn.Embedding(num_position_buckets, hidden_size, dtype=dtype) if use_position_embedding else None
        )
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            SASRecLayer(
                hidden_size, num_heads, head_dim, dropout=dropout, norm_eps=norm_eps,
                ffn_activation=ffn_activation, ffn_multiplier=ffn_multiplier,
                gated_residual=gated_residual, dtype=dtype,
            )
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size, eps=norm_eps, dtype=dtype)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """Tokens x [..., D] and their positions (int64, same leading shape) -> the first
        layer's input (scaled, positions added, dropout in training)."""
        x = x.to(self.dtype) * math.sqrt(self.hidden_size)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions.clamp(max=self.num_position_buckets - 1))
        return self.input_dropout(x)

    def encode_padded(self, x: Tensor) -> Tensor:
        """The layers and the final norm on embedded tokens [B, W, D], each sample's real
        tokens first (padding after them is invisible to them under the causal mask)."""
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)

    def forward(
        self,
        x: Tensor,
        offsets: Tensor,
        max_seqlen: int,
        num_contextual: Tensor | None = None,
        num_targets: Tensor | None = None,
        timestamps: Tensor | None = None,
        query_timestamps: Tensor | None = None,
        truncated_sizes: tuple[int, int] | None = None,
    ) -> Tensor:
        """x [T, D] token embeddings, offsets int64 [B+1], ``max_seqlen`` W (>= every n_b)
        -> states [T, D]. Contextual tokens, timestamps and the query time are not read
        (plain causal attention; no time bias)."""
        total = x.shape[0]
        x = self.embed(x, positions_within(offsets, num_targets, total))
        lengths = offsets[1:] - offsets[:-1]
        bsz, width = lengths.numel(), max_seqlen
        # each real token's slot b * W + j (j < n_b), in token order
        dest = segment_ids(lengths, total) * width + index_within(lengths, total)
        padded = x.new_zeros(bsz * width, x.shape[1]).index_copy(0, dest, x)
        states = self.encode_padded(padded.view(bsz, width, -1))
        return states.reshape(bsz * width, -1).index_select(0, dest)


def build_sasrec_block(network_args: Any) -> SASRecBlock:
    """SASRecBlock from NetworkArgs (docs/model.md "SASRec" lists the fields it reads)."""
    from hstu.model.hstu_layer import DTYPES

    return SASRecBlock(
        network_args.num_layers,
        network_args.hidden_size,
        network_args.num_attention_heads,
        network_args.kv_channels,
        dropout=network_args.hidden_dropout,
        norm_eps=network_args.norm_epsilon,
        ffn_activation=getattr(network_args, "sasrec_ffn_activation", "swiglu"),
        ffn_multiplier=getattr(network_args, "sasrec_ffn_multiplier", 4),
        gated_residual=getattr(network_args, "sasrec_gated_residual", True),
        num_position_buckets=network_args.num_position_buckets,
        use_position_embedding=getattr(network_args, "use_position_embedding", True),
        dtype=DTYPES[network_args.dtype_str],
    )


def sasrec_step_flops(seqlens: Tensor, network_args: Any) -> float:
    """Forward + backward FLOPs of the SASRec block for one batch, counting each sample's real
    tokens (seqlens [B]) as the HSTU count does (padding not counted). Per layer, forward:
    2·T·D·3Hd (Q/K/V) + 2·T·Hd·D (W_o) + 4·Hd·P (Q Kᵀ and A V over the P = n(n+1)/2 causal
    pairs of each sample) + the feed-forward network (2·T·D·I·(3 with SwiGLU, else 2), I its
    inner width) + 2·2·T·D·D for the two residual gates. Backward is twice the forward."""
    n = network_args
    d_model, hd = n.hidden_size, n.num_attention_heads * n.kv_channels
    inner = getattr(n, "sasrec_ffn_multiplier", 4) * d_model
    swiglu = getattr(n, "sasrec_ffn_activation", "swiglu") == "swiglu"
    tokens = float(seqlens.sum())
    pairs = float((seqlens.double() * (seqlens.double() + 1) / 2).sum())
    per_layer = (
        2 * tokens * d_model * 3 * hd + 2 * tokens * hd * d_model + 4 * hd * pairs
        + 2 * tokens * d_model * inner * (3 if swiglu else 2)
        + (4 * tokens * d_model * d_model if getattr(n, "sasrec_gated_residual", True) else 0.0)
    )
    return 3.0 * n.num_layers * per_layer


# ------------------------------------------------------------------------------ serving


class _Projections(nn.Module):
    """Holds ``projections`` under the trainer's TokenBuilder name (state-dict compatible)."""

    def __init__(self, dims: dict[str, int], hidden_size: int) -> None:
        super().__init__()
        self.projections = nn.ModuleDict(
            {name: nn.Linear(dim, hidden_size, bias=False) for name, dim in dims.items()}
        )


class SASRecInference(nn.Module):
    """The trained SASRec retrieval dense part on the padded layout the artifact feeds
    (hstu.serving.artifact.pad_inputs), state-dict compatible with the trainer's
    RetrievalModel around a :class:`SASRecBlock`; exportable with ``torch.export``.

    forward(items [B, L, D_item], item_lengths [B], num_candidates [B], timestamps=None,
    actions=None, contextual=None) -> the L2-normalised query [B, d] of each sample's last
    history item (projected to the item dim d where ``query_projection``). Item tokens only
    (no action or contextual tokens): :func:`inference_config` refuses the others.

    ``cfg`` (JSON-able): task ("retrieval"), architecture ("sasrec"), hidden_size, num_layers,
    num_heads, head_dim, dropout, norm_eps, ffn_activation, ffn_multiplier, gated_residual,
    num_position_buckets, use_position_embedding, projections, item_feature_name,
    l2_norm_eps, query_projection (absent: none), and the keys the artifact reads.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.token_builder = _Projections(dict(cfg["projections"]), cfg["hidden_size"])
        self.block = SASRecBlock(
            cfg["num_layers"], cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"],
            dropout=float(cfg["dropout"]), norm_eps=float(cfg["norm_eps"]),
            ffn_activation=cfg["ffn_activation"], ffn_multiplier=int(cfg["ffn_multiplier"]),
            gated_residual=bool(cfg["gated_residual"]),
            num_position_buckets=int(cfg["num_position_buckets"]),
            use_position_embedding=bool(cfg["use_position_embedding"]),
        )
        if cfg.get("query_projection"):
            self.query_projection = nn.Linear(cfg["hidden_size"], int(cfg["query_projection"]), bias=False)

    def forward(
        self,
        items: Tensor,
        item_lengths: Tensor,
        num_candidates: Tensor,
        timestamps: Tensor | None = None,
        actions: Tensor | None = None,
        contextual: Tensor | None = None,
    ) -> Tensor:
        name = self.cfg["item_feature_name"]
        tokens = items.float()
        if name in self.token_builder.projections:
            tokens = self.token_builder.projections[name](tokens)
        width = tokens.shape[1]
        hist = item_lengths - num_candidates  # [B]
        slot = torch.arange(width, device=items.device).unsqueeze(0)  # [1, L]
        positions = torch.minimum(slot, hist.unsqueeze(1))  # candidates share the first's
        states = self.block.encode_padded(self.block.embed(tokens, positions))
        # the last history item's state (a sample without history: its last token, as the trainer)
        last = torch.where(hist > 0, hist - 1, item_lengths - 1).clamp(min=0)
        query = states.gather(1, last.view(-1, 1, 1).expand(-1, 1, states.shape[-1])).squeeze(1)
        if self.cfg.get("query_projection"):
            query = self.query_projection(query)
        return F.normalize(query, p=2.0, dim=-1, eps=float(self.cfg["l2_norm_eps"]))


def inference_config(model: nn.Module, cfg: Any, info: Any) -> dict[str, Any]:
    """The JSON-able description :class:`SASRecInference` is built from (the trainer's
    RetrievalModel ``model.dense_module`` around a SASRecBlock); raises ValueError for what
    the padded inference model does not take (ranking, action or contextual tokens)."""
    dense = model.dense_module
    block, tb = dense.block, dense.token_builder
    if cfg.task != "retrieval":
        raise ValueError('NetworkArgs.architecture="sasrec" exports retrieval models only')
    if info.action_feature_name is not None or tb.contextual_feature_names:
        raise ValueError(
            'NetworkArgs.architecture="sasrec" exports item tokens only (DatasetArgs.action_tokens '
            "= False, no contextual features)"
        )
    layer = block.layers[0]
    out: dict[str, Any] = {
        "task": "retrieval",
        "architecture": "sasrec",
        "hidden_size": block.hidden_size,
        "num_layers": len(block.layers),
        "num_heads": layer.num_heads,
        "head_dim": layer.head_dim,
        "dropout": layer.dropout,
        "norm_eps": layer.attn_norm.eps,
        "ffn_activation": layer.ffn_activation,
        "ffn_multiplier": layer.ffn_out.in_features // block.hidden_size,
        "gated_residual": layer.attn_gate is not None,
        "num_position_buckets": block.num_position_buckets,
        "use_position_embedding": block.position_embedding is not None,
        # what the artifact reads of every model (no time, actions or contextual features)
        "relative_attention_bias": False,
        "rab_use_time": False,
        "rab_query_time": False,
        "is_causal": True,
        "num_contextual": 0,
        "has_action": False,
        "projections": {name: proj.in_features for name, proj in tb.projections.items()},
        "item_feature_name": tb.item_feature_name,
        "action_feature_name": None,
        "contextual_feature_names": [],
        "max_item_seqlen": dense.max_item_seqlen,
        "l2_norm_eps": dense.l2_norm_eps,
        "num_items": dense.num_items,
        "min_item_id": dense.min_item_id,
    }
    if dense.query_projection is not None:
        out["query_projection"] = dense.query_projection.out_features
    return out


__all__ = [
    "FFN_ACTIVATIONS",
    "SASRecBlock",
    "SASRecInference",
    "SASRecLayer",
    "build_sasrec_block",
    "inference_config",
    "sasrec_step_flops",
]
