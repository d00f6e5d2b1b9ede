"""A CPU-side guard for host synchronisation: fails where a CUDA run would make the host wait.

On a GPU, an op whose result the host must read (a Python number, a data-dependent output
size) blocks the CPU until the device has caught up, so the CPU can no longer run ahead and
pipelines stop overlapping. On a CPU host nothing waits, so nothing shows it. While
:func:`sync_audit` is active on a thread, every op that the thread dispatches is checked
against the ops that sync on CUDA; the first one raises :class:`HostSyncError` naming the op
and the frame of our code that called it::

    with sync_audit():
        loss, _ = model(batch)
        loss.backward()

Where a sync is unavoidable the code says so, and why, with :func:`allowed_sync`::

    with allowed_sync("the kernel plans its chunks on the host from the lengths"):
        lengths = lengths.tolist()

A reason covers the calls that sync, not the block: each sync an audit sees is recorded
with its site (our code's file, function and source line, :attr:`SyncEvent.site`), and an
audit given a per-reason allow-list of sites (``sync_audit(sites=...)``; the trainer's:
``KNOWN_SITES`` in tests/training/test_sync_audit.py) treats a sync at a site not listed
under its block's reason as unnamed: a new ``.item()`` inside an allowed block fails.

What counts as a sync: :func:`sync_reason`, checked at the ATen op level (below autograd, so
backward too): torch's own ``data_dependent_output`` and ``dynamic_output_shape`` tags (the
latter includes ``bincount``, whose CUDA kernel reads the input's range on the host whatever
``minlength``), boolean-mask indexing, ``equal`` and ``histc`` without a range; and at the
Python level ``Tensor.tolist``, ``.numpy`` and ``.cpu`` (on a CPU tensor these never reach the
dispatcher; docs/kernels.md, "The CPU guard"). Not seen: syncs inside CUDA kernels that
no op list predicts, and ``.to("cpu")`` of a tensor already on the CPU;
``torch.cuda.set_sync_debug_mode("error")`` on a GPU is the final word
(``python -m hstu.gpu_check``).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_HSTU_DIR = os.path.dirname(os.path.abspath(__file__))
_THIS_FILE = os.path.abspath(__file__)

# ops carrying torch's dynamic_output_shape tag that are sized from their arguments
# in some calls (checked per call below)
_SIZED_BY_ARGUMENTS = {_aten.index.Tensor, _aten.repeat_interleave.Tensor}
_BOOL_INDEX_OPS = {
    _aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
    _aten._index_put_impl_.default,
}
# syncs on CUDA that torch's tags do not mark
_ALWAYS_SYNC = {_aten.equal.default}
_PYTHON_SYNCS = ("tolist", "numpy", "cpu")

TORCH_OPTIM_STEP = "torch.optim reads its per-parameter step counts (host tensors)"
"""The dense optimizer's step as audits name it: torch.optim's non-capturable Adam keeps its
step counts on the host, on GPU hosts too (no device to wait for)."""


class HostSyncError(RuntimeError):
    """An op that would make the host wait for a CUDA device ran inside :func:`sync_audit`."""


@dataclass(frozen=True)
class SyncEvent:
    """One sync seen by an audit: the op, where our code called it, and (allowed) why.

    ``where``: ``file:line in function: source`` of our innermost frame (with the library
    frame it went through); ``site``: the same frame without its line number, ``file in
    function: source``, which an allow-list names (stable when lines above it move);
    ``reason``: the allowed_sync block's (or the KNOWN_HOST_READS entry's) reason, None when
    unnamed; ``unlisted``: inside an allowed block whose reason does not list this site."""

    op: str
    why: str
    where: str
    reason: str | None = None
    site: str = ""
    unlisted: str | None = None


def sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)`` would sync on CUDA, or None when it would not."""
    if func in _ALWAYS_SYNC or torch.Tag.data_dependent_output in func.tags:
        return "returns a value the host reads"
    if func in _BOOL_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "a boolean mask index (sized by a nonzero)"
        if func is _aten.index.Tensor:
            return None
    if func is _aten.repeat_interleave.Tensor:
        if kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None):
            return "repeat_interleave without output_size"
        return None
    if func is _aten.histc.default:
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return "histc without a range (min == max)" if lo == hi else None
    if torch.Tag.dynamic_output_shape in func.tags and func not in _SIZED_BY_ARGUMENTS:
        return "an output size that depends on the data"
    return None


