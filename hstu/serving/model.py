"""The dense model for inference: plain torch, padded batches, exportable with torch.export.

Legend: B samples, L item slots per sample (history then candidates, left-aligned, padded),
H[b] history items, C[b] candidates, X contextual features, A = 2 with action tokens else 1,
W = X + A*L token slots, D hidden width, NH heads of width d, n[b] = X + A*H[b] + C[b] real
tokens of sample b.

The trainer's own modules (hstu.model.tokens.TokenBuilder, hstu.model.hstu_block.HSTUBlock
and its HSTULayers, so the state dict is the trainer's) and functions (the token slots, the
block's input, each layer's projection and output, ``hstu.ops``' mask, relative attention
bias and padded attention) on a padded [B, W] layout instead of the jagged one, so that
shapes are symbolic in B and L and nothing depends on data in Python (what torch.export
needs). This file holds the layout only: which slots, positions and keys each call sees;
padded slots are masked out of attention and never read back.

Ranking with a cached history (:meth:`InferenceHSTU.encode_history` then
:meth:`InferenceHSTU.score_candidates`): docs/serving.md, "Ranking with a cached history".

Attention truncation (``attn_truncation_layers`` k, ``attn_truncation_len`` T) runs layers
k+1.. with the mask restricted to each sample's last T tokens and keeps the layer-k state of
the tokens before them: the trainer's jagged slice on the padded width (the mask of a suffix
is the full mask's block on it), the trainer's numbers without its saving.

Imports torch and hstu's torch-only modules: no torchrec, megatron or gin.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hstu.model.hstu_block import HSTUBlock
from hstu.model.hstu_layer import HSTULayer, LayerOptions
from hstu.model.tokens import TokenBuilder, place, token_slots
from hstu.ops import rab
from hstu.ops.masks import dense_mask
from hstu.ops.pytorch_attention import padded_attention


def history_pairs(histories: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-query item ids -> (query row [E], item id [E]) of every history item: what retrieval
    never returns to that query."""
    sizes = torch.tensor([h.numel() for h in histories])
    rows = torch.repeat_interleave(torch.arange(len(histories)), sizes)
    return rows, torch.cat(histories).to(torch.int64)


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

    ``cfg``: the JSON-able model config :func:`hstu.export.inference_config` writes (the
    manifest's ``model``); rab_query_time, max_attn_len, min_full_attn_seq_len,
    attn_truncation_layers and attn_truncation_len, absent from older artifacts, read as off.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        # attention truncation and the semi-local window: absent (0, off) before format 4
        self.truncation_layers = int(cfg.get("attn_truncation_layers", 0))
        self.truncation_len = int(cfg.get("attn_truncation_len", 0))
        self.options = options = LayerOptions(
            norm_eps=float(cfg["norm_eps"]), is_causal=bool(cfg["is_causal"]),
            mask_convention=str(cfg["mask_convention"]),
            max_attn_len=int(cfg.get("max_attn_len", 0)),
            min_full_attn_seq_len=int(cfg.get("min_full_attn_seq_len", 0)),
            target_group_size=int(cfg["target_group_size"]), alpha=float(cfg["alpha"]),
            attn_scaling_seqlen=int(cfg["scaling_seqlen"]), uvqk_bias=cfg["uvqk_bias"],
            norm_affine=cfg["norm_affine"], output_bias=cfg["output_bias"],
            relative_attention_bias=cfg["relative_attention_bias"],
            rab_num_positions=int(cfg.get("rab_num_positions") or 1),
            rab_use_time=cfg["rab_use_time"],
        )
        self.token_builder = TokenBuilder(
            cfg["hidden_size"], cfg["item_feature_name"], cfg["action_feature_name"],
            cfg["contextual_feature_names"], dict(cfg["projections"]),
        )
        self.block = HSTUBlock(
            cfg["num_layers"], cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"], options,
            num_position_buckets=cfg["num_position_buckets"],
            use_position_embedding=cfg["use_position_embedding"],
            attn_truncation_layers=self.truncation_layers,
            attn_truncation_len=self.truncation_len,
        )
        if cfg["task"] == "ranking":
            self.head = _mlp(cfg)
        if cfg.get("query_projection"):  # retrieval with items narrower than hidden_size
            width = int(cfg["query_projection"])
            self.query_projection = nn.Linear(cfg["hidden_size"], width, bias=False)
        self.num_ctx = int(cfg["num_contextual"])
        self.mult = 2 if cfg["has_action"] else 1
        # retrieval: the query time (the request time) is the last token's next time
        self.query_time = bool(cfg.get("rab_query_time", False))
        self.eval()

    # ------------------------------------------------------------------------ layout

    def _tokens(self, items: Tensor, item_lengths: Tensor, num_candidates: Tensor,
                timestamps: Tensor | None, actions: Tensor | None,
                contextual: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Padded tokens [B, W, D] (zeros on padding), their timestamps [B, W] or None, real
        token counts n [B] and the token slot of each item slot [B, L] (clamped into range
        on padding): the trainer's token layout (``TokenBuilder.forward``), padded."""
        tb, num_ctx = self.token_builder, self.num_ctx
        bsz, slots = items.shape[0], items.shape[1]
        width = num_ctx + self.mult * slots
        hist = (item_lengths - num_candidates).unsqueeze(1)  # [B, 1]
        p = torch.arange(slots, device=items.device).unsqueeze(0)  # [1, L]
        rows = token_slots(p, hist, num_ctx, self.mult)  # [B, L]
        # (values [B, S, D], their timestamps [B, S], their slots [B, S]) of each kind of
        # token; padding goes to a spare slot W, dropped after placing
        parts = [(tb.project(tb.item_feature_name, items), timestamps,
                  torch.where(p < item_lengths.unsqueeze(1), rows, width))]
        if actions is not None:
            parts.append((tb.project(tb.action_feature_name, actions), timestamps,
                          torch.where(p < hist, rows + 1, width)))
        if contextual is not None:
            first = None  # contextual tokens: the first item's time
            if timestamps is not None:
                first = torch.where(item_lengths > 0, timestamps[:, 0], 0)
                first = first.unsqueeze(1).expand(-1, num_ctx)
            names = tb.contextual_feature_names
            values = torch.stack([tb.project(n, contextual[:, k]) for k, n in enumerate(names)], 1)
            slots_ctx = torch.arange(num_ctx, device=items.device).expand(bsz, -1)
            parts.append((values, first, slots_ctx))
        values, times, dests = zip(*parts)
        dest = torch.cat(dests, 1)
        every = torch.cat([v.float() for v in values], 1)
        tokens = place(every, dest, width + 1).narrow(1, 0, width)
        token_ts = None
        if timestamps is not None:
            token_ts = place(torch.cat(times, 1), dest, width + 1).narrow(1, 0, width)
        n = num_ctx + self.mult * hist.squeeze(1) + num_candidates
        return tokens, token_ts, n, rows.clamp(max=width - 1)

    def _mask(self, lengths: Tensor, num_targets: Tensor | None, rows: Tensor,
              keys: Tensor) -> Tensor:
        """bool [B, R, K]: the kernels' mask (``hstu.ops.masks``) of query and key tokens
        ``rows`` / ``keys`` ([R] / [K], or per sample [B, R] / [B, K])."""
        o = self.options
        ctx = torch.full_like(lengths, self.num_ctx) if self.num_ctx else None
        return dense_mask(
            lengths, ctx, num_targets, o.target_group_size, o.is_causal, keys.shape[-1],
            o.mask_convention, o.max_attn_len, o.min_full_attn_seq_len, rows=rows, keys=keys,
        )

    @staticmethod
    def _bias(layer: HSTULayer, rows: Tensor, keys: Tensor, ts_next: Tensor | None,
              ts_keys: Tensor | None) -> Tensor | None:
        """The layer's relative attention bias [B or 1, R, K] of query tokens ``rows`` and
        key tokens ``keys`` (as in :meth:`_mask`), t_next of the queries [B, R] and t of the
        keys [B, K]."""
        if layer.rab_pos_weights is None:
            return None
        tables = rab.RelativeAttentionBias(layer.rab_pos_weights, layer.rab_ts_weights)
        rel = rab.relative_positions(rows, keys, tables.max_positions)
        buckets = None
        if tables.ts_weights is not None:
            assert ts_next is not None and ts_keys is not None
            buckets = rab.time_bucket(ts_next.unsqueeze(2) - ts_keys.unsqueeze(1))
        return rab.bias_from_indices(tables.pos_weights, tables.ts_weights, rel, buckets)

    @staticmethod
    def _attend(layer: HSTULayer, q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                bias: Tensor | None) -> Tensor:
        """q [B, R, NH, d], k / v [B, K, NH, d], mask [B, R, K] -> [B, R, NH*d], head by head
        (merging B and NH into one dim is a reshape torch.export cannot size symbolically)."""
        return torch.cat([
            padded_attention(q[:, :, i], k[:, :, i], v[:, :, i], mask.unsqueeze(1), bias,
                             layer.alpha, layer.attn_scaling_seqlen, q.shape[0], 1)
            for i in range(q.shape[2])
        ], -1)

    def _layers(self, x: Tensor, token_ts: Tensor | None, n: Tensor, num_targets: Tensor | None,
                query_ts: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The block's layers on padded tokens: states [B, W, D] (and per-layer K, V);
        ``query_ts`` [B]: the last token's next time (retrieval's query time, or the first
        candidate's time for a cached history)."""
        idx = torch.arange(x.shape[1], device=x.device)
        mask = self._mask(n, num_targets, idx, idx)
        ts_next = rab.next_timestamps(token_ts, n, query_ts) if token_ts is not None else None
        inside = upper_mask = None
        if self.truncation_layers:
            # each sample's last T tokens; the upper layers' mask is the block on them
            start = (n - self.truncation_len).clamp(min=0)
            inside = idx.unsqueeze(0) >= start.unsqueeze(1)  # [B, W]
            upper_mask = mask & inside.unsqueeze(2) & inside.unsqueeze(1)
        keys, values = [], []
        for li, layer in enumerate(self.block.layers):
            u, q, k, v = layer.project(x)
            keys.append(k)
            values.append(v)
            bias = self._bias(layer, idx, idx, ts_next, token_ts)
            if inside is not None and li >= self.truncation_layers:
                out = layer.finish(x, self._attend(layer, q, k, v, upper_mask, bias), u)
                x = torch.where(inside.unsqueeze(-1), out, x)  # the others keep their state
            else:
                x = layer.finish(x, self._attend(layer, q, k, v, mask, bias), u)
        return x, keys, values

    # ------------------------------------------------------------------------ forward

    def forward(self, items: Tensor, item_lengths: Tensor, num_candidates: Tensor,
                timestamps: Tensor | None = None, actions: Tensor | None = None,
                contextual: Tensor | None = None, query_timestamps: Tensor | None = None) -> Tensor:
        """items [B, L, D_item] embeddings (history then candidates), item_lengths and
        num_candidates int64 [B], timestamps int64 [B, L], actions [B, L, D_act] (candidate
        slots ignored), contextual [B, X, D_ctx], query_timestamps int64 [B] (the request
        time; a model with ``rab_query_time`` needs it, any other refuses it).

        Retrieval: the L2-normalised query [B, d] (the state of each sample's last history
        item token, projected to the item dim d where ``query_projection``); a semantic-id
        model (``sid`` in the config): that state [B, D] as it is, the code decoder's input.
        Ranking: head logits [B, L, W_head] at every item slot (those of slots
        [H[b], H[b] + C[b]) are the candidates' scores; the rest are not meaningful).
        """
        if (query_timestamps is not None) != self.query_time:
            raise ValueError(
                "this model reads the request time (query_timestamps)" if self.query_time
                else "this model has no query time (rab_query_time); pass no query_timestamps"
            )
        tokens, token_ts, n, rows = self._tokens(
            items, item_lengths, num_candidates, timestamps, actions, contextual
        )
        if query_timestamps is not None and token_ts is None:
            raise ValueError("query_timestamps need the history's timestamps")
        idx = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        x = self.block.embed(tokens, idx, (n - num_candidates).unsqueeze(1))
        states, _, _ = self._layers(x, token_ts, n, num_candidates, query_timestamps)
        if self.cfg["task"] == "retrieval":
            hist = item_lengths - num_candidates
            last = torch.where(
                hist > 0, rows.gather(1, (hist - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                (n - 1).clamp(min=0),
            )
            query = states.gather(1, last.view(-1, 1, 1).expand(-1, 1, states.shape[-1])).squeeze(1)
            if self.cfg.get("sid"):  # the state itself: the code decoder's input
                return query
            if self.cfg.get("query_projection"):
                query = self.query_projection(query)
            return F.normalize(query, p=2.0, dim=-1, eps=float(self.cfg["l2_norm_eps"]))
        picked = states.gather(1, rows.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
        return self.head.net(picked)

    # ------------------------------------------------------------- cached history

    def _check_cacheable(self) -> None:
        """A history cache needs history states that never see the candidates."""
        if self.options.mask_convention == "peer" and not self.options.is_causal:
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

    def encode_history(self, items: Tensor, item_lengths: Tensor,
                       timestamps: Tensor | None = None, actions: Tensor | None = None,
                       contextual: Tensor | None = None, next_timestamps: Tensor | None = None,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """History only (no candidates): items [B, L, D], item_lengths [B] = H.

        Returns (keys [layers, B, W, NH, d], values [layers, B, W, NH, d], token timestamps
        [B, W] (zeros without timestamps), history token counts [B]). ``next_timestamps`` [B]:
        the timestamp of the first candidate that will be scored (the request time); only
        the relative attention bias' time term reads it.
        """
        self._check_cacheable()
        tokens, token_ts, n, _ = self._tokens(
            items, item_lengths, torch.zeros_like(item_lengths), timestamps, actions, contextual
        )
        idx = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        x = self.block.embed(tokens, idx, n.unsqueeze(1))
        query_ts = next_timestamps if token_ts is not None else None
        _, keys, values = self._layers(x, token_ts, n, None, query_ts)
        if token_ts is None:
            token_ts = torch.zeros_like(tokens[:, :, 0], dtype=torch.int64)
        return torch.stack(keys), torch.stack(values), token_ts, n

    def score_candidates(self, keys: Tensor, values: Tensor, history_timestamps: Tensor,
                         history_tokens: Tensor, candidates: Tensor, num_candidates: Tensor,
                         candidate_timestamps: Tensor | None = None) -> Tensor:
        """Ranking logits [B, K, W_head] of K new candidates per sample ([B, K, D_item],
        ``num_candidates`` [B] real ones, timestamps [B, K]) against a cache from
        :meth:`encode_history`: per layer, the candidates' queries attend to the cached
        history keys/values and to their own target group. Cost O(K x history) per layer."""
        self._check_cacheable()
        kc, wh = candidates.shape[1], keys.shape[2]
        device = candidates.device
        lengths = history_tokens + num_candidates
        # the candidates are tokens n_hist + c; the cache's padding slots are put past the
        # sample's end, so the mask drops them
        rows = history_tokens.unsqueeze(1) + torch.arange(kc, device=device)  # [B, K]
        slots = torch.arange(wh, device=device).unsqueeze(0)
        cached = torch.where(slots < history_tokens.unsqueeze(1), slots, lengths.unsqueeze(1))
        key_pos = torch.cat([cached, rows], 1)  # [B, Wh + K]
        mask = self._mask(lengths, num_candidates, rows, key_pos)
        ts_next = ts_keys = None
        if candidate_timestamps is not None:
            ts_next = rab.next_timestamps(candidate_timestamps, num_candidates)
            ts_keys = torch.cat([history_timestamps, candidate_timestamps], 1)
        x = self.token_builder.project(self.cfg["item_feature_name"], candidates).float()
        x = self.block.embed(x, rows, history_tokens.unsqueeze(1))
        for li, layer in enumerate(self.block.layers):
            u, q, k, v = layer.project(x)
            bias = self._bias(layer, rows, key_pos, ts_next, ts_keys)
            k, v = torch.cat([keys[li], k], 1), torch.cat([values[li], v], 1)
            x = layer.finish(x, self._attend(layer, q, k, v, mask, bias), u)
        return self.head.net(x)


__all__ = ["InferenceHSTU"]
