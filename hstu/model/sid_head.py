"""The semantic-id model's head, torch only (the trainer's :mod:`hstu.model.sid` and the
artifact's :mod:`hstu.serving.sid` share it): the code decoder, a small causal transformer
over an item's L codes whose token 0 is the query state, and its two decoding drivers for
:func:`hstu.model.sid_decode.beam_search`, with and without a key/value cache.

Legend: L levels of an item's semantic id (its collision level included), K_l codes of level
l, D hidden width, Q training queries, U queries decoded, N decoder rows (U x beam).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hstu.model.sid_decode import BeamResult, CodeTrie, beam_search
from hstu.ops.dropout import dropout


def code_rows(codes: torch.Tensor, num_codes: Sequence[int]) -> torch.Tensor:
    """Codes [I, L] -> rows of the code table [I, L]: level l's codes after the K_<l rows of the
    levels before it."""
    offsets = torch.tensor([0, *num_codes[:-1]], dtype=torch.int64).cumsum(0)
    return codes.to(torch.int64) + offsets.to(codes.device)


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer over a short causal sequence [N, T, D], with a key/value
    cache for decoding one token at a time. ``dropout`` on the residual branches,
    ``attention_dropout`` (None: ``dropout``) on the attention weights; the feed-forward's
    inner width is ``ffn_multiplier`` x D."""

    def __init__(self, hidden: int, heads: int, dropout: float, eps: float,
                 ffn_multiplier: int = 4, attention_dropout: float | None = None) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"the code decoder's width {hidden} is not a multiple of its "
                             f"{heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.ff = nn.Sequential(nn.Linear(hidden, ffn_multiplier * hidden), nn.GELU(),
                                nn.Linear(ffn_multiplier * hidden, hidden))
        self.dropout = dropout
        self.ffn_multiplier = ffn_multiplier
        self.attention_dropout = dropout if attention_dropout is None else attention_dropout

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
        causal, mask = False, None  # t == 1: the new token sees every token before it
        if t > 1 and past == 0:
            causal = True
        elif t > 1:
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.attention_dropout if self.training else 0.0)
        x = x + dropout(self.out(a.transpose(1, 2).reshape(n, t, d)), p, self.training)
        x = x + dropout(self.ff(self.norm2(x)), p, self.training)
        return x, (k, v)


class CodeDecoder(nn.Module):
    """The head: query state [.., D] and the codes before level l -> logits of level l.

    Args:
        hidden: D. num_codes: K_l per level. num_layers, num_heads: the decoder's.
        dropout, eps: dropout of its residual branches (and of its attention weights unless
            ``attention_dropout`` is given); layer norm epsilon.
        ffn_multiplier: the feed-forward's inner width as a multiple of D.
    """

    def __init__(self, hidden: int, num_codes: Sequence[int], num_layers: int,
                 num_heads: int, dropout: float = 0.0, eps: float = 1e-6,
                 ffn_multiplier: int = 4, attention_dropout: float | None = None) -> None:
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
            DecoderLayer(hidden, num_heads, dropout, eps, ffn_multiplier, attention_dropout)
            for _ in range(num_layers)
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


class Catalogue:
    """The items a semantic-id model can return: the ids of [``min_item_id``, I) whose codes
    are set (``codes`` int64 [I, L], -1 rows for ids without an item), and their trie."""

    def __init__(self, codes: torch.Tensor, num_codes: Sequence[int], min_item_id: int) -> None:
        ids = torch.arange(min_item_id, codes.shape[0])
        ids = ids[(codes[ids.to(codes.device)] >= 0).all(1).cpu()]
        self.ids = ids
        """int64 [I'] ascending: the trie's item i is item id ``ids[i]``."""
        self.trie = CodeTrie(codes[ids.to(codes.device)].cpu(), num_codes)

    @torch.no_grad()
    def decode(self, decoder: CodeDecoder, queries: torch.Tensor, top_k: int, beam_width: int,
               certify: bool = False,
               excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
               spread: float = 0.0, renormalise: bool = False) -> BeamResult:
        """Beam search from query states [U, D]: the top-``top_k`` item ids [U, k] (-1 where
        fewer were found) and their scores (the sum of the codes' log-probabilities);
        ``excluded`` (query [E], item id [E]) never returned (ids without codes: ignored);
        ``spread``, ``renormalise``: :func:`hstu.model.sid_decode.beam_search`'s."""
        ids = self.ids.to(queries.device)
        if excluded is not None:  # item ids -> the trie's item indices
            at = torch.searchsorted(ids, excluded[1])
            held = ids[at.clamp(max=max(ids.numel() - 1, 0))] == excluded[1]
            excluded = (excluded[0][held], at[held])
        result = beam_search(CachedDecoder(decoder, queries), self.trie, queries.shape[0],
                             beam_width, top_k, certify=certify, excluded=excluded,
                             spread=spread, renormalise=renormalise)
        items = torch.where(result.items >= 0, ids[result.items.clamp(min=0)], result.items)
        return BeamResult(items=items, scores=result.scores, beams=result.beams)


__all__ = [
    "CachedDecoder",
    "Catalogue",
    "CodeDecoder",
    "DecoderLayer",
    "RecomputingDecoder",
    "code_rows",
]