# Library lines that read host tensors (no device to wait for on GPU hosts either), or whose
# sync the library imposes by design: (path suffix, text of the line, why), matched against
# every library frame between the op and our code. Everything else a library does in a step
# is audited like our code.
_TORCHREC_A2A = (
    "TorchRec's KJT all-to-all reads its split sizes on the host (by design: the per-key "
    "lengths after bucketizing, the sizes the other ranks send, the received per-key "
    "lengths; TorchRec's sparse-dist "
    "pipelines run it for the next batch, ahead of the step)"
)
KNOWN_HOST_READS = (
    ("fbgemm_gpu/split_table_batched_embeddings_ops_training.py", "self.iter_cpu",
     ("FBGEMM TBE's iteration counter iter_cpu is a host tensor (self.iter, on the device, "
      "is read once: on the first step)")),
    ("fbgemm_gpu/split_table_batched_embeddings_ops_training.py", "self.feature_dims.cpu()",
     "FBGEMM TBE's feature_dims is made on the host"),
    ("torchrec/distributed/dist_data.py", "tensor_splits=input.dist_splits(", _TORCHREC_A2A),
    # the train pipelines' own split exchange (KJTAllToAllForward), run for the next batch
    ("torchrec/distributed/train_pipeline/runtime_forwards.py", "input_splits = input.dist_splits(",
     _TORCHREC_A2A),
    ("torchrec/distributed/embedding_sharding.py", "t_list = _safe_tolist(t)",
     ("TorchRec 1.8's fused input distribution (FusedKJTListSplitsAwaitable) reads the split "
      "sizes it is about to exchange, to check them for int overflow: a library read in the "
      "pipelines' input stage, run for the next batch")),
    ("torchrec/distributed/dist_data.py", "_safe_tolist_2d(self._", _TORCHREC_A2A),
    ("torchrec/sparse/jagged_tensor.py", "return kjt.sync()", _TORCHREC_A2A),  # dist_init
)


def _caller() -> tuple[str, str, str | None]:
    """('file:line in function: source' of the innermost frame of our code (hstu/, tests),
    with the innermost library frame after it when a library made the call; that frame's
    site, 'file in function: source'; the reason when that library line is a
    KNOWN_HOST_READS entry)."""
    frame = sys._getframe(1)
    library = known = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        torch_internal = os.sep + "torch" + os.sep in path
        if path != _THIS_FILE and not torch_internal:
            if path.startswith(_HSTU_DIR) or os.sep + "tests" + os.sep in path:
                where, site = _describe(frame), _site(frame)
                return (where if library is None else f"{where} (via {library})"), site, known
            if "contextlib" not in path:
                described = _describe(frame)
                library = library or described
                known = known or next(
                    (why for suffix, text, why in KNOWN_HOST_READS
                     if path.endswith(suffix) and text in described),
                    None,
                )
        frame = frame.f_back
    return library or "<unknown>", library or "<unknown>", known


def _short_path_and_line(frame: Any) -> tuple[str, str]:
    import linecache

    path = frame.f_code.co_filename
    line = linecache.getline(path, frame.f_lineno).strip()
    root = os.path.dirname(_HSTU_DIR)
    return (os.path.relpath(path, root) if path.startswith(root) else path), line


def _describe(frame: Any) -> str:
    short, line = _short_path_and_line(frame)
    return f"{short}:{frame.f_lineno} in {frame.f_code.co_name}: {line}"


def _site(frame: Any) -> str:
    short, line = _short_path_and_line(frame)
    function, outer = frame.f_code.co_name, frame.f_back
    # a comprehension is named by the function it is written in (Python 3.12 inlines them)
    while function.startswith("<") and outer is not None \
            and outer.f_code.co_filename == frame.f_code.co_filename:
        function, outer = outer.f_code.co_name, outer.f_back
    return f"{short} in {function}: {line}"


# ------------------------------------------------------------------- allowed syncs

