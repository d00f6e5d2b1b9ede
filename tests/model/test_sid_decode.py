"""Decoding semantic ids (hstu.model.sid_decode): the trie of valid code sequences and beam search
over it, against enumeration of every item of small catalogues."""

from __future__ import annotations

import itertools

import pytest
import torch

from hstu.model.sid_decode import CodeTrie, beam_search, covered_children


def random_codes(num_items: int, num_codes: list[int], seed: int) -> torch.Tensor:
    """Distinct rows drawn from the full grid of code sequences."""
    grid = list(itertools.product(*[range(k) for k in num_codes]))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(grid), generator=g)[:num_items]
    return torch.tensor([grid[i] for i in pick.tolist()], dtype=torch.int64)


class ToyDecoder:
    """log p(c_l | query, c_<l) = log_softmax(W_l tanh(E[query] + sum_i C_i[c_i])): rows carry
    their state and are reordered by ``parents`` (the way a KV cache is)."""

    def __init__(self, num_queries: int, num_codes: list[int], seed: int, dim: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.query = torch.randn(num_queries, dim, generator=g, dtype=torch.float64)
        self.code = [torch.randn(k, dim, generator=g, dtype=torch.float64) for k in num_codes]
        self.out = [3 * torch.randn(k, dim, generator=g, dtype=torch.float64) for k in num_codes]
        self.calls = 0

    def _logp(self) -> torch.Tensor:
        self.calls += 1
        return torch.log_softmax(torch.tanh(self.state) @ self.out[self.level].t(), dim=1)

    def start(self, queries: torch.Tensor) -> torch.Tensor:
        self.state, self.level = self.query[queries].clone(), 0
        return self._logp()

    def advance(self, parents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        self.state = self.state[parents] + self.code[self.level][codes]
        self.level += 1
        return self._logp()

    def item_scores(self, codes: torch.Tensor) -> torch.Tensor:
        """[U, I]: every item's score by teacher forcing its codes (the enumeration)."""
        u, i = self.query.shape[0], codes.shape[0]
        state = self.query.unsqueeze(1).expand(u, i, -1)
        total = torch.zeros(u, i, dtype=torch.float64)
        for level in range(codes.shape[1]):
            logp = torch.log_softmax(torch.tanh(state) @ self.out[level].t(), dim=2)
            total += logp.gather(2, codes[:, level].expand(u, -1).unsqueeze(2)).squeeze(2)
            state = state + self.code[level][codes[:, level]]
        return total


def test_the_trie_allows_exactly_the_prefixes_of_items():
    num_codes = [3, 4, 2]
    codes = random_codes(11, num_codes, seed=0)
    trie = CodeTrie(codes, num_codes)
    prefixes = [{()}] + [{tuple(r[:level + 1]) for r in codes.tolist()} for level in range(3)]
    for level in range(3):
        nodes = sorted(prefixes[level])
        assert trie.num_nodes(level) == len(nodes)
        mask = trie.allowed(level, torch.arange(len(nodes)))
        for n, prefix in enumerate(nodes):  # nodes are the prefixes in lexicographic order
            want = [c for c in range(num_codes[level]) if prefix + (c,) in prefixes[level + 1]]
            assert torch.nonzero(mask[n]).flatten().tolist() == want, (level, prefix)
    leaves = torch.zeros(11, dtype=torch.int64)
    for level in range(3):
        leaves = trie.child(level, leaves, codes[:, level])
    assert trie.item_of_leaf[leaves].tolist() == list(range(11))


def test_the_trie_refuses_shared_or_out_of_range_codes():
    with pytest.raises(ValueError, match=r"items 0 and 2 have the same codes"):
        CodeTrie(torch.tensor([[0, 1], [1, 1], [0, 1]]), [2, 2])
    with pytest.raises(ValueError, match=r"level 1: codes must lie in \[0, 2\), found \[1, 2\]"):
        CodeTrie(torch.tensor([[0, 1], [1, 2]]), [2, 2])


@pytest.mark.parametrize("seed", range(6))
def test_certified_beam_search_is_the_exact_top_k_of_every_item(seed):
    num_codes = [4, 5, 3]
    codes = random_codes(40, num_codes, seed)
    trie = CodeTrie(codes, num_codes)
    dec = ToyDecoder(16, num_codes, seed)
    want_scores, want_items = dec.item_scores(codes).topk(5, dim=1)
    inexact = 0
    for beam in (1, 2, 5):
        plain = beam_search(dec, trie, 16, beam, 5)
        # items only (a beam of 1 ends on the children of one prefix: fewer than 5, then -1)
        found = plain.items >= 0
        assert torch.equal(found, torch.isfinite(plain.scores))
        assert found.sum(1).min() >= (5 if beam == 5 else 1)
        # each score is the item's own score (teacher forcing)
        own = dec.item_scores(codes).gather(1, plain.items.clamp(min=0))
        torch.testing.assert_close(plain.scores[found], own[found])
        inexact += int((plain.items != want_items).any(1).sum())
        got = beam_search(dec, trie, 16, beam, 5, certify=True)
        assert torch.equal(got.items, want_items), beam
        torch.testing.assert_close(got.scores, want_scores)
        assert (got.beams >= beam).all()
    assert inexact > 0  # narrow beams do miss: certification is what made them exact


def test_history_items_are_never_returned_and_short_catalogues_pad():
    num_codes = [3, 3]
    codes = random_codes(7, num_codes, seed=3)
    trie = CodeTrie(codes, num_codes)
    dec = ToyDecoder(4, num_codes, seed=3)
    queries = torch.tensor([0, 0, 2, 3, 3, 3])
    items = torch.tensor([1, 4, 6, 0, 2, 5])
    got = beam_search(dec, trie, 4, 2, 6, certify=True, excluded=(queries, items))
    scores = dec.item_scores(codes)
    scores[queries, items] = float("-inf")
    want_scores, want_items = scores.topk(6, dim=1)
    finite = torch.isfinite(want_scores)
    assert torch.equal(got.items, torch.where(finite, want_items, -1))
    assert torch.equal(torch.isfinite(got.scores), finite)
    torch.testing.assert_close(got.scores[finite], want_scores[finite])
    # query 3 has 4 items left of 7: two slots are -1
    assert (got.items[3] == -1).sum() == 2


def spread_scores(dec: ToyDecoder, codes: torch.Tensor, spread: float) -> torch.Tensor:
    """[U, I]: the items' scores with the last level mixed with an even share over the items of
    each prefix, by teacher forcing and counting (the enumeration)."""
    u, i = dec.query.shape[0], codes.shape[0]
    state = dec.query.unsqueeze(1).expand(u, i, -1)
    total = torch.zeros(u, i, dtype=torch.float64)
    last = codes.shape[1] - 1
    siblings = torch.tensor([sum(tuple(o[:last]) == tuple(r[:last]) for o in codes.tolist())
                             for r in codes.tolist()], dtype=torch.float64)
    for level in range(codes.shape[1]):
        logp = torch.log_softmax(torch.tanh(state) @ dec.out[level].t(), dim=2)
        term = logp.gather(2, codes[:, level].expand(u, -1).unsqueeze(2)).squeeze(2)
        if level == last:
            term = torch.log((1 - spread) * term.exp() + spread / siblings)
        total += term
        state = state + dec.code[level][codes[:, level]]
    return total


@pytest.mark.parametrize("spread", [0.2, 0.7, 1.0])
def test_the_spread_is_the_exact_top_k_of_the_mixed_scores(spread):
    num_codes = [3, 4, 5]
    codes = random_codes(30, num_codes, seed=7)
    trie = CodeTrie(codes, num_codes)
    dec = ToyDecoder(12, num_codes, seed=7)
    want = spread_scores(dec, codes, spread)
    assert not torch.allclose(want, dec.item_scores(codes))  # the spread changes the scores
    got = beam_search(dec, trie, 12, 2, 6, certify=True, spread=spread)
    want_scores, want_items = want.topk(6, dim=1)
    torch.testing.assert_close(got.scores, want_scores)
    if spread < 1.0:  # (at 1 the items of a prefix tie)
        assert torch.equal(got.items, want_items)
    plain = beam_search(dec, trie, 12, 2, 6, certify=True)
    assert torch.equal(plain.items, dec.item_scores(codes).topk(6, dim=1)[1])
    with pytest.raises(ValueError, match=r"spread must lie in \[0, 1\], got 1.5"):
        beam_search(dec, trie, 12, 2, 6, spread=1.5)


class FixedDecoder:
    """The same log-probabilities for every row of a level (``logits[l]`` [K_l])."""

    def __init__(self, logits: list[list[float]]):
        self.logits = [torch.log_softmax(torch.tensor(lg, dtype=torch.float64), 0) for lg in logits]

    def start(self, queries):
        self.level = 0
        return self.logits[0].expand(queries.numel(), -1)

    def advance(self, parents, codes):
        self.level += 1
        return self.logits[self.level].expand(parents.numel(), -1)


def test_a_new_item_under_a_likely_prefix_is_returned_with_the_spread():
    """An item the decoder gives no probability at the last level (never a training target) is
    found through its prefix once a share of the prefix is spread over its items."""
    codes = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 2]])
    trie = CodeTrie(codes, [2, 2, 3])
    dec = FixedDecoder([[3.0, 0.0], [3.0, 0.0], [0.0, -50.0, 0.0]])  # code 1 last: never learnt
    new = 1  # item [0, 0, 1], under the likeliest prefix
    before = beam_search(dec, trie, 1, 4, 3, certify=True)
    assert new not in before.items[0].tolist() and before.items[0, 0] == 0
    after = beam_search(dec, trie, 1, 4, 3, certify=True, spread=0.5)
    assert after.items[0, :2].tolist() == [0, new]


