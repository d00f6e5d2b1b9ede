"""Each mask convention ("hstu", "peer") against masks written out by hand: the pair rule,
dense_mask, and the pytorch and triton backends (values and gradients against a dense
float64 reference that applies the hand-written masks).

Sample A: 8 tokens, 2 contextual, 3 history, 3 candidates in groups of 2 ([5, 6], [7]).
Sample B: 7 tokens, 1 contextual, 3 history, 3 candidates in groups of 2 ([4, 5], [6]).
Rows are queries i, columns keys j; docs/model.md "Mask conventions" states the rules.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from hstu.ops import dense_mask, hstu_attention

from .reference import grads, naive_attention, naive_mask, random_case

LENGTHS, CONTEXTUAL, CANDIDATES, GROUP = [8, 7], [2, 1], [3, 3], 2

KEYS = [("hstu", True), ("hstu", False), ("peer", True), ("peer", False)]
IDS = [f"{conv}-{'causal' if causal else 'noncausal'}" for conv, causal in KEYS]

# The masks written out by hand: line i holds query i's row of sample A's four masks (the
# conventions of KEYS in order), then of sample B's; one character a key j (1: i sees j).
# Causal: "hstu" contextual rows see the contextual block, "peer" ones every non-candidate;
# history rows are causal; a candidate sees the non-candidates and the earlier candidates of
# its group. Non-causal: "hstu" non-candidates see every non-candidate and no candidate, "peer"
# ones everything; a candidate sees its whole group.
MASKS = """
    11000000 11111000 11111000 11111111   1000000 1111000 1111000 1111111
    11000000 11111000 11111000 11111111   1100000 1111000 1100000 1111111
    11100000 11111000 11100000 11111111   1110000 1111000 1110000 1111111
    11110000 11111000 11110000 11111111   1111000 1111000 1111000 1111111
    11111000 11111000 11111000 11111111   1111100 1111110 1111100 1111110
    11111100 11111110 11111100 11111110   1111110 1111110 1111110 1111110
    11111110 11111110 11111110 11111110   1111001 1111001 1111001 1111001
    11111001 11111001 11111001 11111001
