"""The dense model for inference: plain torch, padded batches, exportable with torch.export.

Legend: B samples, L item slots per sample (history then candidates, left-aligned, padded),
H[b] history items, C[b] candidates, X contextual features, A = 2 with action tokens else 1,
W = X + A*L token slots, D hidden width, NH heads of width d, n[b] = X + A*H[b] + C[b] real
tokens of sample b.

Same computation as the trainer's dense modules (hstu.model.tokens, hstu_block,
hstu_layer, the pytorch attention kernel, the heads) on a padded [B, W] layout instead of the
jagged one, so that shapes are symbolic in B and L and nothing depends on data in Python
(what torch.export needs). Token layout, positions, mask and relative attention bias follow
docs/model.md ("Token layout", "Layer math"); padded slots are masked out of attention and
never read back.

Ranking inference with a cached history (:meth:`InferenceHSTU.encode_history` then
:meth:`InferenceHSTU.score_candidates`): a history token never attends to a candidate, so the
history's per-layer keys and values do not depend on the candidates and are computed once;
K new candidates then cost K x (history tokens + own group) attention per layer. The one
exception is the time term of the relative attention bias, where the last history token reads
the next token's timestamp (the first candidate's): the cache takes that timestamp
(``next_timestamps``, the request time) when it is built.

Semi-local attention (``max_attn_len``, ``min_full_attn_seq_len``) is the same ``dense_mask``
the kernels follow. Attention truncation (``attn_truncation_layers`` k, ``attn_truncation_len``
T) runs layers k+1.. with the mask restricted to each sample's last T tokens (queries and keys)
and keeps the layer-k state of the tokens before them: the trainer's jagged slice, computed on
the padded width (the mask of a suffix is the full mask's block on it, positions only shift),
so it gives the trainer's numbers without its saving. The cached history refuses truncation
(which tokens are cut depends on the number of candidates).

Imports torch (and two torch-only helpers of hstu.ops) only: no torchrec, megatron or gin.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hstu.ops.masks import check_mask_convention, check_window, dense_mask
from hstu.ops.rab import time_bucket


def _layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim with the trainer's arithmetic (statistics in float32)."""
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    out = (x - mean) * rstd
    if weight is not None:
        out = out * weight + bias if bias is not None else out * weight
    return out


