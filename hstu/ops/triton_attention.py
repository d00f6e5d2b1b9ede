"""Fused jagged HSTU attention in Triton: forward and backward, masks and bias in-kernel.

Legend: T total tokens, B samples, H heads, d head dim (padded to D, a power of two >= 16),
L the length of the current sample, C its contextual tokens, G its candidates, g the target
group size, P the position table's max length, BM/BN query/key tile sizes.

Work split (one program per tile row, per sample and head):
- forward and dq: program (b*H + h, query block); it loops over the key blocks the query rows
  can see, in two ranges: [0, non-candidate end) and the candidate groups of its rows; key
  blocks that are fully masked (other target groups, the causal future) are never loaded.
- dk/dv: program (b*H + h, key block); it loops over the query blocks that can see it. The
  bias gradients are scattered into float32 [2P-1] and [129] buffers with atomics.
- the semi-local window (constexpr WINDOW, W = max_attn_len and M = min_full as runtime
  ints): the ranges above are narrowed to the keys (query rows) within W of the block, plus
  the contextual keys ("hstu") or rows, the candidate groups and the last M rows, which the
  window keeps whatever the distance; so a pass costs O(L * W) per sample, not O(L^2).
No [T, T] or [B, N, N] tensor exists at any point; the backward recomputes the scores.

Import this module only after ``TRITON_INTERPRET`` has its final value: Triton decides at
decoration time whether these kernels compile or run in its CPU interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from hstu.ops.masks import AttentionOptions
from hstu.ops.rab import NUM_TIME_BUCKETS

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The kernels use only Triton builtins, no @triton.jit helpers of triton.language.standard
# (sigmoid, cdiv, zeros): those are decorated when triton is first imported, so under an
# interpreter switched on after that import they would not run.


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


# The helpers take the per-sample values as tuples (Triton inlines them):
#   smp = (seqlen, num_ctx, first_cand, group_size, max_attn_len, min_full), the sample's mask
#   bias = (pos_w, ts_w, ts_ptr, qt, num_pos), the bias inputs (ts_ptr at the sample)
# and the constexpr flags as MASK = (CAUSAL, HAS_CONTEXT, HAS_TARGETS, PEER, WINDOW) and
# RAB = (HAS_POS, HAS_TS, HAS_QT, NUM_BUCKETS).


@triton.jit
def _allowed(i, j, smp, MASK: tl.constexpr):
    """i, j: broadcastable int32 query/key positions inside the sample -> bool tile; the
    mask of hstu.ops.masks, "peer" convention when PEER, the semi-local window (W =
    max_attn_len, M = min_full) when WINDOW."""
    seqlen, num_ctx, first_cand, group_size, max_attn_len, min_full = smp
    CAUSAL, HAS_CONTEXT, HAS_TARGETS, PEER, WINDOW = MASK
    inside = (i < seqlen) & (j < seqlen)
    if CAUSAL:
        rule = j <= i
    else:
        rule = (i >= 0) & (j >= 0)
    if HAS_TARGETS:
        i_cand = i >= first_cand
        j_cand = j >= first_cand
        same_group = (tl.maximum(i - first_cand, 0) // group_size) == (
            tl.maximum(j - first_cand, 0) // group_size
        )
        if PEER:
            rule = rule & ((j_cand == 0) | (i_cand == 0) | same_group)
        else:
            rule = rule & ((j_cand == 0) | (i_cand & same_group))
    if HAS_CONTEXT:
        if PEER:
            rule = rule | ((i < num_ctx) & (j < first_cand))
        else:
            rule = rule | ((i < num_ctx) & (j < num_ctx))
    if WINDOW:
        pos_i = _window_pos(i, num_ctx, first_cand)
        pos_j = _window_pos(j, num_ctx, first_cand)
        near = tl.abs(pos_i - pos_j) <= max_attn_len
        # rows from pos first_cand - M on see the whole history (M > 0; past pos L - G else)
        full_from = tl.where(min_full > 0, first_cand - min_full, seqlen + 1)
        near = near | (pos_i >= full_from)
        if HAS_CONTEXT:
            near = near | ((i < num_ctx) & (j < first_cand))
            if not PEER:
                near = near | (j < num_ctx)
        rule = rule & near
    return inside & rule


@triton.jit
def _window_pos(t, num_ctx, first_cand):
    """pos(t) of the semi-local rule (hstu.ops.masks): contextual tokens at C - 1,
    candidates at the first candidate."""
    return tl.minimum(tl.maximum(t, num_ctx - 1), first_cand)


@triton.jit
def _pos_index(i, j, num_pos):
    return tl.minimum(tl.maximum(num_pos - 1 + j - i, 0), 2 * num_pos - 2)


@triton.jit
def _ts_bucket(i, j, seqlen, ts_ptr, qt, HAS_QT: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """Bucket of |t[i+1] - t[j]| (t[i+1] := the query time qt with HAS_QT, else t[i], for the
    last token); ts_ptr at the sample."""
    nxt = tl.maximum(tl.minimum(i + 1, seqlen - 1), 0)
    t_next = tl.load(ts_ptr + nxt, mask=i < seqlen, other=0)
    if HAS_QT:
        t_next = tl.where(i == seqlen - 1, qt, t_next)
    t_key = tl.load(ts_ptr + j, mask=j < seqlen, other=0)
    magnitude = tl.maximum(tl.abs(t_next - t_key), 1).to(tl.float32)
    bucket = (tl.log(magnitude) / 0.301).to(tl.int32)  # >= 0, so truncation is floor
    return tl.minimum(tl.maximum(bucket, 0), NUM_BUCKETS - 1)


@triton.jit
def _scores(
    a, b_t, i, j, alpha, smp, bias, MASK: tl.constexpr, RAB: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """alpha * a @ b_t + rab in float32, and which pairs (i, j) the mask keeps; a [X, D],
    b_t [D, Y], i/j broadcast to [X, Y]."""
    pos_w, ts_w, ts_ptr, qt, num_pos = bias
    HAS_POS, HAS_TS, HAS_QT, NUM_BUCKETS = RAB
    s = tl.dot(a, b_t, input_precision=PRECISION) * alpha
    if HAS_POS:
        s += tl.load(pos_w + _pos_index(i, j, num_pos)).to(tl.float32)
    if HAS_TS:
        bucket = _ts_bucket(i, j, smp[0], ts_ptr, qt, HAS_QT, NUM_BUCKETS)
        s += tl.load(ts_w + bucket).to(tl.float32)
    return s, _allowed(i, j, smp, MASK)


@triton.jit
def _program(
    offsets, num_ctx_ptr, num_tgt_ptr, num_heads, head_dim, group_size, max_attn_len,
    min_full, MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This program's sample b, head h, the first row (or key) of its block, the sample's
    first token, its smp, and its block: positions [first, first + BLOCK) of the sample,
    the lanes of d, the [BLOCK, BLOCK_D] mask of both in range and the block's token rows."""
    HAS_CONTEXT, HAS_TARGETS = MASK[1], MASK[2]
    pid_bh = tl.program_id(0)
    first = tl.program_id(1) * BLOCK
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start = tl.load(offsets + b)
    seqlen = (tl.load(offsets + b + 1) - start).to(tl.int32)
    num_ctx = 0
    first_cand = seqlen
    if HAS_CONTEXT:
        num_ctx = tl.load(num_ctx_ptr + b).to(tl.int32)
    if HAS_TARGETS:
        first_cand = seqlen - tl.load(num_tgt_ptr + b).to(tl.int32)
    smp = (seqlen, num_ctx, first_cand, group_size, max_attn_len, min_full)
    offs = first + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = (offs[:, None] < seqlen) & (offs_d[None, :] < head_dim)
    return b, h, first, start, smp, offs, offs_d, in_range, start + offs[:, None]


