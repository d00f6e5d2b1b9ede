import math

import torch

from hstu.ops.rab import NUM_TIME_BUCKETS, time_bucket, time_buckets


def _group(b: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (b,), generator=gen)
    lengths[0] = n
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    total = int(offsets[-1])
    # gaps from 0 s to ~30 years: every bucket from 0 up to the last is hit
    gaps = (10.0 ** (torch.rand(total, generator=gen) * 9)).to(torch.int64)
    gaps[torch.rand(total, generator=gen) < 0.2] = 0
    stamps = 1_600_000_000 + gaps.cumsum(0) - gaps.sum() // 2  # negative differences too
    slot = torch.arange(n)
    valid = slot.view(1, -1) < lengths.view(-1, 1)
    token_index = torch.where(valid, offsets[:-1].view(-1, 1) + slot.view(1, -1), 0)
    return stamps, token_index, lengths


def _by_definition(stamps, token_index, lengths):
    ts = stamps[token_index]
    n = ts.shape[1]
    nxt = torch.minimum(torch.arange(n).view(1, -1) + 1, (lengths.view(-1, 1) - 1).clamp(min=0))
    return time_bucket(torch.gather(ts, 1, nxt).unsqueeze(2) - ts.unsqueeze(1))


def test_time_buckets_in_cache_sized_pieces_equal_the_definition() -> None:
    """The CPU path builds the buckets a few samples at a time in reused scratch; b = 60 at
    n = 50 spans three pieces. Every value equals the one-pass definition, blocks included."""
    stamps, token_index, lengths = _group(60, 50)
    want = _by_definition(stamps, token_index, lengths)
    assert int(want.max()) >= 60 and int(want.min()) == 0  # wide range of buckets exercised
    assert int(want.max()) <= NUM_TIME_BUCKETS - 1
    got = time_buckets(stamps, token_index, lengths)
    assert torch.equal(got, want)
    for rows, keys in ((slice(0, 25), slice(0, 25)), (slice(25, 50), slice(0, 50))):
        block = time_buckets(stamps, token_index, lengths, rows, keys)
        assert torch.equal(block, want[:, rows, keys])


def test_time_bucket_at_its_boundaries() -> None:
    """bucket(x) = floor(ln(max(|x|, 1)) / 0.301): spot values by hand, symmetric in sign."""
    x = torch.tensor([0, 1, 2, 3, 4, 100, 10**6, 10**9, 2**62])
    want = [0, 0, 2, 3, 4, 15, 45, 68, 128]  # ln(2)/0.301 = 2.30, ln(100)/0.301 = 15.30, ...
    assert time_bucket(x).tolist() == want
    assert time_bucket(-x).tolist() == want


def test_query_time_sets_the_last_rows_buckets_only() -> None:
    """With query times, row L-1 of each sample is bucket(query_time - t[j]) (by hand, with
    math.log), every other row is as without them (t_next[i] = t[i + 1])."""
    stamps, token_index, lengths = _group(7, 12, seed=3)
    gen = torch.Generator().manual_seed(4)
    last = stamps[token_index.gather(1, (lengths - 1).view(-1, 1)).view(-1)]
    query = last + (10.0 ** (torch.rand(7, generator=gen) * 8)).to(torch.int64)
    plain = time_buckets(stamps, token_index, lengths)
    got = time_buckets(stamps, token_index, lengths, query_timestamps=query)
    for s in range(7):
        n = int(lengths[s])
        t = stamps[token_index[s, :n]].tolist()
        want = [min(128, max(0, math.floor(math.log(max(abs(int(query[s]) - tj), 1)) / 0.301)))
                for tj in t]
        assert got[s, n - 1, :n].tolist() == want
        assert torch.equal(got[s, : n - 1], plain[s, : n - 1])
    assert not torch.equal(got, plain)  # the query times moved some buckets
    block = time_buckets(stamps, token_index, lengths, slice(6, 12), slice(0, 12), query)
    assert torch.equal(block, got[:, 6:12])
