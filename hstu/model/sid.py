"""Generative retrieval with semantic ids (``NetworkArgs.architecture = "hstu_sid"``;
docs/model.md "Semantic ids").

Legend: B samples, H[b] history items, Q training queries (history item j predicts item j+1),
L levels of an item's semantic id (its collision level included), K_l codes of level l,
S = sum(K_l) code rows, D hidden width, U queries decoded, N decoder rows (U x beam).

- **Items from their codes.** Each item's input is the sum of its L code embeddings (one table
  of S rows, ``<item feature>_sid``: the loader carries each item's L code rows as that key, so
  TorchRec looks them up, shards and checkpoints the table like any other), plus the item's
  own id row with ``NetworkArgs.sid_item_embedding``.
- **Encoder.** The HSTU block over the items, as dense retrieval: the state of history item j
  has seen items 0..j and is the query for item j+1.
- **Head: a code decoder.** A small causal transformer over L tokens: token 0 is the query
  state, token l > 0 the embedding of the item's code at level l-1; token l's output gives
  the log-probabilities of the code at level l. Training: teacher forcing, the cross-entropy
  of each level summed over the levels, mean over the global batch's queries.
- **Decoding.** :mod:`hstu.model.sid_decode`'s beam search over the catalogue's trie (valid
  items only); the encoder runs once per query and the decoder caches each layer's keys and
  values, so a level costs one new token per beam row (:class:`CachedDecoder`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from hstu.data.batch import Batch
from hstu.model.encode import DenseModel
from hstu.model.loss_scale import PendingScale
from hstu.model.retrieval import next_item_queries, query_history_window
from hstu.model.sid_decode import BeamResult, CodeTrie
from hstu.model.sid_head import (
    CachedDecoder,
    Catalogue,
    CodeDecoder,
    RecomputingDecoder,
    code_rows,
)
from hstu.model.tokens import TokenBuilder
from hstu.ops.jagged import index_within, lengths_to_offsets, segment_ids
from hstu.ops.losses import HistoryWindow


def sid_feature_name(item_feature_name: str) -> str:
    """The key of the batch that carries each item's code rows (and the table's feature)."""
    return f"{item_feature_name}_sid"


class SidRetrievalModel(DenseModel):
    """The dense part of ``architecture = "hstu_sid"``: forward(batch, embeddings) ->
    (loss, per-query loss [Q]); see the module docstring.

    Args:
        token_builder, block: as for dense retrieval.
        codes: int64 [num_items, L]: each item id's codes (-1 for ids without an item, e.g.
            padding); kept with the model (a buffer: checkpoints and exports carry it).
        num_codes: K_l per level.
        item_embedding: add the item's id row to the sum of its code rows.
        decoder_layers, decoder_heads, dropout, eps, decoder_ffn_multiplier,
            decoder_attention_dropout: the code decoder's
            (:class:`hstu.model.sid_head.CodeDecoder`).
        min_item_id: first real item id. max_item_seqlen, tp_group: as for dense retrieval.
        beam_width, certify, spread: decoding (:func:`hstu.model.sid_decode.beam_search`).
        eval_exclude_history: never recommend an item of the query's history.
        exclude_history_from_loss: each level's training softmax covers only the codes that
            lead to an item outside the query's history (its position and before, except its
            target), and decoding renormalises each level over the codes it may take (the same
            distribution); False: every code of the level, decoding as the decoder scores.
    """

    decodes_codes = True

    def __init__(
        self,
        token_builder: TokenBuilder,
        block: nn.Module,
        *,
        codes: torch.Tensor,
        num_codes: Sequence[int],
        item_embedding: bool = False,
        decoder_layers: int = 1,
        decoder_heads: int = 2,
        dropout: float = 0.0,
        eps: float = 1e-6,
        decoder_ffn_multiplier: int = 4,
        decoder_attention_dropout: float | None = None,
        min_item_id: int = 0,
        max_item_seqlen: int = 0,
        beam_width: int = 50,
        certify: bool = False,
        spread: float = 0.0,
        eval_exclude_history: bool = True,
        exclude_history_from_loss: bool = False,
    ) -> None:
        super().__init__(token_builder, block, max_item_seqlen, None)
        if codes.dim() != 2 or codes.shape[1] != len(num_codes):
            raise ValueError(f"codes must be [items, {len(num_codes)}], got {list(codes.shape)}")
        self.register_buffer("codes", codes.to(torch.int64))
        self.num_codes = [int(k) for k in num_codes]
        self.num_items = codes.shape[0]
        self.min_item_id = min_item_id
        self.item_embedding = item_embedding
        self.beam_width, self.certify, self.spread = beam_width, certify, spread
        self.eval_exclude_history = eval_exclude_history
        self.exclude_history_from_loss = exclude_history_from_loss
        self._code_tables: dict | None = None
        self.sid_feature = sid_feature_name(token_builder.item_feature_name)
        hidden = token_builder.hidden_size
        self.decoder = CodeDecoder(hidden, self.num_codes, decoder_layers, decoder_heads,
                                   dropout, eps, decoder_ffn_multiplier,
                                   decoder_attention_dropout)
        self._catalogue: Catalogue | None = None
        if exclude_history_from_loss:
            self._tables()  # built here, on the host, rather than inside a training step

    @property
    def levels(self) -> int:
        return len(self.num_codes)

    def catalogue(self) -> Catalogue:
        """The items decoding returns and their trie (built once from :attr:`codes`)."""
        if self._catalogue is None:
            self._catalogue = Catalogue(self.codes, self.num_codes, self.min_item_id)
        return self._catalogue

    def trie(self) -> CodeTrie:
        """The catalogue's trie: every id of [min_item_id, num_items) with codes."""
        return self.catalogue().trie

    # ------------------------------------------------------------------ inputs

    def _item_inputs(self, batch: Batch, embeddings: dict) -> dict:
        """The embeddings with the item feature's rows replaced by the sum of each item's code
        rows (plus its id row with ``item_embedding``)."""
        name = self.token_builder.item_feature_name
        out = {k: embeddings[k] for k in embeddings.keys()}  # noqa: SIM118 (LazyAwaitable)
        item = out[name]
        sid = out.pop(self.sid_feature).values()
        summed = sid.view(-1, self.levels, sid.shape[-1]).sum(1)
        values = summed + item.values() if self.item_embedding else summed
        out[name] = JaggedTensor(values=values, lengths=item.lengths())
        return out

    # ------------------------------------------------------------------ training

    def forward(self, batch: Batch, embeddings: dict) -> tuple[torch.Tensor, torch.Tensor]:
        q = next_item_queries(batch)  # as dense retrieval's (online windows included)
        pending = PendingScale(q.has_next.sum(), self.training)
        own, _, _, tokens, states = self._states(batch, self._item_inputs(batch, embeddings))
        history_states = states.index_select(0, tokens.history_query_rows)
        queries = history_states.index_select(0, q.query_rows)
        targets = self.codes.index_select(0, own.item_ids.index_select(0, q.next_rows))
        logits = self.decoder(queries, targets)
        if self.exclude_history_from_loss and self.training:
            window = query_history_window(batch, own, own.item_ids, q.segment, q.index,
                                          q.item_starts, self.max_item_seqlen)
            allowed = self._allowed_codes(
                window, segment_ids(own.item_lengths, own.item_ids.numel()),
                own.item_ids.index_select(0, q.next_rows))
            logits = [lg.masked_fill(~ok, float("-inf")) for lg, ok in zip(logits, allowed)]
        per_query = sum(
            F.cross_entropy(lg.float(), targets[:, level], reduction="none")
            for level, lg in enumerate(logits)
        )
        return per_query.sum() * pending.wait(), per_query.detach()

    _DENSE_CHILDREN = 1 << 22  # a level's [nodes, codes] size table is kept dense up to this

    def _tables(self) -> dict:
        """On the codes' device: ``nodes`` int64 [num_items, L], each item id's trie node at
        every level (-1 rows: no codes); ``rows`` [num_items, L], its codes as rows of one
        [sum K_l] axis; per level ``children``: the items below each child of each node, a
        dense [n_l, K_l] table where small, else the trie's keys and subtree sizes. Built on
        the host when the model is (no sync in a step), copied to the device on first use."""
        if self._code_tables is None:  # built where the codes are (the constructor's host)
            trie = self.catalogue().trie
            nodes = torch.full((self.num_items, self.levels), -1, dtype=torch.int64)
            nodes[self.catalogue().ids] = torch.stack(trie.item_nodes, 1)
            children = []
            for level, k in enumerate(self.num_codes):
                keys, sizes = trie.keys[level], trie.subtree_items[level]
                if trie.num_nodes(level) * k <= self._DENSE_CHILDREN:
                    table = torch.zeros(trie.num_nodes(level) * k, dtype=torch.int64)
                    table[keys] = sizes
                    children.append(table.view(-1, k))
                else:
                    children.append((keys, sizes))
            self._code_tables = {
                "nodes": nodes, "children": children,
                "rows": code_rows(self.codes.clamp(min=0).cpu(), self.num_codes),
            }
        tables, device = self._code_tables, self.codes.device
        if tables["nodes"].device != device:  # the model moved (host -> device copies only)
            tables = {
                "nodes": tables["nodes"].to(device), "rows": tables["rows"].to(device),
                "children": [t.to(device) if isinstance(t, torch.Tensor)
                             else tuple(x.to(device) for x in t) for t in tables["children"]],
            }
            self._code_tables = tables
        return tables

    def _children_sizes(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        """[Q, K_level]: the items below each child of each level-``level`` node ``prefix``
        [Q] (0 where the code leads to no item)."""
        table = self._tables()["children"][level]
        if isinstance(table, torch.Tensor):
            return table.index_select(0, prefix)
        keys, sizes = table
        k = self.num_codes[level]
        key = prefix.unsqueeze(1) * k + torch.arange(k, device=prefix.device)
        at = torch.searchsorted(keys, key).clamp_(max=keys.numel() - 1)
        return torch.where(keys[at] == key, sizes[at], 0)

    _WINDOW_ELEMENTS = 1 << 18  # (query, history position) entries handled at a time

    def _allowed_codes(self, window: HistoryWindow, item_samples: torch.Tensor,
                       target_ids: torch.Tensor) -> list[torch.Tensor]:
        """RetrievalArgs.sid_exclude_history_from_loss: per level l, bool [Q, K_l], the codes
        that continue each query's target prefix (its first l codes) to at least one item
        outside the query's history (``window``: :func:`query_history_window`, its ids the
        batch's item feature, -1 where not admitted; repeats once, never its target). A code is
        left out where it leads to no item, or where every item below it is in that history.
        ``item_samples`` [N]: each item's sample. Fixed shapes from host sizes (no host sync)."""
        tables = self._tables()
        device = target_ids.device
        item_ids = window.ids
        num_q, n = target_ids.shape[0], item_ids.numel()
        # each (sample, item) once: its first position in the sample counts, later ones do not
        key = item_samples * (self.num_items + 1) + item_ids + 1  # (-1: not admitted)
        order = torch.sort(key, stable=True).indices
        first = torch.ones(n, dtype=torch.bool, device=device)
        sorted_key = key.index_select(0, order)
        first[order[1:]] = sorted_key[1:] != sorted_key[:-1]
        safe = item_ids.clamp(min=0)
        flat_nodes = tables["nodes"].index_select(0, safe)  # [N, L]
        flat_rows = tables["rows"].index_select(0, safe)  # [N, L]
        counted = first & (item_ids >= 0) & (flat_nodes[:, 0] >= 0)
        target_nodes = tables["nodes"].index_select(0, target_ids)  # [Q, L]
        prefix = torch.cat([torch.zeros_like(target_nodes[:, :1]), target_nodes[:, :-1]], 1)
        counts = torch.zeros(num_q, sum(self.num_codes), dtype=torch.int64, device=device)
        for s, e, at, inside in window.blocks(num_q, elements=self._WINDOW_ELEMENTS):
            keep = inside & counted[at] & (item_ids[at] != target_ids[s:e, None])
            nodes = flat_nodes[at]  # [r, W, L]
            # a history item counts at level l where it shares the target's first l codes
            same = torch.cat([keep.unsqueeze(2), keep.unsqueeze(2)
                              & (nodes[:, :, :-1] == target_nodes[s:e, None, :-1])], 2)
            counts[s:e].scatter_add_(1, flat_rows[at].view(e - s, -1),
                                     same.view(e - s, -1).to(torch.int64))
        out = []
        for level, c in enumerate(counts.split(self.num_codes, 1)):
            sizes = self._children_sizes(level, prefix[:, level])
            out.append((sizes > 0) & (c < sizes))
        return out

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def last_states(self, batch: Batch, embeddings: dict
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each sample's query state (its last history item's token) [B, D], and its history
        (item ids [sum(H)], their sample [sum(H)])."""
        own, inputs, _, tokens, states = self._states(batch, self._item_inputs(batch, embeddings))
        hist = inputs.history_lengths
        last_hist = lengths_to_offsets(hist)[1:] - 1
        rows = tokens.offsets[1:] - 1
        if tokens.history_query_rows.numel() > 0:
            rows = torch.where(hist > 0, tokens.history_query_rows[last_hist.clamp(min=0)], rows)
        seg = segment_ids(hist, own.sizes.num_history_items)
        within = index_within(hist, own.sizes.num_history_items)
        item_rows = lengths_to_offsets(own.item_lengths)[:-1][seg] + within
        return states.index_select(0, rows), own.item_ids.index_select(0, item_rows), seg

    @torch.no_grad()
    def recommend(self, queries: torch.Tensor, top_k: int,
                  excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
                  beam_width: int | None = None) -> BeamResult:
        """Beam search for query states [U, D]: the top-``top_k`` item ids [U, k] (-1 where
        fewer were found) with their scores; ``excluded`` (query [E], item id [E])."""
        return self.catalogue().decode(self.decoder, queries, top_k,
                                       beam_width or self.beam_width, self.certify, excluded,
                                       self.spread, renormalise=self.exclude_history_from_loss)

    @torch.no_grad()
    def target_ranks(self, batch: Batch, embeddings: dict, top_k: int) -> torch.Tensor:
        """Each sample's target rank (1-based, float; inf when it is not among the top_k
        decoded, or has no codes), targets in ``batch.labels``."""
        queries, history, seg = self.last_states(batch, embeddings)
        excluded = (seg, history) if self.eval_exclude_history else None
        top = self.recommend(queries, top_k, excluded).items
        targets = batch.labels.to(top.device)
        hit = top == targets.unsqueeze(1)
        pos = torch.argmax(hit.int(), dim=1).float() + 1
        return torch.where(hit.any(1), pos, torch.full_like(pos, float("inf")))


__all__ = [
    "CachedDecoder",
    "CodeDecoder",
    "RecomputingDecoder",
    "SidRetrievalModel",
    "code_rows",
    "sid_feature_name",
]