class _Reasons(threading.local):
    def __init__(self) -> None:
        self.stack: list[str] = []  # this thread's open allowed_sync reasons, innermost last


_reasons = _Reasons()


@contextmanager
def allowed_sync(reason: str) -> Iterator[None]:
    """Marks the syncs inside as unavoidable, for ``reason`` (recorded by an active audit).

    Costs a list append and pop: fine on every step."""
    assert reason, "allowed_sync needs a reason"
    _reasons.stack.append(reason)
    try:
        yield
    finally:
        _reasons.stack.pop()


# ------------------------------------------------------------------------- the audit


class SyncAudit(TorchDispatchMode):
    """The dispatch mode behind :func:`sync_audit` (``events``: every sync seen, allowed
    ones with their reason; ``raise_on_sync=False`` records instead of raising; ``sites``:
    reason -> the sites its allowed_sync blocks may sync at, None for no such check)."""

    def __init__(self, raise_on_sync: bool = True,
                 sites: Mapping[str, Collection[str]] | None = None) -> None:
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self.sites = sites
        self.events: list[SyncEvent] = []
        self.thread = threading.get_ident()

    @property
    def allowed(self) -> list[SyncEvent]:
        return [e for e in self.events if e.reason is not None]

    @property
    def offending(self) -> list[SyncEvent]:
        return [e for e in self.events if e.reason is None]

    def check(self, op: str, why: str) -> None:
        reasons = _reasons.stack
        where, site, known = _caller()
        reason, unlisted = (reasons[-1] if reasons else known), None
        if reasons and self.sites is not None and site not in self.sites.get(reason, ()):
            reason, unlisted = None, reasons[-1]
        event = SyncEvent(op, why, where, reason, site, unlisted)
        self.events.append(event)
        if event.reason is None and self.raise_on_sync:
            if unlisted is not None:
                raise HostSyncError(
                    f"host sync on CUDA: {op} ({why}) at {event.where}, inside "
                    f"allowed_sync({unlisted!r}) but not one of the sites listed for that "
                    f"reason (site {site!r}). A reason covers the calls that need it: list "
                    "this one with its reason if it must sync, or keep it on the device"
                )
            raise HostSyncError(
                f"host sync on CUDA: {op} ({why}) at {event.where}. Carry the size with the "
                "batch, or mark it with hstu.sync_audit.allowed_sync(reason)"
            )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = sync_reason(func, args, kwargs)
        if why is not None:
            self.check(str(func), why)
        return func(*args, **kwargs)


_active: dict[int, SyncAudit] = {}
_patch_lock = threading.Lock()
_originals: dict[str, Any] = {}


def _patched(name: str) -> Any:
    original = _originals[name]

    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        audit = _active.get(threading.get_ident())
        if audit is not None:
            audit.check(f"Tensor.{name}", "copies to the host")
        return original(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = original.__doc__
    return method


@contextmanager
def sync_audit(raise_on_sync: bool = True,
               sites: Mapping[str, Collection[str]] | None = None) -> Iterator[SyncAudit]:
    """Checks every op this thread runs inside for a host sync on CUDA (module docstring).

    Yields the :class:`SyncAudit` (its ``events`` list what it saw: the allowed syncs with
    their reasons; with ``raise_on_sync=False`` the offending ones too, instead of raising).
    ``sites``: reason -> the sites (:attr:`SyncEvent.site`) its allowed_sync blocks may sync
    at; a sync inside a block at a site not listed under the block's reason is unnamed.
    """
    audit = SyncAudit(raise_on_sync, sites)
    with _patch_lock:
        assert audit.thread not in _active, "sync_audit is already active on this thread"
        if not _active:
            for name in _PYTHON_SYNCS:
                _originals[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, _patched(name))
        _active[audit.thread] = audit
    try:
        with audit:
            yield audit
    finally:
        with _patch_lock:
            del _active[audit.thread]
            if not _active:
                for name in _PYTHON_SYNCS:
                    setattr(torch.Tensor, name, _originals.pop(name))


__all__ = [
    "KNOWN_HOST_READS", "TORCH_OPTIM_STEP", "HostSyncError", "SyncAudit", "SyncEvent",
    "allowed_sync", "sync_audit", "sync_reason",
]
