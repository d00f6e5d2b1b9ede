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
from hstu.model.retrieval import next_item_queries
from hstu.model.sid_decode import BeamResult, CodeTrie, beam_search
from hstu.model.tokens import TokenBuilder
from hstu.ops.jagged import index_within, lengths_to_offsets, segment_ids


def sid_feature_name(item_feature_name: str) -> str:
    """The key of the batch that carries each item's code rows (and the table's feature)."""
    return f"{item_feature_name}_sid"


def code_rows(codes: torch.Tensor, num_codes: Sequence[int]) -> torch.Tensor:
    """Codes [I, L] -> rows of the code table [I, L]: level l's codes after the K_<l rows of the
    levels before it."""
    offsets = torch.tensor([0, *num_codes[:-1]], dtype=torch.int64).cumsum(0)
    return codes.to(torch.int64) + offsets.to(codes.device)


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer over a short causal sequence [N, T, D], with a key/value
    cache for decoding one token at a time."""

    def __init__(self, hidden: int, heads: int, dropout: float, eps: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"the code decoder's width {hidden} is not a multiple of its "
                             f"{heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                nn.Linear(4 * hidden, hidden))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [N, T, D] -> (x [N, T, D], this layer's keys and values [N, heads, T', d] with the
        cached ones first). With ``cache`` the T new tokens follow the cached ones."""
        n, t, d = x.shape
        q, k, v = (
            y.view(n, t, self.heads, d // self.heads).transpose(1, 2)
            for y in self.qkv(self.norm1(x)).chunk(3, dim=-1)
        )
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        past = k.shape[2] - t
        if t == 1:  # one new token: it sees every token before it
            mask = None
        else:
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(n, t, d)), p, self.training)
        x = x + F.dropout(self.ff(self.norm2(x)), p, self.training)
        return x, (k, v)


