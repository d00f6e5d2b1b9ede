"""The exact softmax over the whole corpus (negative_sampling="full_corpus"), blocked.

Legend: Q queries, I items of the corpus, D width.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hstu.ops.jagged import index_within, segment_ids
from hstu.ops.losses.common import CPU_ONLY, softmax_lse_
from hstu.sync_audit import allowed_sync

MATMUL_DTYPES = ("auto", "float32", "bfloat16")
"""The choices of RetrievalArgs.full_corpus_matmul_dtype."""


@functools.cache
def native_bfloat16_matmul(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` multiplies bfloat16 matrices natively, what decided it).

    CPUs: an instruction set for bfloat16 products (x86: AVX512-BF16 or AMX-BF16; any other
    ``*bf16*`` capability torch reports). Without one, torch emulates bfloat16 matmuls at a
    fraction of the float32 rate (an AVX2 host: ~8x slower than float32). GPUs: compute
    capability 8.0 and up (Ampere's bfloat16 tensor cores)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        return major >= 8, f"{name}, compute capability {major}.{minor}"
    if device.type != "cpu":
        return False, f"device type {device.type!r} not checked"
    caps = torch.cpu.get_capabilities()
    found = sorted(k for k, v in caps.items() if "bf16" in k and v is True)
    cpu = f"{caps.get('cpu_name', 'CPU')}, {torch.backends.cpu.get_cpu_capability()}"
    if found:
        return True, f"{cpu}, {'/'.join(found)}"
    return False, f"{cpu}, no native bfloat16 matmul (AVX512-BF16/AMX)"


def resolve_matmul_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype of RetrievalArgs.full_corpus_matmul_dtype ``name`` on ``device`` and why:
    "auto" is bfloat16 where the device multiplies it natively, float32 elsewhere."""
    if name not in MATMUL_DTYPES:
        raise ValueError(
            f"full_corpus_matmul_dtype {name!r} is not one of {', '.join(MATMUL_DTYPES)}"
        )
    if name != "auto":
        return getattr(torch, name), "as configured"
    native, why = native_bfloat16_matmul(device)
    return (torch.bfloat16 if native else torch.float32), f"auto: {why}"


def _end_forward(ctx, buffer: torch.Tensor, saved: tuple, losses: torch.Tensor,
                 pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-corpus losses' forward ends here: ``saved`` (``buffer`` among them) kept for
    the one backward when an input needs a gradient, else ``buffer`` handed back; returns
    the loss sum and the target logits (no gradient)."""
    if any(ctx.needs_input_grad):
        ctx.save_for_backward(*saved)
    else:
        _give_back(buffer)
    ctx.mark_non_differentiable(pos)
    ctx.used = False
    return losses.sum(), pos


def _claim_buffers(ctx) -> tuple[torch.Tensor, ...]:
    """The saved tensors of :func:`_end_forward`, once: the backward turns its buffer into
    the gradient in place."""
    if ctx.used:
        raise RuntimeError("the full-corpus softmax loss keeps its buffers for one backward only")
    ctx.used = True
    return ctx.saved_tensors


class _FullSoftmaxLoss(torch.autograd.Function):
    """Sum over queries of the cross-entropy of ``logits = queries @ corpus.T`` at ``target``.

    The [Q, I] logits are produced and turned into probabilities a block of queries at a
    time (the block stays in cache), and only the probabilities are kept for backward, where
    they become ``P - onehot`` in place and feed the two matmuls of the gradient (scaled on
    their [Q, D] sides). The buffer is reused from step to step (``_SPARE``). Standard
    autograd (``F.cross_entropy(q @ c.T)``) materialises the logits, the log-softmax, its
    gradient and a scattered one-hot gradient: four [Q, I] matrices and about twice the
    memory passes. Same values up to summation order. Backward runs once (in place).
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, corpus: torch.Tensor, target: torch.Tensor,
                masked: HistoryWindow | None = None):
        num_q, num_i = queries.shape[0], corpus.shape[0]
        probs = _take_buffer(num_q * num_i, queries).view(num_q, num_i)
        losses = queries.new_empty(num_q)
        pos = queries.new_empty(num_q)
        block = _block_rows(num_i)
        # the history masked over several blocks at once on a CPU (its pairs listed in fewer,
        # larger ops: 60 -> 35 ms a step on one core for the ML-100K preset's loss)
        span = block * (_MASKED_BLOCKS if masked is not None and queries.device.type == "cpu"
                        else 1)
        corpus_t = corpus.t()
        for s_span in range(0, num_q, span):
            e_span = min(num_q, s_span + span)
            logits = torch.mm(queries[s_span:e_span], corpus_t, out=probs[s_span:e_span])
            torch.gather(logits, 1, target[s_span:e_span].unsqueeze(1),
                         out=pos[s_span:e_span].unsqueeze(1))
            if masked is not None:
                masked.mask_(logits, s_span, target[s_span:e_span])
            for s in range(s_span, e_span, block):
                e = min(e_span, s + block)
                # softmax in place while the block is in cache
                torch.sub(softmax_lse_(probs[s:e]), pos[s:e], out=losses[s:e])
        return _end_forward(ctx, probs, (queries, corpus, target, probs), losses, pos)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_pos: torch.Tensor):
        queries, corpus, target, probs = _claim_buffers(ctx)
        num_q, num_i = probs.shape
        grad_q = torch.empty_like(queries)
        # the corpus gradient built transposed, [D, I]: a matmul whose output is D = 50 wide
        # ran at 2/3 the rate of the same one writing [D, I] (one CPU core, I = 1,682)
        grad_c_t = corpus.new_zeros(corpus.shape[1], num_i)
        block = _block_rows(num_i)
        rows = torch.arange(num_q, device=probs.device)
        # a fill on the device (not a copy from the host: a blocking copy on CUDA)
        probs.index_put_((rows, target), probs.new_full((), -1.0), accumulate=True)
        # the scalar gradient scales the [Q, D] sides, not the [Q, I] matrix
        scaled_q = queries * grad_loss
        for s in range(0, num_q, block):
            e = min(num_q, s + block)
            g = probs[s:e]
            torch.mm(g, corpus, out=grad_q[s:e])
            grad_c_t.addmm_(scaled_q[s:e].t(), g)
        grad_q.mul_(grad_loss)
        _give_back(probs)
        return grad_q, grad_c_t.t().contiguous(), None, None


