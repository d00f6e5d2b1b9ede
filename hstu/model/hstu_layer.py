"""One HSTU layer (docs/model.md "Layer math"), optionally tensor-parallel with Megatron-core.

Legend: T jagged tokens of the batch, B samples, D hidden width, H heads (H_r on this TP
rank), d head width (kv_channels), P TP group size.

    n          = LayerNorm(x)
    U, V, Q, K = split(SiLU(n W_uvqk + b))
    A          = SiLU(alpha * Q K^T [+ rab]) / N, masked
    O          = A V
    x          = x + Dropout(LayerNorm(O) * U) W_o [+ b_o]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Self

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from hstu.model.tensor_parallel import (
    all_reduce_sum,
    make_parallel_config,
    shard_output_weight,
    shard_uvqk,
    tp_rank_of,
    tp_size_of,
)
from hstu.ops import NUM_TIME_BUCKETS, RelativeAttentionBias, hstu_attention
from hstu.ops.dropout import Dropout
from hstu.ops.masks import check_mask_convention, check_window

# ----------------------------------------------------- input LayerNorm + W_uvqk + SiLU


class _NormLinearSiLU(torch.autograd.Function):
    """SiLU(LayerNorm(x) W^T + b) with a hand-written backward.

    Stores x-hat (or only x with ``recompute_norm``) and the pre-activation h (or recomputes
    it from x-hat with ``recompute_silu``, one extra matmul). The same code runs whatever
    the flags, and recomputation repeats the forward's exact operations, so the flags change
    memory, never the numbers.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,  # [T, D]
        ln_weight: torch.Tensor | None,  # [D]
        ln_bias: torch.Tensor | None,  # [D]
        weight: torch.Tensor,  # [F, D]
        bias: torch.Tensor | None,  # [F]
        eps: float,
        recompute_norm: bool,
        recompute_silu: bool,
        tp_group: ProcessGroup | None,
    ) -> torch.Tensor:
        xhat, mean, rstd = _normalise(x, eps)
        normed = _affine(xhat, ln_weight, ln_bias)
        h = F.linear(normed, weight, bias)
        ctx.recompute_norm, ctx.tp_group = recompute_norm, tp_group
        ctx.save_for_backward(
            x if recompute_norm else xhat,
            mean,
            rstd,
            ln_weight,
            ln_bias,
            weight,
            bias,
            None if recompute_silu else h,
        )
        return F.silu(h)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_or_xhat, mean, rstd, ln_weight, ln_bias, weight, bias, h = ctx.saved_tensors
        if ctx.recompute_norm:
            xhat = ((_stats_dtype(x_or_xhat) - mean) * rstd).to(x_or_xhat.dtype)
        else:
            xhat = x_or_xhat
        normed = _affine(xhat, ln_weight, ln_bias)
        if h is None:
            h = F.linear(normed, weight, bias)
        # d SiLU(h) / dh = sig * (1 + h * (1 - sig)), in one fused kernel; [T, F]
        grad_h = torch.ops.aten.silu_backward(grad_out, h)
        grad_weight = grad_h.t().mm(normed)
        grad_bias = grad_h.sum(0) if bias is not None else None
        grad_normed = grad_h.mm(weight)  # [T, D]
        if ctx.tp_group is not None:
            # the norm is replicated over the TP group, each rank's heads give part of its grad
            dist.all_reduce(grad_normed, group=ctx.tp_group)
        grad_ln_weight = grad_ln_bias = None
        if ln_weight is not None:
            grad_ln_weight = (grad_normed * xhat).sum(0)
            grad_ln_bias = grad_normed.sum(0) if ln_bias is not None else None
            grad_xhat = grad_normed * ln_weight
        else:
            grad_xhat = grad_normed
        gx = _stats_dtype(grad_xhat)
        xh = _stats_dtype(xhat)
        grad_x = rstd * (gx - gx.mean(-1, keepdim=True) - xh * (gx * xh).mean(-1, keepdim=True))
        grads = grad_x.to(xhat.dtype), grad_ln_weight, grad_ln_bias, grad_weight, grad_bias
        return (*grads, None, None, None, None)  # eps, the recompute flags, tp_group