class _Layer(nn.Module):
    """Parameters named as in hstu.model.hstu_layer.HSTULayer (TP=1)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d_model, width = cfg["hidden_size"], cfg["num_heads"] * cfg["head_dim"]
        if cfg["norm_affine"]:
            self.input_norm_weight = nn.Parameter(torch.ones(d_model))
            self.input_norm_bias = nn.Parameter(torch.zeros(d_model))
            self.output_norm_weight = nn.Parameter(torch.ones(width))
            self.output_norm_bias = nn.Parameter(torch.zeros(width))
        else:
            for name in ("input_norm_weight", "input_norm_bias", "output_norm_weight", "output_norm_bias"):
                self.register_parameter(name, None)
        self.uvqk = nn.Linear(d_model, 4 * width, bias=cfg["uvqk_bias"])
        self.output = nn.Linear(width, d_model, bias=cfg["output_bias"])
        if cfg["relative_attention_bias"]:
            self.rab_pos_weights = nn.Parameter(torch.zeros(2 * cfg["rab_num_positions"] - 1))
            self.rab_ts_weights = nn.Parameter(torch.zeros(129)) if cfg["rab_use_time"] else None
        else:
            self.rab_pos_weights = None
            self.rab_ts_weights = None


class _Block(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.position_embedding = (
            nn.Embedding(cfg["num_position_buckets"], cfg["hidden_size"])
            if cfg["use_position_embedding"] else None
        )
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg["num_layers"]))


class _TokenBuilder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.projections = nn.ModuleDict(
            {name: nn.Linear(dim, cfg["hidden_size"], bias=False) for name, dim in cfg["projections"].items()}
        )


def _mlp(cfg: dict[str, Any]) -> nn.Module:
    """Same layout as hstu.model.ranking.MLP (``net`` Sequential)."""
    head = nn.Module()
    layers: list[nn.Module] = []
    width = cfg["hidden_size"]
    arch = list(cfg["head_arch"])
    for i, out in enumerate(arch):
        layers.append(nn.Linear(width, out, bias=cfg["head_bias"]))
        if i < len(arch) - 1:
            layers.append(nn.ReLU() if cfg["head_activation"] == "relu" else nn.GELU())
        width = out
    head.net = nn.Sequential(*layers)
    return head


class InferenceHSTU(nn.Module):
    """The trained dense part (token builder, HSTU block, ranking head), state-dict compatible
    with the trainer's RankingModel / RetrievalModel at TP=1.

    ``cfg`` (JSON-able; see :func:`hstu.export.inference_config`): task, hidden_size,
    num_layers, num_heads, head_dim, alpha, scaling_seqlen, norm_eps, norm_affine, uvqk_bias,
    output_bias, is_causal, mask_convention, target_group_size, num_position_buckets,
    use_position_embedding, relative_attention_bias, rab_num_positions, rab_use_time,
    rab_query_time (absent: False), max_attn_len, min_full_attn_seq_len,
    attn_truncation_layers, attn_truncation_len (each absent: 0, off), num_contextual, has_action,
    projections (feature -> input dim of its projection), item_feature_name,
    action_feature_name, contextual_feature_names, l2_norm_eps; retrieval: query_projection
    (absent: none; else the item dim d the query is projected to); ranking: head_arch,
    head_bias, head_activation.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.token_builder = _TokenBuilder(cfg)
        self.block = _Block(cfg)
        if cfg["task"] == "ranking":
            self.head = _mlp(cfg)
        if cfg.get("query_projection"):  # retrieval with items narrower than hidden_size
            self.query_projection = nn.Linear(cfg["hidden_size"], int(cfg["query_projection"]), bias=False)
        self.hidden_size = cfg["hidden_size"]
        self.num_heads, self.head_dim = cfg["num_heads"], cfg["head_dim"]
        self.alpha = float(cfg["alpha"])
        self.scaling = float(cfg["scaling_seqlen"])
        self.eps = float(cfg["norm_eps"])
        self.causal = bool(cfg["is_causal"])
        self.mask_convention = str(cfg["mask_convention"])
        check_mask_convention(self.mask_convention)
        self.group = int(cfg["target_group_size"])
        self.num_ctx = int(cfg["num_contextual"])
        self.mult = 2 if cfg["has_action"] else 1
        # retrieval: the query time (the request time) is the last token's next time
        self.query_time = bool(cfg.get("rab_query_time", False))
        # semi-local window and attention truncation; artifacts before format 4 have neither
        self.max_attn_len = int(cfg.get("max_attn_len", 0))
        self.min_full_attn_seq_len = int(cfg.get("min_full_attn_seq_len", 0))
        check_window(self.max_attn_len, self.min_full_attn_seq_len)
        self.truncation_layers = int(cfg.get("attn_truncation_layers", 0))
        self.truncation_len = int(cfg.get("attn_truncation_len", 0))
        if self.truncation_layers and not (
            0 < self.truncation_layers < cfg["num_layers"] and self.truncation_len > 0
        ):
            raise ValueError(
                f"attn_truncation_layers={self.truncation_layers} needs 0 < it < num_layers="
                f"{cfg['num_layers']} and attn_truncation_len > 0 (got {self.truncation_len})"
            )

    # ------------------------------------------------------------------------ pieces

    def _project(self, name: str | None, x: Tensor) -> Tensor:
        if name is not None and name in self.token_builder.projections:
            return self.token_builder.projections[name](x)
        return x

    def _embed_tokens(
        self,
        items: Tensor,
        item_lengths: Tensor,
        num_candidates: Tensor,
        timestamps: Tensor | None,
        actions: Tensor | None,
        contextual: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Padded tokens [B, W, D] (zeros on padding), their timestamps [B, W] or None,
        real token counts n [B] and non-candidate token counts [B]."""
        cfg = self.cfg
        bsz, slots = items.shape[0], items.shape[1]
        x_ctx, mult = self.num_ctx, self.mult
        hist = item_lengths - num_candidates  # [B]
        parts = []
        if contextual is not None:
            parts.append(self._project_ctx(contextual))
        parts.append(self._project(cfg["item_feature_name"], items))
        if actions is not None:
            parts.append(self._project(cfg["action_feature_name"], actions))
        source = torch.cat(parts, 1).float()  # [B, X + L (+ L), D]
        width = x_ctx + mult * slots
        s = torch.arange(width, device=items.device).unsqueeze(0)  # [1, W]
        r = s - x_ctx
        h = hist.unsqueeze(1)
        in_hist = (r >= 0) & (r < mult * h)
        item_pos = torch.where(in_hist, torch.div(r, mult, rounding_mode="floor"), h + (r - mult * h))
        is_action = in_hist & (torch.remainder(r, mult) == 1)
        n = x_ctx + mult * hist + num_candidates  # [B]
        valid = s < n.unsqueeze(1)
        item_pos = item_pos.clamp(0, slots - 1)
        index = torch.where(
            s < x_ctx, s.expand(bsz, -1),
            x_ctx + item_pos + torch.where(is_action, slots, 0),
        )
        index = torch.where(valid, index, 0)
        tokens = source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
        tokens = tokens * valid.unsqueeze(-1).to(tokens.dtype)
        token_ts = None
        if timestamps is not None:
            first = torch.where(item_lengths > 0, timestamps[:, 0], torch.zeros_like(timestamps[:, 0]))
            ts = torch.where(s < x_ctx, first.unsqueeze(1), timestamps.gather(1, item_pos))
            token_ts = torch.where(valid, ts, torch.zeros_like(ts))
        return tokens, token_ts, n, n - num_candidates

    def _project_ctx(self, contextual: Tensor) -> Tensor:
        names = self.cfg["contextual_feature_names"]
        return torch.stack([self._project(name, contextual[:, k]) for k, name in enumerate(names)], 1)

    def _input(self, tokens: Tensor, positions: Tensor) -> Tensor:
        x = tokens * math.sqrt(self.hidden_size)
        if self.block.position_embedding is not None:
            buckets = self.block.position_embedding.num_embeddings
            x = x + self.block.position_embedding(positions.clamp(max=buckets - 1))
        return x

    def _uvqk(self, layer: _Layer, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = _layer_norm(x, layer.input_norm_weight, layer.input_norm_bias, self.eps)
        uvqk = F.silu(F.linear(n, layer.uvqk.weight, layer.uvqk.bias))
        u, v, q, k = uvqk.split(self.num_heads * self.head_dim, dim=-1)
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        return u, v.reshape(shape), q.reshape(shape), k.reshape(shape)

    def _finish(self, layer: _Layer, x: Tensor, attn: Tensor, u: Tensor) -> Tensor:
        normed = _layer_norm(attn, layer.output_norm_weight, layer.output_norm_bias, self.eps)
        return x + layer.output(normed * u)

    def _rab(self, layer: _Layer, rows: Tensor, cols: Tensor, ts_next: Tensor | None,
             ts_cols: Tensor | None) -> Tensor | None:
        """Bias [B or 1, I, J] for query token indices ``rows`` [I] (or [B, I]) and key
        indices ``cols`` [J]: pos_w[P-1 + j - i] (+ ts_w[bucket(t_next[i] - t[j])])."""
        if layer.rab_pos_weights is None:
            return None
        num_pos = (layer.rab_pos_weights.shape[0] + 1) // 2
        rel = (num_pos - 1 + cols.unsqueeze(-2) - rows.unsqueeze(-1)).clamp(0, 2 * num_pos - 2)
        bias = layer.rab_pos_weights[rel]
        if bias.dim() == 2:
            bias = bias.unsqueeze(0)
        if layer.rab_ts_weights is not None:
            assert ts_next is not None and ts_cols is not None
            bias = bias + layer.rab_ts_weights[time_bucket(ts_next.unsqueeze(2) - ts_cols.unsqueeze(1))]
        return bias

    @staticmethod
    def _next_timestamps(token_ts: Tensor, n: Tensor, query_ts: Tensor | None = None) -> Tensor:
        """t_next[i] = t[i + 1], and for a sample's last token its query time ``query_ts``
        [B] when given, else t[n - 1]. [B, W]."""
        width = token_ts.shape[1]
        pos = torch.arange(width, device=token_ts.device).unsqueeze(0)
        last = (n.unsqueeze(1) - 1).clamp(min=0)
        nxt = token_ts.gather(1, torch.minimum(pos + 1, last))
        if query_ts is not None:
            nxt = torch.where(pos == last, query_ts.unsqueeze(1), nxt)
        return nxt

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
        """q [B, I, NH, d], k/v [B, J, NH, d], mask bool [B, I, J] -> [B, I, NH*d]."""
        scores = self.alpha * torch.einsum("bihd,bjhd->bhij", q, k)
        if bias is not None:
            scores = scores + bias.unsqueeze(1)
        weights = torch.where(mask.unsqueeze(1), F.silu(scores), 0.0) / self.scaling
        out = torch.einsum("bhij,bjhd->bihd", weights, v)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _encode(self, tokens, token_ts, n, num_targets, positions, keep_kv: bool = False,
                query_ts: Tensor | None = None):
        """The HSTU block on padded tokens: states [B, W, D] (and per-layer K, V);
        ``query_ts`` [B]: the last token's next time (retrieval's query time)."""
        width = tokens.shape[1]
        mask = self._mask(n, num_targets, width)
        ts_next = self._next_timestamps(token_ts, n, query_ts) if token_ts is not None else None
        idx = torch.arange(width, device=tokens.device)
        inside = upper_mask = None
        if self.truncation_layers:
            # each sample's last T tokens; the upper layers' mask is the block on them
            start = (n - self.truncation_len).clamp(min=0)
            inside = idx.unsqueeze(0) >= start.unsqueeze(1)  # [B, W]
            upper_mask = mask & inside.unsqueeze(2) & inside.unsqueeze(1)
        x = self._input(tokens, positions)
        keys, values = [], []
        for li, layer in enumerate(self.block.layers):
            u, v, q, k = self._uvqk(layer, x)
            if keep_kv:
                keys.append(k)
                values.append(v)
            bias = self._rab(layer, idx, idx, ts_next, token_ts)
            if inside is not None and li >= self.truncation_layers:
                out = self._finish(layer, x, self._attend(q, k, v, upper_mask, bias), u)
                x = torch.where(inside.unsqueeze(-1), out, x)  # the others keep their state
            else:
                x = self._finish(layer, x, self._attend(q, k, v, mask, bias), u)
        return x, keys, values

    def _mask(self, n: Tensor, num_targets: Tensor | None, width: int) -> Tensor:
        """bool [B, W, W]: the kernels' mask (``hstu.ops.masks``), window included."""
        return dense_mask(
            n, torch.full_like(n, self.num_ctx) if self.num_ctx else None, num_targets,
            self.group, self.causal, width, self.mask_convention,
            max_attn_len=self.max_attn_len, min_full_attn_seq_len=self.min_full_attn_seq_len,
        )

    @staticmethod
    def _positions(n: Tensor, first_target: Tensor, width: int) -> Tensor:
        pos = torch.arange(width, device=n.device).unsqueeze(0)
        return torch.minimum(pos, first_target.unsqueeze(1))

    def _item_rows(self, item_lengths: Tensor, num_candidates: Tensor, slots: int) -> Tensor:
        """Token slot of each item slot [B, L] (clamped into range on padding)."""
        hist = (item_lengths - num_candidates).unsqueeze(1)
        p = torch.arange(slots, device=item_lengths.device).unsqueeze(0)
        rows = self.num_ctx + torch.where(p < hist, self.mult * p, self.mult * hist + (p - hist))
        return rows.clamp(max=self.num_ctx + self.mult * slots - 1)

    # ------------------------------------------------------------------------ forward

    def forward(
        self,
        items: Tensor,
        item_lengths: Tensor,
        num_candidates: Tensor,
        timestamps: Tensor | None = None,
        actions: Tensor | None = None,
        contextual: Tensor | None = None,
        query_timestamps: Tensor | None = None,
    ) -> Tensor:
        """items [B, L, D_item] embeddings (history then candidates), item_lengths and
        num_candidates int64 [B], timestamps int64 [B, L], actions [B, L, D_act] (candidate
        slots ignored), contextual [B, X, D_ctx], query_timestamps int64 [B] (the request
        time; a model with ``rab_query_time`` needs it, any other refuses it).

        Retrieval: the L2-normalised query [B, d] (the state of each sample's last history
        item token, projected to the item dim d where ``query_projection``). Ranking: head logits [B, L, W_head] at every item slot (those of slots
        [H[b], H[b] + C[b]) are the candidates' scores; the rest are not meaningful).
        """
        if (query_timestamps is not None) != self.query_time:
            raise ValueError(
                "this model reads the request time (query_timestamps)" if self.query_time
                else "this model has no query time (rab_query_time); pass no query_timestamps"
            )
        tokens, token_ts, n, first_target = self._embed_tokens(
            items, item_lengths, num_candidates, timestamps, actions, contextual
        )
        width = tokens.shape[1]
        positions = self._positions(n, first_target, width)
        if query_timestamps is not None and token_ts is None:
            raise ValueError("query_timestamps need the history's timestamps")
        states, _, _ = self._encode(
            tokens, token_ts, n, num_candidates, positions, query_ts=query_timestamps
        )
        rows = self._item_rows(item_lengths, num_candidates, items.shape[1])  # [B, L]
        if self.cfg["task"] == "retrieval":
            hist = item_lengths - num_candidates
            last = torch.where(
                hist > 0, rows.gather(1, (hist - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                (n - 1).clamp(min=0),
            )
            query = states.gather(1, last.view(-1, 1, 1).expand(-1, 1, states.shape[-1])).squeeze(1)
            if self.cfg.get("query_projection"):
                query = self.query_projection(query)
            return F.normalize(query, p=2.0, dim=-1, eps=float(self.cfg["l2_norm_eps"]))
        picked = states.gather(1, rows.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
        return self.head.net(picked)

    # ------------------------------------------------------------- cached history

    def _check_cacheable(self) -> None:
        """A history cache needs history states that never see the candidates."""
        if self.mask_convention == "peer" and not self.causal:
            raise ValueError(
                'cached history: mask_convention="peer" with is_causal=False lets the history '
                "see the candidates, so its keys/values depend on them; score with forward()"
            )
        if self.truncation_layers:
            raise ValueError(
                "cached history: attention truncation keeps each sample's last "
                f"{self.truncation_len} tokens, candidates included, so which history tokens "
                "the upper layers see depends on the candidates; score with forward()"
            )

    def encode_history(
        self,
        items: Tensor,
        item_lengths: Tensor,
        timestamps: Tensor | None = None,
        actions: Tensor | None = None,
        contextual: Tensor | None = None,
        next_timestamps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """History only (no candidates): items [B, L, D], item_lengths [B] = H.

        Returns (keys [layers, B, W, NH, d], values [layers, B, W, NH, d], token timestamps
        [B, W] (zeros without timestamps), history token counts [B]). ``next_timestamps`` [B]:
        the timestamp of the first candidate that will be scored (the request time); only
        the relative attention bias' time term reads it.
        """
        self._check_cacheable()
        zeros = torch.zeros_like(item_lengths)
        tokens, token_ts, n, _ = self._embed_tokens(items, item_lengths, zeros, timestamps, actions, contextual)
        width = tokens.shape[1]
        if token_ts is not None and next_timestamps is not None:
            # the last history token's t_next is the first candidate's timestamp: append it
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], 1)
            pos = torch.arange(width + 1, device=n.device).unsqueeze(0)
            token_ts = torch.cat([token_ts, token_ts.new_zeros(token_ts.shape[0], 1)], 1)
            token_ts = torch.where(pos == n.unsqueeze(1), next_timestamps.unsqueeze(1), token_ts)
            mask_n = n + 1  # t_next reads the appended timestamp; the token itself stays masked
            states_in = (tokens, token_ts, mask_n)
        else:
            states_in = (tokens, token_ts, n)
        tokens_, ts_, n_for_next = states_in
        w = tokens_.shape[1]
        mask = self._mask(n, None, w)
        ts_next = self._next_timestamps(ts_, n_for_next) if ts_ is not None else None
        idx = torch.arange(w, device=n.device)
        x = self._input(tokens_, self._positions(n, n, w))
        keys, values = [], []
        for layer in self.block.layers:
            u, v, q, k = self._uvqk(layer, x)
            keys.append(k[:, :width])
            values.append(v[:, :width])
            bias = self._rab(layer, idx, idx, ts_next, ts_)
            x = self._finish(layer, x, self._attend(q, k, v, mask, bias), u)
        ts_out = token_ts[:, :width] if token_ts is not None else torch.zeros_like(tokens[:, :, 0], dtype=torch.int64)
        return torch.stack(keys), torch.stack(values), ts_out, n

    def score_candidates(
        self,
        keys: Tensor,
        values: Tensor,
        history_timestamps: Tensor,
        history_tokens: Tensor,
        candidates: Tensor,
        num_candidates: Tensor,
        candidate_timestamps: Tensor | None = None,
    ) -> Tensor:
        """Ranking logits [B, K, W_head] of K new candidates per sample ([B, K, D_item],
        ``num_candidates`` [B] real ones, timestamps [B, K]) against a cache from
        :meth:`encode_history`: per layer, the candidates' queries attend to the cached
        history keys/values and to their own target group. Cost O(K x history) per layer."""
        self._check_cacheable()
        bsz, kc = candidates.shape[0], candidates.shape[1]
        wh = keys.shape[2]
        device = candidates.device
        x = self._project(self.cfg["item_feature_name"], candidates).float()
        x = self._input(x, history_tokens.unsqueeze(1).expand(-1, kc))
        c = torch.arange(kc, device=device)
        real = c.unsqueeze(0) < num_candidates.unsqueeze(1)  # [B, K]
        hist_mask = (torch.arange(wh, device=device).unsqueeze(0) < history_tokens.unsqueeze(1))
        hist_mask = (hist_mask.unsqueeze(1) & real.unsqueeze(2))  # [B, K, Wh]
        if self.max_attn_len > 0 and self.min_full_attn_seq_len == 0:
            # candidates sit at the first candidate's position, n_hist: history key j is near
            # when n_hist - pos(j) <= W (pos(j) = max(j, C - 1)); "hstu" always sees contextual
            # keys (hstu.ops.masks; with M > 0 candidates see the whole history)
            key_pos = torch.clamp(torch.arange(wh, device=device), min=self.num_ctx - 1)
            near = history_tokens.unsqueeze(1) - key_pos.unsqueeze(0) <= self.max_attn_len
            if self.mask_convention == "hstu":
                near = near | (torch.arange(wh, device=device) < self.num_ctx).unsqueeze(0)
            hist_mask = hist_mask & near.unsqueeze(1)
        same_group = torch.div(c.unsqueeze(1), self.group, rounding_mode="floor") == torch.div(
            c.unsqueeze(0), self.group, rounding_mode="floor")
        cand_rule = same_group & (c.unsqueeze(0) <= c.unsqueeze(1)) if self.causal else same_group
        cand_mask = cand_rule.unsqueeze(0) & real.unsqueeze(2) & real.unsqueeze(1)  # [B, K, K]
        rows = history_tokens.unsqueeze(1) + c.unsqueeze(0)  # [B, K] token index of each candidate
        ts_next = None
        if candidate_timestamps is not None:
            nxt = torch.minimum(c.unsqueeze(0) + 1, (num_candidates.unsqueeze(1) - 1).clamp(min=0))
            ts_next = candidate_timestamps.gather(1, nxt)
        hist_idx = torch.arange(wh, device=device)
        for li, layer in enumerate(self.block.layers):
            u, v, q, k = self._uvqk(layer, x)
            bias_h = self._rab(layer, rows, hist_idx, ts_next, history_timestamps)
            bias_c = self._rab(layer, rows, rows[:, :1] + c, ts_next, candidate_timestamps)
            scores_h = self.alpha * torch.einsum("bihd,bjhd->bhij", q, keys[li])
            scores_c = self.alpha * torch.einsum("bihd,bjhd->bhij", q, k)
            if bias_h is not None:
                scores_h = scores_h + bias_h.unsqueeze(1)
                scores_c = scores_c + bias_c.unsqueeze(1)
            w_h = torch.where(hist_mask.unsqueeze(1), F.silu(scores_h), 0.0) / self.scaling
            w_c = torch.where(cand_mask.unsqueeze(1), F.silu(scores_c), 0.0) / self.scaling
            attn = torch.einsum("bhij,bjhd->bihd", w_h, values[li]) + torch.einsum("bhij,bjhd->bihd", w_c, v)
            x = self._finish(layer, x, attn.reshape(bsz, kc, -1), u)
        return self.head.net(x)


__all__ = ["InferenceHSTU"]