@dataclass
class HistoryWindow:
    """Each query's own history, left out of its softmax (RetrievalArgs.exclude_history_from_loss),
    as a window into the batch's item ids: query q leaves out the items
    ``ids[starts[q] : starts[q] + lengths[q]]`` (repeated ids once; never its target; ids outside
    the corpus's columns ignored). Legend: Q queries, N item ids, W = ``width``.

    Applied to a block of logits at a time (:meth:`mask_`) from a [rows, W] window of those
    ids, ``width`` >= every ``lengths[q]`` known on the host (the dataset's longest history): no
    list of (query, item) pairs (sum over samples of H^2 / 2 entries), no size read from the
    device, memory bounded by :data:`_WINDOW_ELEMENTS` entries whatever H.
    """

    ids: torch.Tensor
    """int64 [N]: columns (item id - min_item_id) of the batch's item feature."""
    starts: torch.Tensor
    """int64 [Q]: where each query's history starts in ``ids``."""
    lengths: torch.Tensor
    """int64 [Q]: how many items of ``ids`` from there are its history (its position + 1)."""
    width: int
    """>= every length (host)."""

    def shifted(self, by: int) -> HistoryWindow:
        """The same window with the ids' columns moved down by ``by`` (item ids -> columns)."""
        return HistoryWindow(self.ids - by, self.starts, self.lengths, self.width)

    def blocks(self, rows_total: int, start: int = 0, elements: int = 0
               ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """The windows of queries ``start``.. ``start + rows_total`` a block at a time (at most
        ``elements`` entries, default :data:`_WINDOW_ELEMENTS`): (s, e, slots [r, W] into
        ``ids`` (clamped in range), inside [r, W]: the slot is in query ``start + s + i``'s
        history), r = e - s; nothing when the window or the ids are empty."""
        width = self.width
        if width <= 0 or rows_total == 0 or self.ids.numel() == 0:
            return
        step = max(1, (elements or _WINDOW_ELEMENTS) // width)
        pos = torch.arange(width, device=self.ids.device)
        last = self.ids.numel() - 1
        for s in range(0, rows_total, step):
            e = min(rows_total, s + step)
            slots = (self.starts[start + s : start + e, None] + pos).clamp_(max=last)
            yield s, e, slots, pos < self.lengths[start + s : start + e, None]

    def mask_(self, logits: torch.Tensor, start: int, target: torch.Tensor) -> None:
        """-inf at the history columns of the block of queries ``start``.. (``logits`` [r, I],
        ``target`` [r] their targets' columns): their probabilities become exactly 0, and so do
        their gradients. The other entries are unchanged (they get + 0.0).

        On a CPU the (query, column) pairs themselves are listed and filled
        (:meth:`_mask_pairs_`), a bounded number at a time: the history's own entries (half
        the [rows, W] window on average), read where the host reads its own memory. Elsewhere
        the [rows, W] window (:meth:`_mask_window_`): fixed sizes, no host read."""
        if logits.device.type == "cpu":
            with allowed_sync(CPU_ONLY):
                self._mask_pairs_(logits, start, target)
        else:
            self._mask_window_(logits, start, target)

    def _mask_pairs_(self, logits: torch.Tensor, start: int, target: torch.Tensor) -> None:
        """:meth:`mask_` from the list of (query, column) pairs, at most
        :data:`_PAIR_ELEMENTS` pairs at a time (a query's whole history at least): -inf added
        at each, + 0.0 where the pair is the query's target or outside the columns."""
        rows_total, num_i = logits.shape
        if rows_total == 0 or self.width <= 0 or self.ids.numel() == 0 or num_i == 0:
            return
        lengths = self.lengths[start : start + rows_total].clamp(max=self.width)
        # the one host read (CPU_ONLY: the host reads its own memory)
        host_ends = lengths.cumsum(0).tolist()
        flat = logits.view(-1) if logits.is_contiguous() else None
        last = self.ids.numel() - 1
        s = 0
        while s < rows_total:
            # rows s..e list at most _PAIR_ELEMENTS pairs (one row at least)
            done = host_ends[s - 1] if s else 0
            e = bisect.bisect_right(host_ends, done + _PAIR_ELEMENTS, lo=s)
            e = min(rows_total, max(s + 1, e))
            count = host_ends[e - 1] - done
            run = lengths[s:e]
            s_run, s = s, e
            if count == 0:
                continue
            row = segment_ids(run, count)
            # each pair's slot among the ids: its query's start + its offset in the history
            slot = index_within(run, count)
            slot += self.starts[start + s_run : start + e].index_select(0, row)
            cols = self.ids.index_select(0, slot.clamp_(max=last))
            keep = (cols >= 0) & (cols < num_i) & (cols != target[s_run:e].index_select(0, row))
            row += s_run
            cols.clamp_(0, num_i - 1)
            add = torch.zeros(count, dtype=logits.dtype, device=logits.device)
            add.masked_fill_(keep, float("-inf"))
            if flat is not None:
                flat.scatter_add_(0, row * num_i + cols, add)
            else:
                logits.index_put_((row, cols), add, accumulate=True)

    def _mask_window_(self, logits: torch.Tensor, start: int, target: torch.Tensor) -> None:
        """:meth:`mask_` from the [rows, W] window (-inf added where masked, + 0.0 elsewhere)."""
        rows_total, num_i = logits.shape
        for s, e, slots, inside in self.blocks(rows_total, start):
            cols = self.ids.index_select(0, slots.view(-1)).view(inside.shape)
            inside &= (cols != target[s:e, None]) & (cols >= 0) & (cols < num_i)
            # -inf where masked, + 0.0 elsewhere (a column listed twice: -inf either way)
            add = torch.zeros(inside.shape, dtype=logits.dtype, device=logits.device)
            add.masked_fill_(inside, float("-inf"))
            logits[s:e].scatter_add_(1, cols.masked_fill_(~inside, 0), add)


# entries of a HistoryWindow's [rows, W] window built at a time
_WINDOW_ELEMENTS = 1 << 16
# (query, column) pairs a HistoryWindow lists at a time on a CPU (each takes ~40 bytes while
# listed)
_PAIR_ELEMENTS = 1 << 18


# elements of the [block, I] logits handled at a time by _FullSoftmaxLoss (1 MiB in float32:
# a block stays in a core's L2 between its matmul and its softmax), but never fewer than
# _FULL_SOFTMAX_MIN_ROWS queries: every block reads the whole corpus and updates its whole
# gradient, so a large corpus needs wide blocks (100k items: 2-row blocks were 15x slower)
_FULL_SOFTMAX_BLOCK_ELEMENTS = 1 << 18
_FULL_SOFTMAX_MIN_ROWS = 64
# blocks whose logits are produced and masked together when a history mask applies on a CPU
_MASKED_BLOCKS = 8


def _block_rows(num_items: int) -> int:
    return max(_FULL_SOFTMAX_MIN_ROWS, _FULL_SOFTMAX_BLOCK_ELEMENTS // max(1, num_items))


# One spare [Q, I] buffer per device and dtype, handed from a backward to the next forward:
# a fresh buffer of this size is a new mmap every step, and touching its pages first costs
# as much as the softmax itself (~90 ms for 270 MB on the CPU machine). A forward whose
# backward never runs simply does not give its buffer back.
_SPARE: dict = {}


def _take_buffer(numel: int, like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype)
    spare = _SPARE.pop(key, None)
    if spare is not None and spare.numel() >= numel:
        return spare[:numel]
    return like.new_empty(numel)


def _give_back(buffer: torch.Tensor) -> None:
    # a view's _base is its root storage tensor (torch collapses chains of views)
    base = buffer if buffer._base is None else buffer._base
    key = (base.device, base.dtype)
    held = _SPARE.get(key)
    if held is None or held.numel() < base.numel():
        _SPARE[key] = base.view(-1)


class _FullSoftmaxLossBF16(torch.autograd.Function):
    """:class:`_FullSoftmaxLoss` with its three [Q, I] matmuls in bfloat16 (float32
    accumulation; 4-5x the float32 matmul rate on CPUs with AVX512-BF16 or AMX, and on GPUs).

    What keeps it accurate:
    - the target logit is the exact float32 dot product, used both as the loss's positive
      term and as the target's own column in the softmax (so a well-predicted query's tiny
      loss is not a rounding error);
    - the bfloat16 matmul computes ``logit - shift`` with ``shift`` the target logit rounded
      to bfloat16 (one more column: ``[q, -shift] . [c, 1]``), so the logits that matter (near
      the target's and above) come out near 0, where bfloat16's relative rounding is small in
      absolute terms; the softmax of a block runs in float32;
    - backward's ``P - onehot`` is formed in float32 before rounding, so a well-predicted
      query's small gradient is not the difference of two rounded numbers.
    What is rounded: the queries and items to 8 mantissa bits in the matmuls (logit error
    ~1e-3 x |logit| / sqrt(D)), the kept probabilities and the two gradients' outputs.

    On a CPU the queries are padded with zero rows to a whole number of blocks: oneDNN, which
    runs bfloat16 matmuls there, compiles and caches a kernel per matrix shape (up to 1,024),
    and with the query count changing every step that cache alone grew a process by ~2.5 MB
    a step (3 GB before it fills). With whole blocks the forward has one shape and the two
    backward matmuls one per block count: a handful. The zero rows change no result.
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, corpus: torch.Tensor, target: torch.Tensor,
                masked: HistoryWindow | None = None):
        num_q, dim = queries.shape
        num_i = corpus.shape[0]
        bf16 = torch.bfloat16
        block = _block_rows(num_i)
        # rows of the matmuls: whole blocks on a CPU (the class docstring says why)
        rows_mm = -(-num_q // block) * block if queries.device.type == "cpu" else num_q
        with torch.no_grad():
            pos = (queries * corpus.index_select(0, target)).sum(1)
            shift = pos.to(bf16)
            q_aug = queries.new_empty(rows_mm, dim + 1, dtype=bf16)
            q_aug[:num_q, :dim] = queries
            torch.neg(shift, out=q_aug[:num_q, dim])
            q_aug[num_q:] = 0.0
            c_aug = corpus.new_empty(num_i, dim + 1, dtype=bf16)
            c_aug[:, :dim] = corpus
            c_aug[:, dim] = 1.0
        grads = _take_buffer(rows_mm * num_i, q_aug).view(rows_mm, num_i)
        scratch = queries.new_empty(min(block, num_q), num_i)
        losses = queries.new_empty(num_q)
        shift_err = shift.float() - pos  # the loss is lse(logit - shift) + shift - pos
        c_aug_t = c_aug.t()
        keep = any(ctx.needs_input_grad)
        minus_one = queries.new_full((), -1.0)  # a fill on the device, not a host copy
        for s in range(0, num_q, block):
            e = min(num_q, s + block)
            e_mm = min(rows_mm, s + block)
            out = torch.mm(q_aug[s:e_mm], c_aug_t, out=grads[s:e_mm])[: e - s]
            probs = scratch[: e - s]
            probs.copy_(out)
            # the target's own column gets its exact shifted logit (pos - shift)
            rows = torch.arange(e - s, device=probs.device)
            probs.index_put_((rows, target[s:e]), shift_err[s:e].neg())
            if masked is not None:
                masked.mask_(probs, s, target[s:e])
            torch.add(softmax_lse_(probs), shift_err[s:e], out=losses[s:e])
            if keep:  # P - onehot in float32, then rounded once
                probs.index_put_((rows, target[s:e]), minus_one, accumulate=True)
                out.copy_(probs)
        ctx.dim, ctx.num_q = dim, num_q
        return _end_forward(ctx, grads, (q_aug, c_aug, grads), losses, pos)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_pos: torch.Tensor):
        q_aug, c_aug, grads = _claim_buffers(ctx)
        dim, num_q = ctx.dim, ctx.num_q
        # the padding rows (whole blocks on a CPU): zero queries, zero gradients
        grads[num_q:] = 0.0
        grad_q = torch.mm(grads, c_aug[:, :dim])[:num_q].float().mul_(grad_loss)
        grad_c = torch.mm(grads.t(), q_aug[:, :dim]).float().mul_(grad_loss)
        _give_back(grads)
        return grad_q, grad_c, None, None


def full_softmax_loss(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    target: torch.Tensor,
    matmul_dtype: torch.dtype | None = None,
    masked: HistoryWindow | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over queries of -log softmax(queries @ corpus.T)[q, target[q]], the target logits
    [Q] (no gradient)); queries [Q, D], corpus [I, D] in one floating dtype.
    ``masked``: each query's history columns (:class:`HistoryWindow`), left out of its softmax
    (-inf; never its target).
    ``matmul_dtype=torch.bfloat16`` runs the [Q, I] matmuls in bfloat16 on float32 inputs
    (:class:`_FullSoftmaxLossBF16`); None: in the inputs' dtype, exact up to summation order."""
    if queries.dtype != corpus.dtype:
        corpus = corpus.to(queries.dtype)
    args = (queries.contiguous(), corpus.contiguous(), target.contiguous(), masked)
    if matmul_dtype is None or matmul_dtype == queries.dtype:
        return _FullSoftmaxLoss.apply(*args)
    if matmul_dtype != torch.bfloat16 or queries.dtype != torch.float32:
        raise ValueError(
            f"full-corpus softmax: a {matmul_dtype} matmul on {queries.dtype} inputs is not "
            "supported (bfloat16 on float32 only)"
        )
    return _FullSoftmaxLossBF16.apply(*args)


def full_corpus_loss(
    queries: torch.Tensor,
    pos_ids: torch.Tensor,
    corpus: torch.Tensor,
    *,
    temperature: float,
    min_item_id: int,
    matmul_dtype: torch.dtype | None,
    training: bool,
    scale: torch.Tensor | None = None,
    masked: HistoryWindow | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """Exact softmax over every item [min_item_id, num_items) (``corpus`` [I, D], normalised,
    row i = item min_item_id + i): one [Q, I] logit matrix and a cross-entropy on the
    positive's column (each id appears once, so nothing needs masking; ``masked``: each
    query's history as item ids (:class:`HistoryWindow`), left out of its softmax,
    RetrievalArgs.exclude_history_from_loss). Same loss as
    :func:`hstu.ops.losses.sampled.sampled_softmax_loss` with the corpus as negatives.
    Returns (loss, (pos_logits [Q], neg_logits [Q, I] with -inf at the positive, or None in
    training))."""
    # the temperature scales the [Q, D] queries, not the [Q, I] logits (same values, less work)
    scaled = queries / temperature
    target = pos_ids - min_item_id
    if queries.shape[0] == 0:
        logits = scaled @ corpus.t()
        return logits.sum() * 0.0, (logits.new_zeros(0), logits)
    if masked is not None:  # item ids -> columns
        masked = masked.shifted(min_item_id)
    total, pos_logits = full_softmax_loss(scaled, corpus, target, matmul_dtype, masked)
    loss = total / queries.shape[0] if scale is None else total * scale
    if training:
        # nothing reads the [Q, I] logits of a training step: not built again
        return loss, (pos_logits, None)
    with torch.no_grad():
        neg_logits = (scaled @ corpus.t()).scatter_(1, target.unsqueeze(1), float("-inf"))
    return loss, (pos_logits, neg_logits)


__all__ = ["HistoryWindow", "full_corpus_loss", "full_softmax_loss"]