"""


def _hand(key: tuple[str, bool]) -> list[torch.Tensor]:
    """The hand-written masks of ``key``, one bool [n, n] per sample."""
    lines = [line.split() for line in MASKS.strip().splitlines()]
    return [
        torch.tensor([[c == "1" for c in line[s * len(KEYS) + KEYS.index(key)]] for line in lines[:n]])
        for s, n in enumerate(LENGTHS)
    ]


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_rule_and_dense_mask_match_the_hand_written_masks(key: tuple[str, bool]) -> None:
    convention, causal = key
    want = _hand(key)
    width = 9  # one padding slot beyond the longest sample
    got = dense_mask(
        torch.tensor(LENGTHS), torch.tensor(CONTEXTUAL), torch.tensor(CANDIDATES), GROUP,
        causal, width, convention,
    )
    for s, n in enumerate(LENGTHS):
        rule = naive_mask(n, CONTEXTUAL[s], CANDIDATES[s], GROUP, causal, convention)
        assert torch.equal(rule, want[s]), f"pair rule, sample {s}"
        padded = torch.zeros(width, width, dtype=torch.bool)
        padded[:n, :n] = want[s]
        assert torch.equal(got[s], padded), f"dense_mask, sample {s}"


@pytest.mark.parametrize("causal", [True, False])
def test_the_conventions_differ_only_where_documented(causal: bool) -> None:
    """causal: contextual rows on the later history; non-causal: non-candidate rows on the
    candidates. Nothing else moves, and "peer" only ever adds keys."""
    for s, n in enumerate(LENGTHS):
        ours, peer = _hand(("hstu", causal))[s], _hand(("peer", causal))[s]
        assert not (ours & ~peer).any()
        i = torch.arange(n).view(-1, 1)
        j = torch.arange(n).view(1, -1)
        first_candidate = n - CANDIDATES[s]
        if causal:
            where = (i < CONTEXTUAL[s]) & (j >= CONTEXTUAL[s]) & (j < first_candidate)
        else:
            where = (i < first_candidate) & (j >= first_candidate)
        assert torch.equal(peer & ~ours, where), f"sample {s}"


def _against_hand_written(key: tuple[str, bool], backend: str, dtype: torch.dtype,
                          device: str, tol: dict) -> None:
    convention, causal = key
    case = random_case(
        LENGTHS, num_heads=2, head_dim=16, num_contextual=CONTEXTUAL, num_targets=CANDIDATES,
        rab="pos", max_positions=8, dtype=dtype, device=device, seed=11,
    )
    got = hstu_attention(
        case.q, case.k, case.v, case.offsets, case.max_seqlen, alpha=0.4, scaling_seqlen=8,
        causal=causal, num_contextual=case.num_contextual, num_targets=case.num_targets,
        target_group_size=GROUP, rab=case.rab, mask_convention=convention, backend=backend,
        strict=True,
    )
    want = naive_attention(
        case, alpha=0.4, scaling_seqlen=8, causal=causal, target_group_size=GROUP,
        masks=_hand(key),
    )
    torch.testing.assert_close(got.double(), want, **tol)
    names = ["q", "k", "v", "pos_weights"]
    for name, a, b in zip(names, grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_pytorch_backend_against_the_hand_written_masks(key: tuple[str, bool]) -> None:
    _against_hand_written(key, "pytorch", torch.float64, "cpu", {"rtol": 1e-10, "atol": 1e-12})


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_triton_backend_against_the_hand_written_masks(
    key: tuple[str, bool], triton_backend: ModuleType, device: str
) -> None:
    tol = {"rtol": 1e-4, "atol": 1e-5} if device == "cpu" else {"rtol": 2e-3, "atol": 2e-4}
    _against_hand_written(key, "triton", torch.float32, device, tol)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_triton_peer_mask_across_tiles(causal: bool, triton_backend: ModuleType, device: str) -> None:
    """Samples longer than one 16-row tile: contextual rows (within the first tile, or across
    it) reaching history keys tiles later, key blocks of candidates seen by every
    non-candidate row (the kernels' key ranges and row ranges)."""
    lengths, ctx, tgt = [40, 18], [5, 17], [9, 1]
    case = random_case(lengths, num_heads=1, num_contextual=ctx, num_targets=tgt, rab="pos",
                       max_positions=40, device=device, seed=3)
    # 16 x 16 tiles on a GPU too (the interpreter's only tiles)
    got = triton_backend.triton_hstu_attention(
        case.q, case.k, case.v, case.offsets, case.max_seqlen, alpha=0.3, scaling_seqlen=40,
        causal=causal, num_contextual=case.num_contextual, num_targets=case.num_targets,
        target_group_size=3, rab=case.rab, mask_convention="peer", block_m=16, block_n=16,
    )
    want = naive_attention(
        case, alpha=0.3, scaling_seqlen=40, causal=causal, target_group_size=3,
        masks=[naive_mask(n, c, t, 3, causal, "peer") for n, c, t in zip(lengths, ctx, tgt)],
    )
    tol = {"rtol": 1e-4, "atol": 1e-5} if device == "cpu" else {"rtol": 2e-3, "atol": 2e-4}
    torch.testing.assert_close(got.double(), want, **tol)
    for a, b in zip(grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(a.double(), b.double(), **tol)


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
def test_an_unknown_convention_is_refused_in_one_line(backend: str, triton_backend: ModuleType,
                                                      device: str) -> None:
    case = random_case([4], device=device)
    with pytest.raises(ValueError, match=r"^mask_convention must be one of \['hstu', 'peer'\], got 'meta'$"):
        hstu_attention(case.q, case.k, case.v, case.offsets, 4, alpha=1.0, scaling_seqlen=4,
                       mask_convention="meta", backend=backend, strict=True)
    with pytest.raises(ValueError, match=r"^mask_convention must be one of"):
        dense_mask(torch.tensor([4]), None, None, 1, True, 4, "meta")