def _stats_dtype(x: torch.Tensor) -> torch.Tensor:
    """Statistics in at least float32 (half inputs are upcast, float64 kept)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xf = _stats_dtype(x)
    # one fused kernel for x-hat, mean and rstd ([T, 1] each), same as the three-op form
    xhat, mean, rstd = torch.native_layer_norm(xf, (xf.shape[-1],), None, None, eps)
    return xhat.to(x.dtype), mean, rstd


def _affine(
    xhat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    if weight is None:
        return xhat
    return xhat * weight + bias if bias is not None else xhat * weight


def norm_linear_silu(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    recompute_norm: bool = False,
    recompute_silu: bool = False,
    tp_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """SiLU(LayerNorm(x) W^T + b): x [T, D], W [F, D] (this rank's rows) -> [T, F].

    With ``tp_group``, x and the norm are replicated over the group and W is column-parallel:
    the gradient reaching the norm is summed over the group (what Megatron's
    copy-to-tensor-parallel-region does for a ColumnParallelLinear input).
    """
    return _NormLinearSiLU.apply(
        x, ln_weight, ln_bias, weight, bias, eps, recompute_norm, recompute_silu, tp_group
    )


# ------------------------------------------------------------------------------ the layer


class NetworkOptions:
    """Base of the option dataclasses a NetworkArgs sets (LayerOptions, sasrec.SASRecOptions):
    a field takes the NetworkArgs field of its name, or of the name ``_NETWORK_NAMES`` gives."""

    _NETWORK_NAMES: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_network_args(cls, network_args: Any, **overrides: Any) -> Self:
        """The options a NetworkArgs sets (fields it lacks keep their defaults), then
        ``overrides``."""
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            name = cls._NETWORK_NAMES.get(f.name, f.name)
            if hasattr(network_args, name):
                values[f.name] = getattr(network_args, name)
        if isinstance(values.get("dtype"), str):
            values["dtype"] = DTYPES[values["dtype"]]
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class LayerOptions(NetworkOptions):
    """Every knob of an HSTU layer, in one place. A new layer flag is one field here (and,
    to set it from gin, a NetworkArgs field of the same name: :meth:`from_network_args` picks
    it up by name).

    Fields:
        dropout: dropout on LayerNorm(O) * U (the block also uses it on its input tokens).
        norm_eps: epsilon of both layer norms.
        kernel_backend: attention backend passed to ``hstu.ops.hstu_attention``.
        is_causal: causal mask over the history.
        mask_convention: "hstu" | "peer" (``hstu.ops.masks``; docs/model.md "Mask
            conventions").
        max_attn_len, min_full_attn_seq_len: the semi-local window W and M (``hstu.ops.masks``;
            0: full attention), passed to the kernel.
        target_group_size: candidates per target group.
        alpha: attention logit scale; None means 1/sqrt(d). The research model uses 1.
        attn_scaling_seqlen: N dividing SiLU(.); None means the ``max_seqlen`` of the call.
        uvqk_bias: bias on W_uvqk (the research model has none).
        norm_affine: learnable LayerNorm scale and shift (the research model has none).
        output_bias: bias on W_o (the research model has one).
        relative_attention_bias: add rab = w_p[P-1+j-i] (+ w_t[bucket(t[i+1]-t[j])]).
        rab_num_positions: P of the position table (2P-1 rows); distances beyond clamp.
        rab_use_time: include the log-bucketed time term (needs timestamps in forward).
        recompute_input_layernorm: recompute LayerNorm(x) in backward instead of storing it.
        recompute_input_silu: recompute n W_uvqk + b in backward instead of storing it.
        dtype: parameter and compute dtype.
        strict_kernel: make a kernel fallback an error instead of a one-line message.
        compile: torch.compile the output tail (LayerNorm(O) * U, dropout, W_o, residual)
            with dynamic shapes; the input projection and the attention stay eager.
            Without tensor parallelism only.
    """

    dropout: float = 0.0
    norm_eps: float = 1e-5
    kernel_backend: str = "pytorch"
    is_causal: bool = True
    mask_convention: str = "hstu"
    max_attn_len: int = 0
    min_full_attn_seq_len: int = 0
    target_group_size: int = 1
    alpha: float | None = None
    attn_scaling_seqlen: int | None = None
    uvqk_bias: bool = True
    norm_affine: bool = True
    output_bias: bool = False
    relative_attention_bias: bool = False
    rab_num_positions: int = 256
    rab_use_time: bool = True
    recompute_input_layernorm: bool = False
    recompute_input_silu: bool = False
    dtype: torch.dtype = torch.float32
    strict_kernel: bool = False
    compile: bool = False

    # NetworkArgs names that differ from the field names (the gin surface predates this class)
    _NETWORK_NAMES: ClassVar[dict[str, str]] = {
        "dropout": "hidden_dropout", "norm_eps": "norm_epsilon", "alpha": "attention_alpha",
        "dtype": "dtype_str",
    }


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def research_options(padded_width: int) -> dict[str, Any]:
    """The paper's research model (use with norm eps 1e-6): rab, alpha 1, N = padded width,
    no W_uvqk bias, no affine norms, a bias on W_o."""
    return {
        "relative_attention_bias": True,
        "rab_use_time": True,
        "alpha": 1.0,
        "attn_scaling_seqlen": padded_width,
        "uvqk_bias": False,
        "norm_affine": False,
        "output_bias": True,
    }


class HSTULayer(nn.Module):
    """One HSTU layer over jagged tokens.

    Args:
        hidden_size: D.
        num_heads: H over the whole TP group (H / P on each rank).
        head_dim: d (kv_channels), the width of each head of U, V, Q and K.
        options: the layer's knobs (:class:`LayerOptions`); keyword ``overrides`` replace
            single fields (``HSTULayer(D, H, d, dropout=0.1)``).
        tp_group: tensor-parallel group; None runs plain torch linears (no process group).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        options: LayerOptions | None = None,
        *,
        tp_group: ProcessGroup | None = None,
        **overrides: Any,
    ) -> None:
        o = replace(options or LayerOptions(), **overrides)
        if o.compile and tp_group is not None:
            raise ValueError(
                "NetworkArgs.compile=True compiles the single-rank layer tail; it is not "
                "supported with tensor_model_parallel_size > 1"
            )
        self.options = o
        check_mask_convention(o.mask_convention)
        check_window(o.max_attn_len, o.min_full_attn_seq_len)
        super().__init__()
        self.tp_group = tp_group
        tp_size, tp_rank = tp_size_of(tp_group), tp_rank_of(tp_group)
        if num_heads % tp_size != 0:
            raise ValueError(f"{num_heads} heads do not split over a TP group of {tp_size}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.local_heads = num_heads // tp_size
        self.head_dim = head_dim
        # read by hstu.export and hstu.serving.model
        self.norm_eps = o.norm_eps
        self.is_causal = o.is_causal
        self.mask_convention = o.mask_convention
        self.max_attn_len = o.max_attn_len
        self.min_full_attn_seq_len = o.min_full_attn_seq_len
        self.target_group_size = o.target_group_size
        self.alpha = 1.0 / math.sqrt(head_dim) if o.alpha is None else o.alpha
        self.attn_scaling_seqlen = o.attn_scaling_seqlen
        # the window reaches the kernel only when set: a backend without one gets no such keys
        self._window = (
            {"max_attn_len": o.max_attn_len, "min_full_attn_seq_len": o.min_full_attn_seq_len}
            if o.max_attn_len > 0 else {}
        )
        self._compiled_tail = torch.compile(self._tail, dynamic=True) if o.compile else None
        local_width = self.local_heads * head_dim

        factory = {"dtype": o.dtype}
        if o.norm_affine:
            self.input_norm_weight = nn.Parameter(torch.ones(hidden_size, **factory))
            self.input_norm_bias = nn.Parameter(torch.zeros(hidden_size, **factory))
            # Output norm spans all H*d channels; each rank keeps its heads' slice.
            self.output_norm_weight = nn.Parameter(torch.ones(local_width, **factory))
            self.output_norm_bias = nn.Parameter(torch.zeros(local_width, **factory))
        else:
            for name in (
                "input_norm_weight",
                "input_norm_bias",
                "output_norm_weight",
                "output_norm_bias",
            ):
                self.register_parameter(name, None)

        # nn.Linear draws an init that Megatron (perform_initialization=False) does not;
        # restore the generator so both paths reach reset_parameters in the same RNG state.
        rng_state = torch.get_rng_state()
        if tp_group is None:
            self.uvqk = nn.Linear(hidden_size, 4 * local_width, bias=o.uvqk_bias, **factory)
            self.output = nn.Linear(local_width, hidden_size, bias=o.output_bias, **factory)
        else:
            from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
            from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

            config = make_parallel_config(tp_size, o.dtype)
            common = {"config": config, "init_method": _no_init, "skip_bias_add": False,
                      "tp_group": tp_group}
            self.uvqk = ColumnParallelLinear(hidden_size, 4 * num_heads * head_dim,
                                             bias=o.uvqk_bias, gather_output=False, **common)
            self.output = RowParallelLinear(num_heads * head_dim, hidden_size,
                                            bias=o.output_bias, input_is_parallel=True, **common)
            # Megatron marks its weights as shards only when it initialises them itself
            # (perform_initialization=False here); clipping and checkpoints rely on the marks.
            for weight, dim in ((self.uvqk.weight, 0), (self.output.weight, 1)):
                set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
            if o.norm_affine:
                for p in (self.output_norm_weight, self.output_norm_bias):
                    set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        torch.set_rng_state(rng_state)

        if o.relative_attention_bias:
            self.rab_pos_weights = nn.Parameter(torch.empty(2 * o.rab_num_positions - 1, **factory))
            self.rab_ts_weights = (
                nn.Parameter(torch.empty(NUM_TIME_BUCKETS, **factory)) if o.rab_use_time else None
            )
        else:
            self.rab_pos_weights = None
            self.rab_ts_weights = None
        self.dropout = Dropout(o.dropout)
        self.reset_parameters(tp_size, tp_rank)

    @torch.no_grad()
    def reset_parameters(self, tp_size: int = 1, tp_rank: int = 0) -> None:
        """Draws the TP=1 weights from the default generator and keeps this rank's shard.

        Every rank of a TP group must hold the same RNG state here (same seed), as with
        Megatron's CPU initialisation.
        """
        d, h, width = self.head_dim, self.num_heads, self.num_heads * self.head_dim
        dtype = self.uvqk.weight.dtype
        full_uvqk = nn.init.xavier_uniform_(torch.empty(4 * width, self.hidden_size))
        self.uvqk.weight.copy_(shard_uvqk(full_uvqk, h, d, tp_size, tp_rank).to(dtype))
        if self.uvqk.bias is not None:
            self.uvqk.bias.zero_()
        full_out = nn.init.xavier_uniform_(torch.empty(self.hidden_size, width))
        self.output.weight.copy_(shard_output_weight(full_out, tp_size, tp_rank).to(dtype))
        if self.output.bias is not None:
            self.output.bias.zero_()
        if self.rab_pos_weights is not None:
            nn.init.normal_(self.rab_pos_weights, std=0.02)
        if self.rab_ts_weights is not None:
            nn.init.normal_(self.rab_ts_weights, std=0.02)

    # -------------------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        max_seqlen: int,
        num_contextual: torch.Tensor | None = None,
        num_targets: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        *,
        query_timestamps: torch.Tensor | None = None,
        scaling_seqlen: int | None = None,
    ) -> torch.Tensor:
        """x [T, D] (replicated over the TP group), offsets int64 [B+1],
        num_contextual / num_targets int64 [B], timestamps int64 [T] -> [T, D];
        query_timestamps int64 [B]: the next time of each sample's last token (rab time term);
        scaling_seqlen: N when ``attn_scaling_seqlen`` is None (default ``max_seqlen``; the
        block passes its own under attention truncation, so N does not change with it)."""
        u, q, k, v = self.project(x)
        assert query_timestamps is None or self.rab_ts_weights is not None, "no rab time term"
        rab = None
        if self.rab_pos_weights is not None:
            pos_w, ts_w = self.rab_pos_weights, self.rab_ts_weights
            if self.tp_group is not None:
                from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

                # shared by all heads, so each rank's heads contribute part of its gradient
                pos_w = copy_to_tensor_model_parallel_region(pos_w, group=self.tp_group)
                if ts_w is not None:
                    ts_w = copy_to_tensor_model_parallel_region(ts_w, group=self.tp_group)
            if ts_w is not None and timestamps is None:
                raise ValueError("the time term of the relative attention bias needs timestamps")
            rab = RelativeAttentionBias(
                pos_w, ts_w, timestamps if ts_w is not None else None,
                query_timestamps if ts_w is not None else None,
            )

        attn = hstu_attention(
            q,
            k,
            v,
            offsets,
            max_seqlen,
            alpha=self.alpha,
            scaling_seqlen=self.attn_scaling_seqlen or scaling_seqlen or max_seqlen,
            causal=self.is_causal,
            num_contextual=num_contextual,
            num_targets=num_targets,
            target_group_size=self.target_group_size,
            rab=rab,
            mask_convention=self.mask_convention,
            backend=self.options.kernel_backend,
            strict=self.options.strict_kernel,
            **self._window,
        ).reshape(x.shape[0], -1)  # [T, H_r * d]
        return self.finish(x, attn, u)

    # The two halves of the layer around the attention, shared by every layout (the jagged
    # forward above, hstu.serving.model's padded one): a change to the layer math is made here.

    def project(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D] -> u [..., H_r * d] and q, k, v [..., H_r, d]:
        split(SiLU(LayerNorm(x) W_uvqk + b))."""
        uvqk = norm_linear_silu(
            x,
            self.input_norm_weight,
            self.input_norm_bias,
            self.uvqk.weight,
            self.uvqk.bias,
            self.norm_eps,
            self.options.recompute_input_layernorm,
            self.options.recompute_input_silu,
            self.tp_group,
        )  # [..., 4 * H_r * d]
        u, v, q, k = uvqk.split(self.local_heads * self.head_dim, dim=-1)
        shape = (*x.shape[:-1], self.local_heads, self.head_dim)
        return u, q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def finish(self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x + Dropout(LayerNorm(attn) * u) W_o [+ b_o]: x [..., D], attn and u
        [..., H_r * d] -> [..., D]."""
        if self.tp_group is None:
            tail = self._tail if self._compiled_tail is None else self._compiled_tail
            return tail(attn, u, x)
        normed = self._output_norm(attn)
        if self.training and self.dropout.p > 0:
            # a sharded activation: each rank masks its own heads from its own stream
            from hstu.model.rng import tensor_parallel_rng

            with tensor_parallel_rng():
                y = self.dropout(normed * u)
        else:
            y = self.dropout(normed * u)
        return x + self.output(y)[0]  # Megatron linears return (output, bias)

    def _tail(self, attn: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x + W_o Dropout(LayerNorm(attn) * u), one process (what ``compile`` compiles)."""
        return x + self.output(self.dropout(self._output_norm(attn) * u))

    def _output_norm(self, o: torch.Tensor) -> torch.Tensor:
        """LayerNorm over all H*d channels, of which this rank holds H_r*d."""
        if self.tp_group is None:
            return F.layer_norm(
                o, (o.shape[-1],), self.output_norm_weight, self.output_norm_bias, self.norm_eps
            )
        width = self.num_heads * self.head_dim
        of = _stats_dtype(o)
        mean = all_reduce_sum(of.sum(-1, keepdim=True), self.tp_group) / width
        centred = of - mean
        var = all_reduce_sum((centred * centred).sum(-1, keepdim=True), self.tp_group) / width
        normed = (centred * torch.rsqrt(var + self.norm_eps)).to(o.dtype)
        return _affine(normed, self.output_norm_weight, self.output_norm_bias)


def _no_init(weight: torch.Tensor) -> None:
    """Megatron init hook; HSTULayer.reset_parameters sets the weights."""


__all__ = [
    "DTYPES", "NUM_TIME_BUCKETS", "HSTULayer", "LayerOptions", "norm_linear_silu",
    "research_options",
]