class CodeDecoder(nn.Module):
    """The head: query state [.., D] and the codes before level l -> logits of level l.

    Args:
        hidden: D. num_codes: K_l per level. num_layers, num_heads: the decoder's.
        dropout, eps: dropout of its residual branches and attention; layer norm epsilon.
    """

    def __init__(self, hidden: int, num_codes: Sequence[int], num_layers: int,
                 num_heads: int, dropout: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_codes = [int(k) for k in num_codes]
        levels = len(self.num_codes)
        self.register_buffer(
            "offsets", torch.tensor([0, *self.num_codes[:-1]], dtype=torch.int64).cumsum(0),
            persistent=False,
        )
        # codes of levels 0..L-2 are inputs (the last level's code is never fed back)
        self.code_embedding = nn.Embedding(max(sum(self.num_codes[:-1]), 1), hidden)
        nn.init.normal_(self.code_embedding.weight, std=0.02)
        self.level_embedding = nn.Parameter(torch.zeros(levels, hidden))
        self.query_input = nn.Linear(hidden, hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, num_heads, dropout, eps) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.heads = nn.ModuleList(nn.Linear(hidden, k) for k in self.num_codes)

    @property
    def levels(self) -> int:
        return len(self.num_codes)

    def _token(self, level: int, query: torch.Tensor | None, codes: torch.Tensor | None
               ) -> torch.Tensor:
        """Input token of ``level``: the query's (level 0) or code ``codes`` of level-1's."""
        if level == 0:
            return self.query_input(query) + self.level_embedding[0]
        return self.code_embedding(codes + self.offsets[level - 1]) + self.level_embedding[level]

    def forward(self, query: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher forcing: query [Q, D], the items' codes [Q, L] -> logits [Q, K_l] per level."""
        x = torch.stack(
            [self._token(0, query, None)]
            + [self._token(level, None, codes[:, level - 1]) for level in range(1, self.levels)],
            dim=1,
        )
        for layer in self.layers:
            x, _ = layer(x)
        x = self.norm(x)
        return [head(x[:, level]) for level, head in enumerate(self.heads)]

    def start(self, query: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Decoding: query [U, D] -> (level 0's logits [U, K_0], the cache)."""
        return self._step(self._token(0, query, None).unsqueeze(1), 0, None)

    def step(self, cache: list, parents: torch.Tensor, codes: torch.Tensor, level: int
             ) -> tuple[torch.Tensor, list]:
        """Decoding: rows extending row ``parents`` [N] of ``cache`` by ``codes`` [N] (of level
        ``level`` - 1) -> (level ``level``'s logits [N, K_level], the new cache)."""
        cache = [(k.index_select(0, parents), v.index_select(0, parents)) for k, v in cache]
        return self._step(self._token(level, None, codes).unsqueeze(1), level, cache)

    def _step(self, x: torch.Tensor, level: int, cache: list | None
              ) -> tuple[torch.Tensor, list]:
        new_cache = []
        for at, layer in enumerate(self.layers):
            x, kv = layer(x, None if cache is None else cache[at])
            new_cache.append(kv)
        return self.heads[level](self.norm(x[:, -1])), new_cache

    def recompute(self, query: torch.Tensor, codes: torch.Tensor, level: int) -> torch.Tensor:
        """Decoding without a cache: level ``level``'s logits from the whole prefix, query
        [N, D] and codes [N, level] (what :meth:`step` gives with its cache)."""
        x = torch.stack(
            [self._token(0, query, None)]
            + [self._token(at, None, codes[:, at - 1]) for at in range(1, level + 1)],
            dim=1,
        )
        for layer in self.layers:
            x, _ = layer(x)
        return self.heads[level](self.norm(x[:, -1]))


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least float32 (half logits upcast)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


class CachedDecoder:
    """:class:`hstu.model.sid_decode.Decoder` over a :class:`CodeDecoder` and the queries'
    states [U, D]: each level runs one token per row against the cached keys and values."""

    def __init__(self, decoder: CodeDecoder, queries: torch.Tensor) -> None:
        self.decoder, self.queries = decoder, queries
        self.cache: list = []
        self.level = 0

    def start(self, queries: torch.Tensor) -> torch.Tensor:
        logits, self.cache = self.decoder.start(self.queries[queries.to(self.queries.device)])
        self.level = 0
        return _log_probs(logits)

    def advance(self, parents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        self.level += 1
        logits, self.cache = self.decoder.step(self.cache, parents, codes, self.level)
        return _log_probs(logits)


class RecomputingDecoder:
    """The same decoder without a cache: each level runs the whole prefix again (for tests and
    the decoding benchmark; ``encode`` recomputes the queries' states too when given: a
    decoder without any cache re-reads the history at every level)."""

    def __init__(self, decoder: CodeDecoder, queries: torch.Tensor, encode=None) -> None:
        self.decoder, self.queries, self.encode = decoder, queries, encode
        self.rows = torch.zeros(0, dtype=torch.int64)
        self.codes = torch.zeros(0, 0, dtype=torch.int64)

    def _states(self) -> torch.Tensor:
        if self.encode is not None:
            return self.encode(self.rows)
        return self.queries[self.rows]

    def start(self, queries: torch.Tensor) -> torch.Tensor:
        self.rows = queries.to(self.queries.device)
        self.codes = torch.zeros(self.rows.numel(), 0, dtype=torch.int64,
                                 device=self.queries.device)
        logits = self.decoder.recompute(self._states(), self.codes, 0)
        return _log_probs(logits)

    def advance(self, parents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        self.rows = self.rows[parents]
        self.codes = torch.cat([self.codes[parents], codes.unsqueeze(1)], 1)
        logits = self.decoder.recompute(self._states(), self.codes, self.codes.shape[1])
        return _log_probs(logits)


class SidRetrievalModel(DenseModel):
    """The dense part of ``architecture = "hstu_sid"``: forward(batch, embeddings) ->
    (loss, per-query loss [Q]); see the module docstring.

    Args:
        token_builder, block: as for dense retrieval.
        codes: int64 [num_items, L]: each item id's codes (-1 for ids without an item, e.g.
            padding); kept with the model (a buffer: checkpoints and exports carry it).
        num_codes: K_l per level.
        item_embedding: add the item's id row to the sum of its code rows.
        decoder_layers, decoder_heads, dropout, eps: the code decoder's.
        min_item_id: first real item id. max_item_seqlen, tp_group: as for dense retrieval.
        beam_width, certify: decoding (:func:`hstu.model.sid_decode.beam_search`).
        eval_exclude_history: never recommend an item of the query's history.
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
        min_item_id: int = 0,
        max_item_seqlen: int = 0,
        beam_width: int = 50,
        certify: bool = False,
        eval_exclude_history: bool = True,
    ) -> None:
        super().__init__(token_builder, block, max_item_seqlen, None)
        if codes.dim() != 2 or codes.shape[1] != len(num_codes):
            raise ValueError(f"codes must be [items, {len(num_codes)}], got {list(codes.shape)}")
        self.register_buffer("codes", codes.to(torch.int64))
        self.num_codes = [int(k) for k in num_codes]
        self.num_items = codes.shape[0]
        self.min_item_id = min_item_id
        self.item_embedding = item_embedding
        self.beam_width, self.certify = beam_width, certify
        self.eval_exclude_history = eval_exclude_history
        self.sid_feature = sid_feature_name(token_builder.item_feature_name)
        hidden = token_builder.hidden_size
        self.decoder = CodeDecoder(hidden, self.num_codes, decoder_layers, decoder_heads,
                                   dropout, eps)
        self._trie: CodeTrie | None = None

    @property
    def levels(self) -> int:
        return len(self.num_codes)

    def trie(self) -> CodeTrie:
        """The catalogue's trie: every id of [min_item_id, num_items) with codes (built once)."""
        if self._trie is None:
            ids = torch.arange(self.min_item_id, self.num_items)
            ids = ids[(self.codes[ids.to(self.codes.device)] >= 0).all(1).cpu()]
            self._trie = CodeTrie(self.codes[ids.to(self.codes.device)].cpu(), self.num_codes)
            self._trie_ids = ids
        return self._trie

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
        per_query = sum(
            F.cross_entropy(lg.float(), targets[:, level], reduction="none")
            for level, lg in enumerate(logits)
        )
        return per_query.sum() * pending.wait(), per_query.detach()

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
        trie = self.trie()
        ids = self._trie_ids.to(queries.device)
        if excluded is not None:  # item ids -> the trie's item indices (ids without codes: out)
            at = torch.searchsorted(ids, excluded[1])
            held = ids[at.clamp(max=ids.numel() - 1)] == excluded[1]
            excluded = (excluded[0][held], at[held])
        result = beam_search(CachedDecoder(self.decoder, queries), trie, queries.shape[0],
                             beam_width or self.beam_width, top_k, certify=self.certify,
                             excluded=excluded)
        items = torch.where(result.items >= 0, ids[result.items.clamp(min=0)], result.items)
        return BeamResult(items=items, scores=result.scores, beams=result.beams)

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