@triton.jit
def _bias(pos_w, ts_w, timestamps, query_ts, num_pos, start, b, HAS_QT: tl.constexpr):
    """The bias tuple of sample b, whose first token is ``start``."""
    ts_ptr = timestamps + start
    qt_slot = 0
    if HAS_QT:
        qt_slot = b
    qt = tl.load(query_ts + qt_slot)  # the sample's query time (HAS_QT), else unused
    return pos_w, ts_w, ts_ptr, qt, num_pos


@triton.jit
def _key_ranges(m0, smp, MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges a query block [m0, m0 + BM) needs, disjoint and in this order: [0, ctx_end)
    (WINDOW and "hstu": the contextual keys below the band), [start1, end1) (non-candidate
    keys; without WINDOW start1 = 0) and [lo2, hi2) (the candidate groups of its rows)."""
    seqlen, num_ctx, first_cand, group_size, max_attn_len, min_full = smp
    CAUSAL, HAS_CONTEXT, HAS_TARGETS, PEER, WINDOW = MASK
    m1 = tl.minimum(m0 + BLOCK_M, seqlen)
    key_end = seqlen
    if CAUSAL:
        key_end = m1
    if HAS_CONTEXT:
        if PEER:  # contextual rows see every non-candidate key
            key_end = tl.where(m0 < num_ctx, tl.maximum(key_end, first_cand), key_end)
        else:
            key_end = tl.where(m0 < num_ctx, tl.maximum(key_end, num_ctx), key_end)
    first_range_end = first_cand
    if PEER and not CAUSAL:  # non-candidate rows see the candidates too
        first_range_end = tl.where(m0 < first_cand, seqlen, first_cand)
    limit1 = tl.minimum(first_range_end, key_end)
    ctx_end = 0
    start1 = 0
    if WINDOW:
        # keys whose pos(j) is within W of pos(i) for some row of the block: pos is monotone
        # in the token index, so they form one token interval [band_lo, band_hi); a
        # contextual key is at pos C - 1, so the band reaches key 0 once it reaches C - 1
        pos_first = _window_pos(m0, num_ctx, first_cand)
        pos_last = _window_pos(m1 - 1, num_ctx, first_cand)
        band_lo = pos_first - max_attn_len
        band_lo = tl.where(band_lo > num_ctx - 1, band_lo, 0)
        band_hi = tl.where(
            pos_last + max_attn_len < first_cand, pos_last + max_attn_len + 1, seqlen
        )
        # rows that see every key the base mask allows: the last M history rows and the
        # candidates (M > 0), contextual rows
        full = pos_last >= tl.where(min_full > 0, first_cand - min_full, seqlen + 1)
        if HAS_CONTEXT:
            full = full | (m0 < num_ctx)
        band_lo = tl.where(full, 0, band_lo)
        band_hi = tl.where(full, seqlen, band_hi)
        start1 = (band_lo // BLOCK_N) * BLOCK_N
        if HAS_CONTEXT and not PEER:  # "hstu": contextual keys are seen by every row
            ctx_end = tl.minimum(((num_ctx + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, start1)
        limit1 = tl.minimum(limit1, band_hi)
    end1 = ((limit1 + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    lo2 = end1
    hi2 = end1
    if HAS_TARGETS and m1 > first_cand:
        first_row = tl.maximum(m0, first_cand)
        group_lo = first_cand + ((first_row - first_cand) // group_size) * group_size
        group_hi = first_cand + ((m1 - 1 - first_cand) // group_size + 1) * group_size
        lo2 = tl.maximum((group_lo // BLOCK_N) * BLOCK_N, end1)
        hi2 = tl.minimum(key_end, group_hi)
    return ctx_end, start1, end1, lo2, hi2


@triton.jit
def _rows_tile(
    acc, q, do, n0, offs_m, offs_d, kv, smp, bias, alpha, inv_scale, head_dim,
    MASK: tl.constexpr, RAB: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    DQ: tl.constexpr,
):
    """acc plus the key block [n0, n0 + BN) of the query rows offs_m: P V (forward), or with
    DQ dS K (dq, before its factor alpha); kv = (k_base, v_base, stride_kt, stride_vt)."""
    k_base, v_base, stride_kt, stride_vt = kv
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < smp[0]) & (offs_d[None, :] < head_dim)
    k = tl.load(
        k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    s, keep = _scores(
        q, tl.trans(k), offs_m[:, None], offs_n[None, :], alpha, smp, bias, MASK, RAB, PRECISION
    )
    sig = _sigmoid(s)
    if DQ:
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where(keep, dp * sig * (1.0 + s * (1.0 - sig)) * inv_scale, 0.0)
        acc = acc + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    else:
        p = tl.where(keep, s * sig * inv_scale, 0.0)
        acc = acc + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["max_attn_len", "min_full"])
def _hstu_rows_kernel(
    Q, K, V, DO, OUT, offsets, num_ctx_ptr, num_tgt_ptr, pos_w, ts_w, timestamps, query_ts,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_ot, stride_oh, num_heads, head_dim, alpha, inv_scale, group_size, num_pos,
    max_attn_len, min_full, CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_TARGETS: tl.constexpr, PEER: tl.constexpr, WINDOW: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TS: tl.constexpr, HAS_QT: tl.constexpr, NUM_BUCKETS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DQ: tl.constexpr,
):
    """The forward (OUT = O; DO unread) or, with DQ, the backward's dq (OUT = dQ): one
    program per (sample x head, query block of BM rows)."""
    MASK: tl.constexpr = (CAUSAL, HAS_CONTEXT, HAS_TARGETS, PEER, WINDOW)
    RAB: tl.constexpr = (HAS_POS, HAS_TS, HAS_QT, NUM_BUCKETS)
    b, h, m0, start, smp, offs_m, offs_d, row_mask, rows = _program(
        offsets, num_ctx_ptr, num_tgt_ptr, num_heads, head_dim, group_size, max_attn_len,
        min_full, MASK, BLOCK_M, BLOCK_D,
    )
    seqlen = smp[0]
    if m0 >= seqlen:
        return
    q = tl.load(Q + rows * stride_qt + h * stride_qh + offs_d[None, :], mask=row_mask, other=0.0)
    do = q  # read by dq only
    if DQ:
        do = tl.load(
            DO + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=row_mask, other=0.0
        )
    kv = (K + start * stride_kt + h * stride_kh, V + start * stride_vt + h * stride_vh,
          stride_kt, stride_vt)
    bias = _bias(pos_w, ts_w, timestamps, query_ts, num_pos, start, b, HAS_QT)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    ctx_end, start1, end1, lo2, hi2 = _key_ranges(m0, smp, MASK, BLOCK_M, BLOCK_N)
    if WINDOW:  # "hstu" contextual keys below the band
        for n0 in range(0, ctx_end, BLOCK_N):
            acc = _rows_tile(acc, q, do, n0, offs_m, offs_d, kv, smp, bias, alpha, inv_scale,
                             head_dim, MASK, RAB, PRECISION, BLOCK_N, DQ)
    for n0 in range(start1, end1, BLOCK_N):
        acc = _rows_tile(acc, q, do, n0, offs_m, offs_d, kv, smp, bias, alpha, inv_scale,
                         head_dim, MASK, RAB, PRECISION, BLOCK_N, DQ)
    for n0 in range(lo2, hi2, BLOCK_N):
        acc = _rows_tile(acc, q, do, n0, offs_m, offs_d, kv, smp, bias, alpha, inv_scale,
                         head_dim, MASK, RAB, PRECISION, BLOCK_N, DQ)
    out = OUT + rows * stride_ot + h * stride_oh + offs_d[None, :]
    if DQ:
        acc = acc * alpha
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=row_mask)
    # Rows past the grid (a sample longer than max_seqlen) get no program: the last block
    # writes NaN into them, so a too-small max_seqlen that was not checked (it costs a host
    # sync on CUDA) shows as a non-finite loss instead of training on zeros.
    if not DQ:  # noqa: SIM102 (a constexpr: the forward only)
        if tl.program_id(1) == tl.num_programs(1) - 1:
            nan_tile = tl.full([BLOCK_M, BLOCK_D], float("nan"), tl.float32)
            for r0 in range(m0 + BLOCK_M, seqlen, BLOCK_M):
                rows_past = r0 + tl.arange(0, BLOCK_M)
                past_mask = (rows_past[:, None] < seqlen) & (offs_d[None, :] < head_dim)
                tl.store(
                    OUT + (start + rows_past[:, None]) * stride_ot + h * stride_oh
                    + offs_d[None, :],
                    nan_tile.to(OUT.dtype.element_ty),
                    mask=past_mask,
                )


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, m0, j, offs_d, qdo, smp, bias, alpha, inv_scale, head_dim, DPOS, DTS,
    MASK: tl.constexpr, RAB: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dk, dv of a key block [BN, D] plus the query rows [m0, m0 + BM); bias gradients by
    atomics. qdo = (q_base, do_base, stride_qt, stride_dot)."""
    q_base, do_base, stride_qt, stride_dot = qdo
    HAS_POS, HAS_TS, HAS_QT, NUM_BUCKETS = RAB
    seqlen = smp[0]
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < head_dim)
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    )
    do = tl.load(
        do_base + offs_m[:, None].to(tl.int64) * stride_dot + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    )
    i = offs_m[None, :]
    # transposed tiles: [BN keys, BM queries]
    s_t, keep = _scores(k, tl.trans(q), i, j, alpha, smp, bias, MASK, RAB, PRECISION)
    sig = _sigmoid(s_t)
    p_t = tl.where(keep, s_t * sig * inv_scale, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = tl.where(keep, dp_t * sig * (1.0 + s_t * (1.0 - sig)) * inv_scale, 0.0)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    if HAS_POS:
        tl.atomic_add(DPOS + _pos_index(i, j, bias[4]), ds_t, mask=keep)
    if HAS_TS:
        bucket = _ts_bucket(i, j, seqlen, bias[2], bias[3], HAS_QT, NUM_BUCKETS)
        tl.atomic_add(DTS + bucket, ds_t, mask=keep)
    return dk, dv


@triton.jit
def _window_query_ranges(n0, n1, smp, MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query rows a key block [n0, n1) needs under the window, disjoint and in this order:
    [0, prefix_end) the contextual rows (by the base mask alone: the window keeps their
    non-candidate keys), [band_lo, band_hi) the rows within W of the block (every row for
    "hstu" contextual keys), [full_lo, full_hi) the last M history rows and the candidates
    where they do not continue the band."""
    seqlen, num_ctx, first_cand, group_size, max_attn_len, min_full = smp
    CAUSAL, HAS_CONTEXT, HAS_TARGETS, PEER, _ = MASK
    # the base mask, for the rows past the contextual ones
    row_lo = n0 * 0
    if CAUSAL:
        row_lo = n0
    row_hi = seqlen
    # candidate keys only: their groups' rows ("peer" without the causal mask: every
    # non-candidate row as well, so no narrowing there)
    if HAS_TARGETS and (CAUSAL or not PEER):
        cand_block = n0 >= first_cand
        group_lo = first_cand + ((n0 - first_cand) // group_size) * group_size
        group_hi = first_cand + ((n1 - 1 - first_cand) // group_size + 1) * group_size
        row_lo = tl.where(cand_block, tl.maximum(row_lo, group_lo), row_lo)
        row_hi = tl.where(cand_block, tl.minimum(seqlen, group_hi), row_hi)
    prefix_end = n0 * 0
    if HAS_CONTEXT:
        if PEER:
            if CAUSAL:
                needed = n0 < first_cand
            else:
                needed = n0 >= 0
        else:
            if CAUSAL:
                needed = n0 < num_ctx
            else:
                needed = n0 < first_cand
        prefix_end = tl.where(needed, ((num_ctx + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, 0)
    # rows whose pos(i) is within W of pos(j) for some key of the block: one token interval
    pos_first = _window_pos(n0, num_ctx, first_cand)
    pos_last = _window_pos(n1 - 1, num_ctx, first_cand)
    band_lo = pos_first - max_attn_len
    band_lo = tl.where(band_lo > num_ctx - 1, band_lo, 0)
    band_hi = tl.where(pos_last + max_attn_len < first_cand, pos_last + max_attn_len + 1, seqlen)
    if HAS_CONTEXT and not PEER:  # "hstu": contextual keys are seen by every row
        band_lo = tl.where(n0 < num_ctx, 0, band_lo)
        band_hi = tl.where(n0 < num_ctx, seqlen, band_hi)
    # rows that see every key (M > 0): pos(i) >= first_cand - M, a suffix of the sample
    full_lo = first_cand - min_full
    full_lo = tl.where(full_lo > num_ctx - 1, full_lo, 0)
    full_lo = tl.where(min_full > 0, full_lo, seqlen)
    merged = full_lo <= band_hi
    band_lo = tl.where(merged, tl.minimum(band_lo, full_lo), band_lo)
    band_hi = tl.where(merged, seqlen, band_hi)
    band_lo = tl.maximum((tl.maximum(band_lo, row_lo) // BLOCK_M) * BLOCK_M, prefix_end)
    band_hi = tl.minimum(band_hi, row_hi)
    full_hi = row_hi
    full_lo = tl.maximum((tl.maximum(full_lo, row_lo) // BLOCK_M) * BLOCK_M, prefix_end)
    band_end = tl.where(band_hi > band_lo, ((band_hi + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, 0)
    full_lo = tl.maximum(full_lo, band_end)
    full_lo = tl.where(merged, full_hi, full_lo)
    return prefix_end, band_lo, band_hi, full_lo, full_hi


@triton.jit(do_not_specialize=["max_attn_len", "min_full"])
def _hstu_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DPOS, DTS, offsets, num_ctx_ptr, num_tgt_ptr, pos_w, ts_w, timestamps,
    query_ts, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
    stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, num_heads, head_dim, alpha,
    inv_scale, group_size, num_pos, max_attn_len, min_full, CAUSAL: tl.constexpr,
    HAS_CONTEXT: tl.constexpr, HAS_TARGETS: tl.constexpr, PEER: tl.constexpr,
    WINDOW: tl.constexpr, HAS_POS: tl.constexpr, HAS_TS: tl.constexpr, HAS_QT: tl.constexpr,
    NUM_BUCKETS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv and the bias gradients: one program per (sample x head, key block of BN keys)."""
    MASK: tl.constexpr = (CAUSAL, HAS_CONTEXT, HAS_TARGETS, PEER, WINDOW)
    RAB: tl.constexpr = (HAS_POS, HAS_TS, HAS_QT, NUM_BUCKETS)
    b, h, n0, start, smp, offs_n, offs_d, col_mask, cols = _program(
        offsets, num_ctx_ptr, num_tgt_ptr, num_heads, head_dim, group_size, max_attn_len,
        min_full, MASK, BLOCK_N, BLOCK_D,
    )
    seqlen, num_ctx, first_cand = smp[0], smp[1], smp[2]
    if n0 >= seqlen:
        return
    k = tl.load(K + cols * stride_kt + h * stride_kh + offs_d[None, :], mask=col_mask, other=0.0)
    v = tl.load(V + cols * stride_vt + h * stride_vh + offs_d[None, :], mask=col_mask, other=0.0)
    qdo = (Q + start * stride_qt + h * stride_qh, DO + start * stride_dot + h * stride_doh,
           stride_qt, stride_dot)
    bias = _bias(pos_w, ts_w, timestamps, query_ts, num_pos, start, b, HAS_QT)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)

    # query rows that can see this key block
    n1 = tl.minimum(n0 + BLOCK_N, seqlen)
    if WINDOW:
        prefix_end, row_lo, row_hi, full_lo, full_hi = _window_query_ranges(
            n0, n1, smp, MASK, BLOCK_M
        )
    else:
        row_lo = n0 * 0
        if CAUSAL:
            row_lo = n0
            if HAS_CONTEXT:
                row_lo = tl.where(n0 < num_ctx, 0, n0)
        row_hi = seqlen
        if HAS_TARGETS and n0 >= first_cand:  # candidate keys only: their groups' rows
            group_lo = first_cand + ((n0 - first_cand) // group_size) * group_size
            group_hi = first_cand + ((n1 - 1 - first_cand) // group_size + 1) * group_size
            row_lo = tl.maximum(row_lo, group_lo)
            row_hi = tl.minimum(seqlen, group_hi)
        row_lo = (row_lo // BLOCK_M) * BLOCK_M

        # "peer": rows [0, prefix_end) first (contextual rows that see every non-candidate key;
        # non-candidate rows that see candidate keys without the causal mask), then the rest
        prefix_end = n0 * 0
        if PEER:
            if CAUSAL:
                if HAS_CONTEXT:
                    prefix_end = tl.where(n0 < first_cand, num_ctx, 0)
            else:
                if HAS_TARGETS:
                    prefix_end = tl.where(n0 >= first_cand, first_cand, 0)
        prefix_end = ((prefix_end + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        row_lo = tl.maximum(row_lo, prefix_end)

    j = offs_n[:, None]
    for m0 in range(0, prefix_end, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, m0, j, offs_d, qdo, smp, bias, alpha, inv_scale,
                            head_dim, DPOS, DTS, MASK, RAB, PRECISION, BLOCK_M)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, m0, j, offs_d, qdo, smp, bias, alpha, inv_scale,
                            head_dim, DPOS, DTS, MASK, RAB, PRECISION, BLOCK_M)
    if WINDOW:  # the last M history rows and the candidates, past the band
        for m0 in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, m0, j, offs_d, qdo, smp, bias, alpha, inv_scale,
                                head_dim, DPOS, DTS, MASK, RAB, PRECISION, BLOCK_M)
    tl.store(
        DK + cols * stride_dkt + h * stride_dkh + offs_d[None, :],
        (dk * alpha).to(DK.dtype.element_ty),
        mask=col_mask,
    )
    tl.store(
        DV + cols * stride_dvt + h * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_mask,
    )


# Tile candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), the first one the default. Each
# (pass, padded head dim, dtype, length bucket, mask/bias flags) is timed once on its first
# call and the fastest is cached for the process; HSTU_TRITON_AUTOTUNE=0 keeps the default
# (no timing: runs choose the same tiles, so the float sums are in the same order).
GPU_TILES_UP_TO_128 = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2),
                       (32, 32, 4, 1)]
GPU_TILES_ABOVE_128 = [(64, 32, 8, 1), (32, 32, 4, 1), (64, 64, 8, 1)]
INTERPRETER_TILES = [(16, 16, 1, 1)]  # one config: the interpreter is never timed
TUNING_REPEATS = 3

_tuned: dict[tuple, dict[str, int]] = {}


def autotune_enabled() -> bool:
    return os.environ.get("HSTU_TRITON_AUTOTUNE", "1") not in ("", "0")


def length_bucket(max_seqlen: int) -> int:
    """Powers of two from 16: lengths 513..1024 share their tiles."""
    return max(16, triton.next_power_of_2(max(int(max_seqlen), 1)))


def tile_candidates(padded_head_dim: int) -> list[tuple[int, int, int, int]]:
    if INTERPRETED:
        return INTERPRETER_TILES
    return GPU_TILES_UP_TO_128 if padded_head_dim <= 128 else GPU_TILES_ABOVE_128


def _as_config(tile: tuple[int, int, int, int], padded: int) -> dict[str, int]:
    block_m, block_n, warps, stages = tile
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": padded,
        "num_warps": warps,
        "num_stages": stages,
    }


def choose_tiles(
    key: tuple,
    candidates: list[dict[str, int]],
    measure: Callable[[dict[str, int]], float] | None,
) -> dict[str, int]:
    """The cached choice for ``key``, else the candidate ``measure`` finds fastest (the first
    one when ``measure`` is None or only one candidate exists). A candidate that does not
    fit the GPU (triton's OutOfResources) is skipped."""
    if key in _tuned:
        return _tuned[key]
    best = candidates[0]
    if measure is not None and len(candidates) > 1:
        timings = []
        for cfg in candidates:
            try:
                timings.append((measure(cfg), len(timings), cfg))
            except OutOfResources:
                continue
        if not timings:
            raise RuntimeError(f"hstu triton attention: no tile configuration fits for {key}")
        best = min(timings)[2]
    _tuned[key] = best
    return best


def _cuda_timer(launch: Callable[[dict[str, int]], None]) -> Callable[[dict[str, int]], float]:
    """Milliseconds of TUNING_REPEATS launches after one warm-up (which also compiles).

    Timing waits for the GPU: a host sync, once per tuning key. It runs with the sync debug
    mode switched off so that `set_sync_debug_mode("error")` checks the steps, not this
    one-off choice; HSTU_TRITON_AUTOTUNE=0 removes it.
    """

    def measure(cfg: dict[str, int]) -> float:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            launch(cfg)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(TUNING_REPEATS):
                launch(cfg)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    return measure


def _tile_config(
    pass_name: str,
    head_dim: int,
    dtype: torch.dtype,
    max_seqlen: int,
    flags: dict,
    block_m: int | None,
    block_n: int | None,
    launch: Callable[[dict[str, int]], None],
    device: torch.device,
) -> dict[str, int]:
    """Tiles for one pass ("fwd" | "bwd"): explicit sizes, else the tuned choice."""
    padded = max(16, triton.next_power_of_2(head_dim))
    candidates = [_as_config(t, padded) for t in tile_candidates(padded)]
    if block_m is not None or block_n is not None:
        cfg = dict(candidates[0])
        cfg["BLOCK_M"] = block_m or cfg["BLOCK_M"]
        cfg["BLOCK_N"] = block_n or cfg["BLOCK_N"]
        return cfg
    key = (pass_name, padded, dtype, length_bucket(max_seqlen), tuple(sorted(flags.items())))
    timed = device.type == "cuda" and autotune_enabled()
    return choose_tiles(key, candidates, _cuda_timer(launch) if timed else None)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _HstuAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos_weights: Tensor | None,
        ts_weights: Tensor | None,
        offsets: Tensor,
        timestamps: Tensor | None,
        query_timestamps: Tensor | None,
        num_contextual: Tensor | None,
        num_targets: Tensor | None,
        max_seqlen: int,
        alpha: float,
        scaling_seqlen: int,
        causal: bool,
        target_group_size: int,
        block_m: int | None,
        block_n: int | None,
        peer: bool,
        max_attn_len: int,
        min_full_attn_seq_len: int,
    ) -> Tensor:
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        num_tokens, num_heads, head_dim = q.shape
        num_samples = offsets.numel() - 1
        out = torch.zeros_like(q)
        dummy = offsets  # never read when its HAS_ flag is off
        flags = {
            "CAUSAL": causal,
            "HAS_CONTEXT": num_contextual is not None,
            "HAS_TARGETS": num_targets is not None,
            "PEER": peer,
            "WINDOW": max_attn_len > 0,
            "HAS_POS": pos_weights is not None,
            "HAS_TS": ts_weights is not None,
            "HAS_QT": ts_weights is not None and query_timestamps is not None,
            "NUM_BUCKETS": NUM_TIME_BUCKETS,
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        }
        num_pos = (pos_weights.numel() + 1) // 2 if pos_weights is not None else 1
        tensors = (
            offsets,
            num_contextual if num_contextual is not None else dummy,
            num_targets if num_targets is not None else dummy,
            pos_weights if pos_weights is not None else q,
            ts_weights if ts_weights is not None else q,
            timestamps if timestamps is not None else dummy,
            query_timestamps if query_timestamps is not None else dummy,
        )
        scalars = (
            num_heads, head_dim, float(alpha), 1.0 / scaling_seqlen, int(target_group_size),
            num_pos, int(max_attn_len), int(min_full_attn_seq_len),
        )
        # the q, k, v strides and those of the rows kernel's DO (unread by the forward)
        strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *q.stride()[:2])

        def launch(cfg: dict[str, int]) -> None:
            grid = (num_samples * num_heads, triton.cdiv(max_seqlen, cfg["BLOCK_M"]))
            _hstu_rows_kernel[grid](
                q, k, v, q, out, *tensors, *strides, out.stride(0), out.stride(1), *scalars,
                **flags, **cfg, DQ=False,
            )

        if num_tokens > 0 and num_samples > 0 and max_seqlen > 0:
            launch(
                _tile_config(
                    "fwd", head_dim, q.dtype, max_seqlen, flags, block_m, block_n, launch,
                    q.device,
                )
            )
        ctx.save_for_backward(q, k, v, pos_weights, ts_weights, *tensors[:3], *tensors[5:])
        ctx.meta = (max_seqlen, scalars, flags, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):  # type: ignore[override]
        (q, k, v, pos_weights, ts_weights, offsets, num_ctx, num_tgt, timestamps,
         query_timestamps) = ctx.saved_tensors
        max_seqlen, scalars, flags, block_m, block_n = ctx.meta
        d_out = _last_dim_contiguous(d_out)
        num_heads = q.shape[1]
        num_samples = offsets.numel() - 1
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dpos = torch.zeros(
            pos_weights.numel() if pos_weights is not None else 1,
            dtype=torch.float32,
            device=q.device,
        )
        dts = torch.zeros(NUM_TIME_BUCKETS, dtype=torch.float32, device=q.device)
        tensors = (
            offsets,
            num_ctx,
            num_tgt,
            pos_weights if pos_weights is not None else q,
            ts_weights if ts_weights is not None else q,
            timestamps,
            query_timestamps,
        )
        strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *d_out.stride()[:2])

        def launch(cfg: dict[str, int]) -> None:
            grid_q = (num_samples * num_heads, triton.cdiv(max_seqlen, cfg["BLOCK_M"]))
            _hstu_rows_kernel[grid_q](
                q, k, v, d_out, dq, *tensors, *strides, dq.stride(0), dq.stride(1), *scalars,
                **flags, **cfg, DQ=True,
            )
            grid_k = (num_samples * num_heads, triton.cdiv(max_seqlen, cfg["BLOCK_N"]))
            _hstu_bwd_dkdv_kernel[grid_k](
                q, k, v, d_out, dk, dv, dpos, dts, *tensors, *strides, dk.stride(0),
                dk.stride(1), dv.stride(0), dv.stride(1), *scalars, **flags, **cfg,
            )

        if q.shape[0] > 0 and num_samples > 0 and max_seqlen > 0:
            cfg = _tile_config(
                "bwd", q.shape[2], q.dtype, max_seqlen, flags, block_m, block_n, launch, q.device
            )
            # timing runs (first call of a tuning key) accumulated into the bias gradients
            dpos.zero_()
            dts.zero_()
            launch(cfg)
        d_pos = dpos.to(pos_weights.dtype) if pos_weights is not None else None
        d_ts = dts.to(ts_weights.dtype) if ts_weights is not None else None
        return (dq, dk, dv, d_pos, d_ts) + (None,) * 15