def renormalised_scores(dec: ToyDecoder, codes: torch.Tensor,
                        excluded: dict[int, set[int]]) -> torch.Tensor:
    """[U, I]: each item's score with every level renormalised over the codes that lead to at
    least one item outside the query's excluded set (-inf for excluded items), by teacher
    forcing and counting (the enumeration)."""
    u, i = dec.query.shape[0], codes.shape[0]
    rows = [tuple(r) for r in codes.tolist()]
    total = torch.zeros(u, i, dtype=torch.float64)
    for q in range(u):
        left = {item for item in range(i) if item not in excluded.get(q, set())}
        for item in range(i):
            if item not in left:
                total[q, item] = float("-inf")
                continue
            state = dec.query[q].clone()
            for level in range(codes.shape[1]):
                logp = torch.log_softmax(torch.tanh(state) @ dec.out[level].t(), dim=0)
                prefix = rows[item][:level]
                ok = sorted({rows[o][level] for o in left if rows[o][:level] == prefix})
                total[q, item] += logp[rows[item][level]] - torch.logsumexp(logp[ok], 0)
                state = state + dec.code[level][rows[item][level]]
    return total


@pytest.mark.parametrize("seed", range(3))
def test_renormalised_search_is_the_exact_top_k_over_the_codes_left(seed):
    """With exclusions that cover whole subtrees (every item below a prefix): each level's
    probabilities renormalised over the codes still leading somewhere; certified search equals
    the enumeration, never returns an excluded item, and differs from the plain scores."""
    num_codes = [3, 3, 2]
    codes = random_codes(14, num_codes, seed)
    trie = CodeTrie(codes, num_codes)
    dec = ToyDecoder(5, num_codes, seed)
    g = torch.Generator().manual_seed(seed)
    excluded: dict[int, set[int]] = {}
    pairs = []
    for q in range(5):
        first = int(codes[torch.randint(14, (1,), generator=g), 0])  # a whole level-1 subtree
        items = {i for i in range(14) if int(codes[i, 0]) == first}
        items |= {int(x) for x in torch.randint(14, (3,), generator=g)}
        excluded[q] = items
        pairs += [(q, it) for it in sorted(items)] + [(q, min(items))]  # a repeat
    query = torch.tensor([p[0] for p in pairs])
    item = torch.tensor([p[1] for p in pairs])
    want = renormalised_scores(dec, codes, excluded)
    plain_scores = dec.item_scores(codes).masked_fill(~torch.isfinite(want), float("-inf"))
    assert not torch.allclose(want[torch.isfinite(want)], plain_scores[torch.isfinite(want)])
    want_scores, want_items = want.topk(4, dim=1)
    for beam in (1, 3):
        got = beam_search(dec, trie, 5, beam, 4, certify=True, excluded=(query, item),
                          renormalise=True)
        assert torch.equal(got.items, want_items), beam
        torch.testing.assert_close(got.scores, want_scores)
        for q in range(5):
            assert not set(got.items[q].tolist()) & excluded[q]


def test_covered_children_are_the_codes_whose_items_are_all_excluded():
    num_codes = [2, 3, 2]
    codes = random_codes(10, num_codes, seed=5)
    trie = CodeTrie(codes, num_codes)
    rows = [tuple(r) for r in codes.tolist()]
    excluded = {0: {0, 1, 2, 3, 4}, 1: {int(i) for i in range(10) if rows[i][0] == rows[0][0]},
                2: set()}
    query = torch.tensor([q for q, s in excluded.items() for _ in s] + [0])
    item = torch.tensor([i for s in excluded.values() for i in sorted(s)] + [0])  # a repeat
    prefixes = [sorted({r[:level] for r in rows}) for level in range(4)]
    for level in range(3):
        q, parent, code = covered_children(trie, level, query, item)
        got = {(int(a), prefixes[level][int(b)] + (int(c),)) for a, b, c in zip(q, parent, code)}
        want = {(u, child) for u, items in excluded.items() for child in prefixes[level + 1]
                if {i for i in range(10) if rows[i][:level + 1] == child} <= items}
        assert got == want, level
        if level == 0:  # query 1's history holds a whole top-level subtree
            assert {u for u, _ in want} == {1}
