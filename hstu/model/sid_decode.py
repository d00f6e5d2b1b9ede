"""Decoding semantic ids: the trie of the catalogue's valid code sequences, and beam search
over it that returns items only, certified exact on request (docs/semantic_ids.md "Decoding").

Legend: I items, L levels of an item's semantic id (its collision level included), K_l codes
at level l, U queries (users), B beam width, R rows of one query at a level (<= B), N = U * R.

A decoder gives, level by level, log-probabilities over every code of the level
(:class:`Decoder`): the score of an item is the sum over its L codes of
``log p(c_l | history, c_<l)``. Codes that lead to no item are masked at every level, so a
beam holds valid prefixes only and ends on items. Each term is <= 0, so a prefix's score bounds
the score of every item below it: beam search remembers, per query, the best score it pruned;
with ``certify`` a query whose best pruned prefix beats its K-th item is searched again with a
wider beam (doubling, at most every prefix of a level), so the returned top-K is the exact top-K
of the decoder's item scores, whatever the beam (ties aside).

``spread`` s in [0, 1] (0: the decoder's scores as they are) mixes the last level's
distribution with an even one over each prefix's items: ``p(c_L) = (1 - s) p_model(c_L) + s /
n(prefix)``. The last level separates items that share their other codes; the decoder learns it
from training targets only, so an item never seen as a target (a new item whose codes come from
its content) gets no probability there however likely its prefix. With the spread it gets at
least ``s / n`` of its prefix's (docs/semantic_ids.md "New items"). Each term stays <= 0:
certification holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class CodeTrie:
    """The valid code sequences: ``codes`` int64 [I, L], row i the codes of item i (dense item
    index), rows distinct; ``num_codes`` [L]: K_l, codes of level l lie in [0, K_l).

    Nodes of level l are the distinct prefixes of length l, in lexicographic order (level 0:
    the root only); ``keys[l]`` [n_{l+1}] sorted are the level-(l+1) nodes as
    ``parent * K_l + code``; ``child_start[l]`` [n_l + 1] where each level-l node's children
    start in it (CSR); a leaf (level L) is an item.
    """

    def __init__(self, codes: torch.Tensor, num_codes: Sequence[int]) -> None:
        codes = torch.as_tensor(codes, dtype=torch.int64)
        if codes.dim() != 2 or codes.shape[1] != len(num_codes) or codes.shape[0] == 0:
            raise ValueError(f"codes must be [items, {len(num_codes)}] and not empty, "
                             f"got {list(codes.shape)}")
        self.num_codes = [int(k) for k in num_codes]
        for level, k in enumerate(self.num_codes):
            col = codes[:, level]
            if int(col.min()) < 0 or int(col.max()) >= k:
                raise ValueError(f"level {level}: codes must lie in [0, {k}), found "
                                 f"[{int(col.min())}, {int(col.max())}]")
        self.keys: list[torch.Tensor] = []
        self.child_start: list[torch.Tensor] = []
        self.item_nodes: list[torch.Tensor] = []
        """[l]: int64 [I], each item's level-(l+1) node (its prefix of length l+1)."""
        self.subtree_items: list[torch.Tensor] = []
        """[l]: int64 [n_{l+1}], the items below each level-(l+1) node."""
        node = torch.zeros(codes.shape[0], dtype=torch.int64)
        num_nodes = 1
        for level, k in enumerate(self.num_codes):
            key = node * k + codes[:, level]
            uniq, node = torch.unique(key, sorted=True, return_inverse=True)
            self.keys.append(uniq)
            bounds = torch.arange(num_nodes + 1, dtype=torch.int64) * k
            self.child_start.append(torch.searchsorted(uniq, bounds))
            num_nodes = uniq.numel()
            self.item_nodes.append(node)
            self.subtree_items.append(torch.bincount(node, minlength=num_nodes))
        if num_nodes != codes.shape[0]:
            _, first, counts = _first_duplicate(node)
            raise ValueError(f"items {first[0]} and {first[1]} have the same codes "
                             f"({counts} items share code sequences): a trie needs distinct rows "
                             "(the tokenizer's collision level makes them so)")
        self.item_of_leaf = torch.empty(num_nodes, dtype=torch.int64)
        self.item_of_leaf[node] = torch.arange(codes.shape[0])
        self.leaf_of_item = node
        self.codes = codes

    @property
    def levels(self) -> int:
        return len(self.num_codes)

    @property
    def num_items(self) -> int:
        return self.item_of_leaf.numel()

    def num_nodes(self, level: int) -> int:
        """Nodes of level ``level`` (0: the root)."""
        return 1 if level == 0 else self.keys[level - 1].numel()

    def allowed(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """bool [N, K_level]: the codes that continue each level-``level`` node to a valid
        prefix."""
        k = self.num_codes[level]
        start = self.child_start[level].to(nodes.device)
        keys = self.keys[level].to(nodes.device)
        first, last = start[nodes], start[nodes + 1]
        counts = last - first
        rows = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), counts)
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(rows.numel(), device=nodes.device) - offsets[rows] + first[rows]
        mask = torch.zeros(nodes.numel(), k, dtype=torch.bool, device=nodes.device)
        mask[rows, keys[pos] - nodes[rows] * k] = True
        return mask

    def child(self, level: int, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The level-(``level`` + 1) nodes [N] reached from ``nodes`` by ``codes`` (valid
        pairs only: see :meth:`allowed`)."""
        keys = self.keys[level].to(nodes.device)
        return torch.searchsorted(keys, nodes * self.num_codes[level] + codes)


def covered_children(trie: CodeTrie, level: int, query: torch.Tensor, item: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The level-(``level`` + 1) nodes every item of which is among a query's items:
    ``query`` [E], ``item`` [E] (trie item indices; repeats allowed) -> (query [F], parent
    level-``level`` node [F], code [F]), each a code of that parent that leads to that query's
    items only."""
    device = item.device
    n = trie.num_nodes(level + 1)
    pair = torch.unique(query * trie.num_items + item)  # each (query, item) once
    q, it = pair // trie.num_items, pair % trie.num_items
    child = trie.item_nodes[level].to(device)[it]
    keys, counts = torch.unique(q * n + child, return_counts=True)
    q, child = keys // n, keys % n
    full = counts == trie.subtree_items[level].to(device)[child]
    q, child = q[full], child[full]
    k = trie.num_codes[level]
    key = trie.keys[level].to(device)[child]
    return q, key // k, key % k


def _first_duplicate(leaf: torch.Tensor) -> tuple[int, list[int], int]:
    order = torch.argsort(leaf, stable=True)
    same = leaf[order][1:] == leaf[order][:-1]
    at = int(torch.nonzero(same)[0])
    return int(leaf[order][at]), [int(order[at]), int(order[at + 1])], int(same.sum()) + 1


class Decoder(Protocol):
    """What beam search asks a model: log-probabilities over the codes of one level.

    ``start(queries)``: queries int64 [U] (indices of the decoder's queries, a subset when a
    query is searched again) -> [U, K_0], level 0. ``advance(parents, codes)``: the rows of the
    next level, each the child of row ``parents[n]`` of the previous call's rows by code
    ``codes[n]`` -> [N, K_l]. A decoder with a KV cache reorders its cache by ``parents`` and
    runs one new token per row.
    """

    def start(self, queries: torch.Tensor) -> torch.Tensor: ...

    def advance(self, parents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor: ...


@dataclass
class BeamResult:
    """items int64 [U, k] (dense item indices, -1 where fewer than k items could be found),
    scores float [U, k] (sum of the codes' log-probabilities, descending; -inf with -1),
    beams int64 [U]: the beam width that produced each query's list (wider than asked where
    certification searched it again)."""

    items: torch.Tensor
    scores: torch.Tensor
    beams: torch.Tensor


def _spread(logp: torch.Tensor, allowed: torch.Tensor, spread: float) -> torch.Tensor:
    """log((1 - s) p + s / n) per row [N, K] over the ``allowed`` codes [N, K] (n per row)."""
    n = allowed.sum(1, keepdim=True).clamp(min=1).to(logp.dtype)
    even = torch.log(spread / n).expand_as(logp)
    if spread >= 1.0:
        return even
    return torch.logaddexp(logp + math.log1p(-spread), even)


def renormalised(logp: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [N, K] renormalised over each row's ``allowed`` codes [N, K] (-inf
    elsewhere; a row with none allowed stays -inf)."""
    logp = logp.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logp, 1, keepdim=True)
    return logp - lse.masked_fill(~torch.isfinite(lse), 0.0)


def _search(decoder: Decoder, trie: CodeTrie, queries: torch.Tensor, beam: int, top_k: int,
            excluded: torch.Tensor | None, spread: float = 0.0, renormalise: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam search of width ``beam`` for ``queries`` [U]: (items [U, k], scores [U, k],
    best pruned score [U] (-inf: nothing pruned))."""
    u = queries.numel()
    logp = decoder.start(queries)
    device = logp.device
    nodes = torch.zeros(u, dtype=torch.int64, device=device)
    scores = torch.zeros(u, 1, dtype=logp.dtype, device=device)
    pruned = torch.full((u,), float("-inf"), dtype=logp.dtype, device=device)
    covered = None
    if renormalise and excluded is not None:
        covered = [covered_children(trie, level, excluded[0].to(device), excluded[1].to(device))
                   for level in range(trie.levels)]
    for level in range(trie.levels):
        k = trie.num_codes[level]
        rows = scores.shape[1]
        allowed = trie.allowed(level, nodes)
        if covered is not None:  # codes below which every item is excluded
            q, parent, code = covered[level]
            hit = nodes.reshape(u, rows)[q] == parent.unsqueeze(1)  # [F, R]
            e, r = torch.nonzero(hit, as_tuple=True)
            allowed[q[e] * rows + r, code[e]] = False
        if renormalise:
            logp = renormalised(logp, allowed)
        if spread > 0.0 and level == trie.levels - 1:
            logp = _spread(logp, allowed, spread)
        cand = logp.masked_fill(~allowed, float("-inf"))
        cand = (scores.reshape(-1, 1) + cand).reshape(u, rows * k)
        if level == trie.levels - 1 and excluded is not None and covered is None:
            cand = _exclude(cand, nodes, trie, excluded)
        keep = min(beam if level < trie.levels - 1 else max(beam, top_k), rows * k)
        top, idx = cand.topk(min(keep + 1, rows * k), dim=1)
        if top.shape[1] > keep:  # the best candidate left out bounds everything below it
            pruned = torch.maximum(pruned, top[:, keep])
            top, idx = top[:, :keep], idx[:, :keep]
        parent_rows = idx // k + torch.arange(u, device=device).unsqueeze(1) * rows
        codes = idx % k
        alive = torch.isfinite(top)
        parents = parent_rows.reshape(-1)
        flat_codes = codes.reshape(-1)
        child = trie.child(level, nodes[parents].clamp(min=0), flat_codes)
        nodes = torch.where(alive.reshape(-1), child, torch.zeros_like(child))
        scores = top
        if level < trie.levels - 1:
            logp = decoder.advance(parents, flat_codes)
    items = torch.where(torch.isfinite(scores), trie.item_of_leaf.to(device)[nodes].reshape(u, -1),
                        torch.full_like(nodes.reshape(u, -1), -1))
    items, scores = items[:, :top_k], scores[:, :top_k]
    if scores.shape[1] < top_k:
        pad = top_k - scores.shape[1]
        items = torch.cat([items, items.new_full((u, pad), -1)], 1)
        scores = torch.cat([scores, scores.new_full((u, pad), float("-inf"))], 1)
    return items, scores, pruned


def _exclude(cand: torch.Tensor, nodes: torch.Tensor, trie: CodeTrie,
             excluded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The last level's candidates [U, R * K] with each query's excluded items at -inf."""
    query, item = excluded
    u, width = cand.shape
    k = trie.num_codes[-1]
    rows = width // k
    leaf = trie.leaf_of_item.to(cand.device)[item]
    parent_node = torch.searchsorted(trie.child_start[-1].to(cand.device), leaf, right=True) - 1
    code = trie.keys[-1].to(cand.device)[leaf] - parent_node * k
    row_nodes = nodes.reshape(u, rows)
    hit = row_nodes[query] == parent_node.unsqueeze(1)  # [E, R]: the rows holding the parent
    e, r = torch.nonzero(hit, as_tuple=True)
    out = cand.clone()
    out[query[e], r * k + code[e]] = float("-inf")
    return out


def beam_search(
    decoder: Decoder,
    trie: CodeTrie,
    num_queries: int,
    beam: int,
    top_k: int,
    *,
    certify: bool = False,
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
    spread: float = 0.0,
    renormalise: bool = False,
) -> BeamResult:
    """The top-``top_k`` items of each of ``num_queries`` queries by beam search of width
    ``beam`` over ``trie``; only valid items, never one of a query's ``excluded`` items
    ((query [E], item [E]): e.g. its history).

    ``certify``: a query whose best pruned prefix scores above its k-th item (so an item below
    that prefix might belong in its top-k) is searched again with twice the beam, until none
    is or the beam holds every prefix of every level: the result is then the exact top-k of
    the decoder's item scores (ties in any order).

    ``spread``: the share of each prefix's probability spread evenly over its items at the last
    level (the module docstring); 0 scores items as the decoder does.

    ``renormalise``: each level's log-probabilities renormalised over the codes the search may
    take there (valid, and leading to at least one item not excluded for the query), the
    distribution a model trained with ``RetrievalArgs.sid_exclude_history_from_loss`` learnt;
    False: the decoder's log-probabilities as they are, excluded items removed at the last level.
    """
    if beam < 1 or top_k < 1:
        raise ValueError(f"beam ({beam}) and top_k ({top_k}) must be at least 1")
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread must lie in [0, 1], got {spread}")
    queries = torch.arange(num_queries)
    items, scores, pruned = _search(decoder, trie, queries, beam, top_k, excluded, spread,
                                    renormalise)
    beams = torch.full((num_queries,), beam, dtype=torch.int64)
    widest = max(trie.num_nodes(level) for level in range(trie.levels))
    width = beam
    while certify and width < widest:
        open_ = pruned > scores[:, -1]
        if not bool(open_.any()):
            break
        width = min(2 * width, widest)
        again = torch.nonzero(open_.cpu()).flatten()
        sub = None
        if excluded is not None:
            where = open_.cpu()[excluded[0].cpu()]
            remap = torch.full((num_queries,), -1, dtype=torch.int64)
            remap[again] = torch.arange(again.numel())
            sub = (remap[excluded[0].cpu()[where]].to(excluded[0].device), excluded[1][where])
        got_items, got_scores, got_pruned = _search(decoder, trie, again.to(queries.device),
                                                    width, top_k, sub, spread, renormalise)
        dev = items.device
        items[again.to(dev)], scores[again.to(dev)] = got_items, got_scores
        pruned[again.to(dev)] = got_pruned
        beams[again] = width
    return BeamResult(items=items, scores=scores, beams=beams)


__all__ = ["BeamResult", "CodeTrie", "Decoder", "beam_search", "covered_children", "renormalised"]