def triton_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    max_seqlen: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    **options: Any,
) -> Tensor:
    """Fused jagged HSTU attention; the arguments of ``hstu.ops.hstu_attention``
    (``options``: the fields of ``AttentionOptions``).

    q, k, v need unit stride on d only (token/head strides are free, so slices of a fused
    U/V/Q/K projection need no copy); rows past ``max_seqlen`` come out NaN. The mask
    convention is a constexpr of the kernels; with a window (``max_attn_len`` W > 0) the key
    and query loops visit only the blocks the band, the contextual tokens, the candidates
    and the last M rows need (W = 0: the kernels without any window code).

    Args:
        block_m, block_n: tile sizes override (powers of two >= 16), for tests and tuning;
            by default the tiles are autotuned per (head dim, dtype, length bucket).

    Returns:
        [T, H, d] in q's dtype.
    """
    if v.shape[2] != q.shape[2]:
        raise ValueError("the triton kernel needs the same head dim for q/k and v")
    o = AttentionOptions(**options)
    rab = o.rab
    return _HstuAttentionFunction.apply(
        q, k, v, None if rab is None else rab.pos_weights,
        None if rab is None else rab.ts_weights, offsets,
        None if rab is None else rab.timestamps,
        None if rab is None else rab.query_timestamps, o.num_contextual, o.num_targets,
        int(max_seqlen), o.alpha, o.scaling_seqlen, o.causal, o.target_group_size, block_m,
        block_n, o.mask_convention == "peer", int(o.max_attn_len), int(o.min_full_attn_seq_len),
    )
