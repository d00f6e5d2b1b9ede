"""SASRec as a block of this trainer: causal softmax self-attention over the token sequence,
in the HSTU block's place (same token builder, retrieval head and losses; docs/model.md
"SASRec").

Legend: T jagged tokens, B samples, W padded width (the longest token sequence), D hidden
width, NH heads of width d, n_b tokens of sample b, c_b its candidate tokens.

The layer (eSASRec's LiGR layer), pre-norm, with a final LayerNorm after the last layer:

    h = LN(x);  x = x + g_a(x) * Dropout(W_o SDPA_causal(h W_q, h W_k, h W_v))
    h = LN(x);  x = x + g_f(x) * Dropout(FFN(h))
    g(x) = sigmoid(W_g x + b_g) (LiGR's gated residual; 1 with ``gated_residual=False``)
    FFN(h) = W_2 (SiLU(h W_1) * h W_3) (SwiGLU, inner width ``ffn_multiplier`` x D, no bias),
             or W_2 act(h W_1 + b_1) + b_2 for "gelu" / "relu" (the original SASRec's)

The input is the HSTU block's (:class:`hstu.model.hstu_block.SequenceBlock`). Layout
(``sequence_layout``): "jagged" (the default) runs the projections, norms, gates and
feed-forward network on the T real tokens only, and the attention per chunk of samples of
similar lengths (:mod:`hstu.ops.softmax_attention`), so the cost follows the tokens;
"padded" runs every layer over every sample padded to W tokens (the padding after its real
tokens: under the causal mask no real token sees it, and padded rows are never read back).
Both compute the same function at the real tokens. The padded computation
(:meth:`SASRecBlock.encode_padded`) is also what :class:`SASRecInference` exports for serving.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hstu.model.hstu_block import SequenceBlock, to_padded
from hstu.model.hstu_layer import NetworkOptions
from hstu.ops.dropout import dropout
from hstu.ops.softmax_attention import CausalChunks, causal_softmax_attention, plan_causal_chunks

FFN_ACTIVATIONS = ("swiglu", "gelu", "relu")


@dataclass(frozen=True)
class SASRecOptions(NetworkOptions):
    """Every knob of a SASRec layer (module docstring); NetworkArgs sets them
    (:meth:`from_network_args`: hidden_dropout, norm_epsilon, the sasrec_* fields, dtype_str).

    Fields:
        dropout: on the residual branches and the FFN's inner activations (the block also
            uses it on its input tokens, and SDPA on the attention weights in training).
        norm_eps: epsilon of the layer norms.
        ffn_activation: "swiglu" | "gelu" | "relu".
        ffn_multiplier: the FFN's inner width as a multiple of D.
        gated_residual: LiGR's sigmoid gates on both residual branches.
        dtype: parameter and compute dtype.
    """

    dropout: float = 0.0
    norm_eps: float = 1e-5
    ffn_activation: str = "swiglu"
    ffn_multiplier: int = 4
    gated_residual: bool = True
    dtype: torch.dtype = torch.float32

    _NETWORK_NAMES: ClassVar[dict[str, str]] = {
        "dropout": "hidden_dropout", "norm_eps": "norm_epsilon", "dtype": "dtype_str",
        **{k: f"sasrec_{k}" for k in ("ffn_activation", "ffn_multiplier", "gated_residual")},
    }

    def __post_init__(self) -> None:
        if self.ffn_activation not in FFN_ACTIVATIONS:
            raise ValueError(
                f"ffn_activation must be one of {FFN_ACTIVATIONS}, got {self.ffn_activation!r}"
            )


class SASRecLayer(nn.Module):
    """One pre-norm transformer layer (module docstring) on padded tokens [B, W, D], or on
    jagged tokens [T, D] with their batch's chunk plan; ``options`` with keyword
    ``overrides`` of single fields, as HSTULayer's."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        options: SASRecOptions | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        o = replace(options or SASRecOptions(), **overrides)
        self.options = o
        norm_eps, dtype = o.norm_eps, o.dtype
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dropout = o.dropout
        self.ffn_activation = o.ffn_activation
        width = num_heads * head_dim
        inner = o.ffn_multiplier * hidden_size
        self.attn_norm = nn.LayerNorm(hidden_size, eps=norm_eps, dtype=dtype)
        self.qkv = nn.Linear(hidden_size, 3 * width, dtype=dtype)
        self.output = nn.Linear(width, hidden_size, dtype=dtype)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=norm_eps, dtype=dtype)
        swiglu = o.ffn_activation == "swiglu"
        self.ffn_in = nn.Linear(
            hidden_size, (2 if swiglu else 1) * inner, bias=not swiglu, dtype=dtype
        )
        self.ffn_out = nn.Linear(inner, hidden_size, bias=not swiglu, dtype=dtype)
        gated = o.gated_residual
        self.attn_gate = nn.Linear(hidden_size, hidden_size, dtype=dtype) if gated else None
        self.ffn_gate = nn.Linear(hidden_size, hidden_size, dtype=dtype) if gated else None

    def attention(self, h: Tensor, plan: CausalChunks | None = None) -> Tensor:
        """Causal multi-head softmax attention of normalised tokens (before the output
        projection): h [B, W, D] padded -> [B, W, NH*d]; with ``plan``, h [T, D] jagged ->
        [T, NH*d]."""
        dropout_p = self.dropout if self.training else 0.0
        width = self.num_heads * self.head_dim
        if plan is not None:
            qkv = self.qkv(h).view(h.shape[0], 3, self.num_heads, self.head_dim)
            return causal_softmax_attention(qkv, plan, dropout_p).reshape(h.shape[0], width)
        bsz, seqlen = h.shape[0], h.shape[1]
        qkv = self.qkv(h).view(bsz, seqlen, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, NH, W, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(bsz, seqlen, width)

    def ffn(self, h: Tensor) -> Tensor:
        z = self.ffn_in(h)
        if self.ffn_activation == "swiglu":
            gate, up = z.chunk(2, dim=-1)
            z = F.silu(gate) * up
        elif self.ffn_activation == "gelu":
            z = F.gelu(z)
        else:
            z = F.relu(z)
        return self.ffn_out(dropout(z, self.dropout, self.training))

    def forward(self, x: Tensor, plan: CausalChunks | None = None) -> Tensor:
        """x [B, W, D] -> [B, W, D]; with ``plan`` (:func:`plan_causal_chunks` of x's
        offsets), x [T, D] -> [T, D]."""
        a = self.attention(self.attn_norm(x), plan)
        a = dropout(self.output(a), self.dropout, self.training)
        x = x + (a if self.attn_gate is None else torch.sigmoid(self.attn_gate(x)) * a)
        f = dropout(self.ffn(self.ffn_norm(x)), self.dropout, self.training)
        return x + (f if self.ffn_gate is None else torch.sigmoid(self.ffn_gate(x)) * f)


class SASRecBlock(SequenceBlock):
    """x -> Dropout(x * sqrt(D) + pos_emb) -> num_layers x SASRecLayer -> LayerNorm: the
    arguments and forward contract of :class:`SequenceBlock` (``options``:
    :class:`SASRecOptions`), and ``sequence_layout``: "jagged" or "padded" (module
    docstring); contextual tokens, timestamps and the query time are not read (plain causal
    attention; no time bias)."""

    attn_truncation_layers = 0  # read by hstu.model.encode (no attention truncation here)
    options_type = SASRecOptions
    layer_type = SASRecLayer

    def __init__(self, *args: Any, sequence_layout: str = "jagged", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if sequence_layout not in ("jagged", "padded"):
            raise ValueError(
                f'sequence_layout must be "jagged" or "padded", got {sequence_layout!r}'
            )
        self.sequence_layout = sequence_layout
        self.final_norm = nn.LayerNorm(
            self.hidden_size, eps=self.options.norm_eps, dtype=self.options.dtype
        )

    def encode_padded(self, x: Tensor) -> Tensor:
        """The layers and the final norm on embedded tokens [B, W, D], each sample's real
        tokens first (padding after them is invisible to them under the causal mask)."""
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)

    def encode(self, x: Tensor, offsets: Tensor, max_seqlen: int, *unread: Any) -> Tensor:
        """Embedded tokens x [T, D], offsets int64 [B+1], ``max_seqlen`` W (>= every n_b) ->
        states [T, D], in the block's ``sequence_layout``."""
        if self.sequence_layout == "jagged":
            plan = plan_causal_chunks(offsets, self.layers[0].num_heads) if self.layers else None
            for layer in self.layers:
                x = layer(x, plan)
            return self.final_norm(x)
        padded, dest = to_padded(x, offsets, max_seqlen)
        states = self.encode_padded(padded.view(-1, max_seqlen, x.shape[1]))
        return states.reshape(-1, x.shape[1]).index_select(0, dest)


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


# the options an export records (the served model computes in float32)
_SERVED_OPTIONS = tuple(f.name for f in fields(SASRecOptions) if f.name != "dtype")


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
        options = SASRecOptions(**{k: cfg[k] for k in _SERVED_OPTIONS})
        self.block = SASRecBlock(
            cfg["num_layers"], cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"], options,
            num_position_buckets=int(cfg["num_position_buckets"]),
            use_position_embedding=bool(cfg["use_position_embedding"]),
        )
        if cfg.get("query_projection"):
            self.query_projection = nn.Linear(
                cfg["hidden_size"], int(cfg["query_projection"]), bias=False
            )

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
        # candidates share the first's position
        states = self.block.encode_padded(self.block.embed(tokens, slot, hist.unsqueeze(1)))
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
        **{k: getattr(layer.options, k) for k in _SERVED_OPTIONS},
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
    "SASRecOptions",
    "inference_config",
    "sasrec_step_flops",
]
