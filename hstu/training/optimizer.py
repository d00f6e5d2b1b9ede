"""One optimizer container for the whole model: dense optimizer with LR schedule, gradient
clipping and data-parallel gradient averaging, plus the sparse optimizer that TorchRec fuses
into the embedding backward. One ``step()``, one ``zero_grad()``, one ``state_dict()``.
Masters, loss scaling and the tables under float16: docs/training.md, "Mixed precision".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hstu.args import OptimizerArgs
from hstu.sync_audit import allowed_sync


def lr_at(step: int, args: OptimizerArgs, total_steps: int | None) -> float:
    """Learning rate for 0-based ``step``: linear warm-up, then constant/linear/cosine decay."""
    peak = args.learning_rate
    if args.lr_warmup_iters > 0 and step < args.lr_warmup_iters:
        return peak * (step + 1) / args.lr_warmup_iters
    if args.lr_decay_style == "constant":
        return peak
    end = args.lr_decay_iters or total_steps
    if end is None or end <= args.lr_warmup_iters:
        return peak
    progress = min(1.0, (step - args.lr_warmup_iters) / (end - args.lr_warmup_iters))
    if args.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:  # cosine
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.min_learning_rate + (peak - args.min_learning_rate) * factor


def build_dense_optimizer(
    params: Iterable[torch.Tensor], args: OptimizerArgs, fused: bool = False
) -> torch.optim.Optimizer:
    """The torch optimizer over ``params`` (the master weights: trainable ones only).

    ``fused``: torch's fused kernels, which skip a step on a device-side overflow flag (the
    float16 loss scaler's ``found_inf``) without a host sync."""
    params = list(params)
    common: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if fused:
        common["fused"] = True
    if args.optimizer_str in ("adam", "adamw"):
        adam = torch.optim.Adam if args.optimizer_str == "adam" else torch.optim.AdamW
        return adam(params, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, **common)
    return torch.optim.SGD(params, **common)


class DynamicLossScaler:
    """float16: the loss is multiplied by ``scale`` before backward; a step whose gradients
    overflow (on any rank) is skipped and halves it; ``growth_interval`` clean steps double it.

    The scale, the clean-step counter and the overflow flag are device tensors (no host sync
    in a step); ``scale`` / ``skipped_steps`` read the device once (logs, checkpoints). The
    scale is a power of two: unscaling is exact in float32.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 1.0, device: torch.device | str = "cpu") -> None:
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        # [1] float32 on the device: what the loss is multiplied by this step
        self.scale_tensor = torch.full((1,), float(init_scale), dtype=torch.float32, device=device)
        self._clean = torch.zeros(1, dtype=torch.int32, device=device)
        self._skipped = torch.zeros(1, dtype=torch.int64, device=device)
        # 1.0 where this step's gradients overflowed (after the all-reduce over the world)
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)

    @property
    def scale(self) -> float:
        return float(self.scale_tensor.item())

    @scale.setter
    def scale(self, value: float) -> None:
        self.scale_tensor.fill_(float(value))

    @property
    def skipped_steps(self) -> int:
        return int(self._skipped.item())

    def inverse(self) -> torch.Tensor:
        """[1] float32: 1 / scale (exact: a power of two)."""
        return self.scale_tensor.double().reciprocal().float()

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Divides ``grads`` by the scale in place; returns ``found_inf`` ([1], 1.0 if any
        gradient of any rank is not finite)."""
        self.found_inf.zero_()
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.inverse())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.found_inf, op=dist.ReduceOp.MAX)
        return self.found_inf

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor) -> None:
        """Halves the scale after an overflow (``found_inf`` [1] 1.0; never below
        ``min_scale``), doubles it after ``growth_interval`` clean steps."""
        torch._amp_update_scale_(self.scale_tensor, self._clean, found_inf, 2.0, 0.5,
                                 self.growth_interval)
        self.scale_tensor.clamp_(min=self.min_scale)
        self._skipped += found_inf.to(torch.int64)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": int(self._clean.item()),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale_tensor.fill_(float(state["scale"]))
        # older checkpoints counted clean steps without resetting at each doubling
        self._clean.fill_(int(state["clean_steps"]) % self.growth_interval)
        self._skipped.fill_(int(state["skipped_steps"]))


class OptimizerContainer(torch.optim.Optimizer):
    """Dense optimizer (fp32 master weights, LR schedule, model-parallel clipping, loss scaling)
    + the sparse optimizers of the tables, behind one interface.

    - Gradients arrive already averaged (DDP over the DP group, :mod:`hstu.training.ddp`).
    - Half-precision parameters get float32 masters (the torch optimizer and its state live on
      them); float32 parameters are their own masters.
    - float16: dynamic loss scaling (:class:`DynamicLossScaler`); ``scale_loss`` before backward.
    - Clipping: one global norm over the model-parallel group (Megatron's rule), kept a tensor
      (no host sync) in ``last_grad_norm``.
    - The LR schedule (:func:`lr_at`) drives the dense optimizer and, with
      ``OptimizerArgs.sparse_lr_schedule="follow"``, the sparse ones as well (their base LR
      times the same factor).
    - :meth:`set_lr_scale`: every learning rate (dense and tables) times a factor from then on
      (online training's ``StreamArgs.stream_lr_scale``); 1 by default, and not checkpointed:
      the caller sets it again on resume.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        args: OptimizerArgs,
        total_steps: int | None,
        sparse: list[Any] | None = None,
        tp_group: dist.ProcessGroup | None = None,
        sparse_replicated: list[torch.optim.Optimizer] | None = None,
    ) -> None:
        # Not calling Optimizer.__init__: param_groups are the dense optimizer's.
        self.params = [p for p in params if p.requires_grad]
        self.masters = [
            p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params
        ]
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters) if m is not p}
        half = any(p.dtype == torch.float16 for p in self.params)
        self.scaler = DynamicLossScaler(device=self.params[0].device) if half else None
        self.dense = build_dense_optimizer(self.masters, args, fused=half)
        self.sparse = sparse
        self.sparse_replicated = sparse_replicated or []
        self.args = args
        self.total_steps = total_steps
        self.tp_group = tp_group
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.num_steps = 0
        self.lr_scale = 1.0
        self.last_grad_norm: torch.Tensor | None = None
        # a 0-d bool tensor (no host sync): were this step's dense gradients all finite?
        self.last_grads_finite: torch.Tensor | None = None
        # float16 with tables: undoes the tables' in-backward update of an overflowing step
        self.table_guard: TableStepGuard | None = None
        self._sparse_base = [
            [group["lr"] for group in opt.param_groups] for opt in self._sparse_optimizers()
        ]
        self._set_lr(lr_at(0, args, total_steps))

    # torch.optim.Optimizer surface used by TorchRec pipelines and schedulers
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.dense.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.dense.state

    @property
    def lr(self) -> float:
        return self.dense.param_groups[0]["lr"]

    def master_of(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The float32 master of a half-precision parameter (None for float32 ones)."""
        return self._master_of.get(id(p))

    def _sparse_optimizers(self) -> list[Any]:
        return list(self.sparse or []) + list(self.sparse_replicated)

    def _set_lr(self, lr: float) -> None:
        lr = lr * self.lr_scale
        for group in self.dense.param_groups:
            group["lr"] = lr
        if self.args.sparse_lr_schedule == "follow" and self.args.learning_rate:
            self._scale_sparse(lr / self.args.learning_rate)

    def _scale_sparse(self, factor: float) -> None:
        """The tables' learning rates: their base LR times ``factor``."""
        for opt, bases in zip(self._sparse_optimizers(), self._sparse_base):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * factor
            if hasattr(opt, "zero_grad") and opt in (self.sparse or []):
                # FBGEMM's fused optimizers take a new LR when stepped or zeroed
                opt.step()

    def set_total_steps(self, total_steps: int) -> None:
        """The schedule's length from now on (TrainerArgs.time_budget_minutes); the next step
        takes its learning rate from it."""
        self.total_steps = total_steps
        self._set_lr(lr_at(self.num_steps, self.args, total_steps))

    def set_lr_scale(self, scale: float) -> None:
        """Every learning rate (dense and tables) times ``scale`` from the next step on."""
        if scale == self.lr_scale:
            return
        self.lr_scale = float(scale)
        self._set_lr(lr_at(self.num_steps, self.args, self.total_steps))
        if self.args.sparse_lr_schedule != "follow":
            self._scale_sparse(self.lr_scale)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        for m in self._master_of.values():
            m.grad = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What backward should run on (loss times the float16 loss scale, on the device).

        The embedding tables see unscaled gradients: :func:`unscale_sparse_gradients` puts
        the inverse scale between the tables and the dense module."""
        if self.scaler is None:
            return loss
        return loss.float() * self.scaler.scale_tensor.to(loss.device).reshape(())

    @torch.no_grad()
    def _grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clips the master gradients to one global norm over the model-parallel group."""
        pairs = [(p, m) for p, m in zip(self.params, self.masters) if m.grad is not None]
        device = pairs[0][1].grad.device if pairs else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for p, m in pairs:
            # Megatron's rule: a TP shard counts on every rank, a replicated parameter on rank 0
            if getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0:
                sq += m.grad.float().pow(2).sum()
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(sq, group=self.tp_group)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, m in pairs:
            m.grad.mul_(coef)
        return norm

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self._grads_to_masters()
        grads = [m.grad for m in self.masters if m.grad is not None]
        if self.scaler is None:  # (with loss scaling, non-finite gradients skip the step)
            self.last_grads_finite = (torch.stack(torch._foreach_norm(grads)).sum().isfinite()
                                      if grads else None)
        else:
            found_inf = self.scaler.unscale_(grads)
            if self.table_guard is not None:
                self.table_guard.restore(found_inf)
        if self.args.clip_grad_norm > 0:
            self.last_grad_norm = self.clip_grad_norm(self.args.clip_grad_norm)
        self._set_lr(lr_at(self.num_steps, self.args, self.total_steps))
        if self.scaler is None:
            self.dense.step()
        else:
            # the fused kernels skip the update (weights, moments, step count) where
            # found_inf is 1, with no host sync; the scale is then halved
            self.dense.grad_scale, self.dense.found_inf = None, found_inf.reshape(())
            try:
                self.dense.step()
            finally:
                del self.dense.grad_scale, self.dense.found_inf
            self.scaler.update(found_inf)
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)
        self.num_steps += 1
        # the next step's LR, so that logs show what the next update uses
        self._set_lr(lr_at(self.num_steps, self.args, self.total_steps))

    def state_dict(self) -> dict:  # type: ignore[override]
        out = {"dense": self.dense.state_dict(), "num_steps": self.num_steps}
        if self.scaler is not None:
            out["loss_scaler"] = self.scaler.state_dict()
        if self.sparse:
            out["sparse"] = [opt.state_dict() for opt in self.sparse]
        return out

    def load_dense_state_dict(self, dense_state: dict, num_steps: int,
                              scaler: dict | None = None) -> None:
        """Restores the dense optimizer and the schedule position (sparse state lives with
        the embedding tables' checkpoint)."""
        self.dense.load_state_dict(dense_state)
        self._keep_fused()
        self.num_steps = num_steps
        if scaler is not None and self.scaler is not None:
            self.scaler.load_state_dict(scaler)
        self._set_lr(lr_at(self.num_steps, self.args, self.total_steps))

    def load_state_dict(self, state: dict) -> None:  # type: ignore[override]
        for opt, opt_state in zip(self.sparse or [], state.get("sparse", [])):
            opt.load_state_dict(opt_state)
        self.load_dense_state_dict(
            state["dense"], int(state["num_steps"]), state.get("loss_scaler")
        )

    def _keep_fused(self) -> None:
        """A loaded optimizer state carries its saving run's kernel choice: float16 needs the
        fused kernels (they read the overflow flag), whatever the checkpoint said."""
        if self.scaler is not None:
            for group in self.dense.param_groups:
                group.update(fused=True, foreach=None)

    @torch.no_grad()
    def load_masters(self, values: dict[int, torch.Tensor]) -> None:
        """id(param) -> float32 value of its master."""
        for p, m in zip(self.params, self.masters):
            if m is not p and id(p) in values:
                m.copy_(values[id(p)])


def _unscaled(inverse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The true gradient of a table's looked-up rows: times 1 / scale (exact, in float32),
    and all zeros where any element is not finite (an overflowing step gives the table no
    update from this feature; the dense step is skipped by the scaler). No host sync."""
    grad32 = grad.float() * inverse.to(grad.device)
    finite = torch.isfinite(grad32).all()
    return torch.where(finite, grad32, torch.zeros((), device=grad.device)).to(grad.dtype)


def unscale_sparse_gradients(dense: torch.nn.Module, scaler: DynamicLossScaler) -> Any:
    """float16 with embedding tables, whose optimizers update inside backward: a forward
    pre-hook on the dense module (``forward(batch, embeddings)``) puts :func:`_unscaled` on
    each looked-up values tensor, so the tables step on the gradient of the unscaled loss.
    Returns the hook's handle."""

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        inverse = scaler.inverse()
        for jt in args[1].values():
            values = jt.values()
            if values.requires_grad:
                values.register_hook(lambda grad, inverse=inverse: _unscaled(inverse, grad))

    return dense.register_forward_pre_hook(hook)


# FBGEMM optimizers whose update reads the host iteration counter (bias correction)
_HOST_STEP_OPTIMIZERS = frozenset(
    {"adam", "partial_row_wise_adam", "lamb", "partial_row_wise_lamb"})
FUSED_ADAM_SKIP = (
    "float16 skip with FBGEMM's fused Adam-family table optimizers: the kernel takes its step "
    "count as a host int at forward (iter_cpu), which an overflowing step must not advance, "
    "so the overflow flag is read once per step to wind it back"
)
"""The one host read of the float16 overflow flag (docs/kernels.md, "Host syncs that
remain"): model_parallel or dynamic tables with ``sparse_optimizer_str`` adam/adamw on a GPU.
It cannot stay on the device: FBGEMM passes the step to its kernel as a Python int (an
``aux_int`` of the lookup), read from ``iter_cpu`` when the next step's forward launches."""


def kernel_rows(
    feature_table: torch.Tensor, num_tables: int, indices: torch.Tensor, offsets: torch.Tensor
) -> list[torch.Tensor]:
    """Per table of an FBGEMM kernel, int64 [N]: the local rows its forward looks up, from the
    forward's indices [N] and offsets [F * B + 1] (``feature_table`` [F]: each feature's
    table). An id of another table stands as row 0 (N stays fixed: no host sync); callers
    only use rows for operations that are exact on any row."""
    indices = indices.to(torch.int64)
    n_bags = offsets.numel() - 1
    if num_tables == 1 or n_bags <= 0:
        return [indices] * num_tables
    batch = max(n_bags // feature_table.numel(), 1)
    pos = torch.arange(indices.numel(), device=indices.device)
    bag = torch.searchsorted(offsets.to(torch.int64), pos, right=True) - 1
    table = feature_table[(bag // batch).clamp_(0, feature_table.numel() - 1)]
    return [torch.where(table == t, indices, 0) for t in range(num_tables)]


_TableRows = tuple[torch.Tensor, list[torch.Tensor]]
"""A table's row ids and those rows of its weight and optimizer states (:class:`_TbeRows`)."""


class _TbeRows:
    """The fused (FBGEMM) kernel of one group of sharded tables: a forward pre-hook takes,
    before the step's backward updates them, the rows it looks up: per table, their weights
    and every optimizer state row, and the device iteration counter.

    Legend: N looked-up ids of the kernel's features this step (local rows, after the input
    distribution), T tables, D[t] the local width of table t.
    """

    def __init__(self, tbe: nn.Module) -> None:
        self.tbe, self.device = tbe, tbe.iter.device
        optim = getattr(tbe.optimizer, "value", str(tbe.optimizer))
        self.host_step = optim in _HOST_STEP_OPTIMIZERS
        # per-table views into the kernel's storage (computed once: the split reads offsets)
        weights = tbe.split_embedding_weights()
        stateless = optim in ("exact_sgd", "sgd")
        states = [[] for _ in weights] if stateless else tbe.split_optimizer_states()
        self.tables = [[w, *s] for w, s in zip(weights, states)]
        self.feature_table = torch.tensor(list(tbe.feature_table_map), dtype=torch.int64,
                                          device=self.device)
        # per step taken: per table (its row ids, those rows of the weight and of each
        # optimizer state), and the kernel's step counter
        self.snapshots: list[tuple[list[_TableRows], torch.Tensor]] = []
        self.taken = 0  # snapshots of the last restored step

    @torch.no_grad()
    def take(self, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        """Before the kernel's forward: [N] local row ids, [F * B + 1] offsets per feature and
        sample. Ids of another table of the kernel read row 0 of this one (restoring an
        untouched row to its own value changes nothing)."""
        rows_of = kernel_rows(self.feature_table, len(self.tables), indices, offsets)
        per_table = [
            (rows, [x.index_select(0, rows) for x in tensors])
            for rows, tensors in zip(rows_of, self.tables)
        ]
        self.snapshots.append((per_table, self.tbe.iter.detach().clone()))

    @torch.no_grad()
    def restore(self, skip: torch.Tensor) -> None:
        """``skip``: 0-d bool on the device; where true, every row taken (and the counter)
        goes back to its value before the step. Latest snapshot first, so the earliest wins."""
        self.taken = len(self.snapshots)
        for per_table, it in reversed(self.snapshots):
            for (rows, saved), tensors in zip(per_table, self.tables):
                for x, old in zip(tensors, saved):
                    now = x.index_select(0, rows)
                    x.index_copy_(0, rows, torch.where(skip, old, now))
            self.tbe.iter.copy_(torch.where(skip, it, self.tbe.iter))
        self.snapshots.clear()

    def host_counter_back(self) -> None:
        """After a skipped step: the host counter back by the forwards it counted."""
        self.tbe.iter_cpu.sub_(self.taken)


class _ReplicatedRows:
    """A data_parallel table and its in-backward optimizer: its gradient is summed over the
    ranks before the update, so any row may move; the whole (small, replicated) table and its
    optimizer state are taken before backward."""

    def __init__(self, weight: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        self.weight, self.opt, self.device = weight, opt, weight.device
        # RowSparseOptimizer keeps its step count on the table's device (Adam's bias
        # correction too): a skip restores it there, with no host read of the flag
        self.state: dict = opt.init_state(weight) if hasattr(opt, "init_state") else {}
        self._buffers: list[torch.Tensor] | None = None
        self.taken = 0

    def _tensors(self) -> list[torch.Tensor]:
        return [self.weight.data, *self.state.values()]

    @torch.no_grad()
    def take(self) -> None:
        tensors = self._tensors()
        if self._buffers is None or len(self._buffers) != len(tensors):
            self._buffers = [t.detach().clone() for t in tensors]
        elif self.taken == 0:
            for b, t in zip(self._buffers, tensors):
                b.copy_(t)
        self.taken += 1

    @torch.no_grad()
    def restore(self, skip: torch.Tensor) -> None:
        if self.taken and self._buffers is not None:
            for b, t in zip(self._buffers, self._tensors()):
                t.copy_(torch.where(skip, b, t))
        self.taken = 0


LookupHook = Callable[[torch.Tensor, torch.Tensor], None]  # (indices [N], offsets [F * B + 1])


def hook_training_lookups(tbe: nn.Module, take: LookupHook) -> Any:
    """Runs ``take(indices, offsets)`` before each training forward of the FBGEMM kernel
    ``tbe`` (not in evaluation or under no_grad); returns the hook's handle."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and module.training:
            take(kwargs["indices"] if "indices" in kwargs else args[0],
                 kwargs["offsets"] if "offsets" in kwargs else args[1])

    return tbe.register_forward_pre_hook(hook, with_kwargs=True)


def fused_kernels(sharded: nn.Module) -> list[nn.Module]:
    """The FBGEMM kernels (TBE modules) under a TorchRec sharded collection: its lookups are
    kept in a plain list (``_lookups``), not as registered children."""
    out, seen = [], set()
    for module in sharded.modules():
        for lookup in getattr(module, "_lookups", None) or []:
            for m in lookup.modules():
                tbe = getattr(m, "emb_module", None)
                if tbe is not None and hasattr(tbe, "iter") and hasattr(tbe, "feature_table_map") \
                        and id(tbe) not in seen:
                    seen.add(id(tbe))
                    out.append(tbe)
    return out


class TableStepGuard:
    """float16: an overflowing step leaves every table as it was (docs/training.md, "Mixed
    precision"). Before each training lookup it takes what the step can change
    (:class:`_TbeRows`, :class:`_ReplicatedRows`); after backward (:meth:`restore`, from
    :meth:`OptimizerContainer.step`) it writes that back where the global overflow flag is
    set, with ``torch.where`` (no host read) except for the host step counter of FBGEMM's
    fused Adam-family kernels (one named host read of the flag: :data:`FUSED_ADAM_SKIP`).
    """

    def __init__(self, model: nn.Module) -> None:
        from torchrec.distributed.model_parallel import DistributedModelParallel

        from hstu.embeddings.sharding import _find_embedding_modules

        self.kernels: list[_TbeRows] = []
        self.replicated: list[_ReplicatedRows] = []
        self._handles: list[Any] = []
        for emb in _find_embedding_modules(model):
            if isinstance(emb.ec, DistributedModelParallel):
                for tbe in fused_kernels(emb.ec.module):
                    cache = getattr(tbe, "lxu_cache_weights", None)
                    if cache is not None and cache.numel() > 0:
                        from hstu.validation import ConfigError

                        raise ConfigError(
                            "NetworkArgs", "dtype_str",
                            "float16 cannot skip an overflowing step of a table behind a UVM "
                            "cache (DynamicEmbeddingArgs.caching=True): use bfloat16, or "
                            "caching=False",
                        )
                    rows = _TbeRows(tbe)
                    self.kernels.append(rows)
                    self._handles.append(hook_training_lookups(tbe, rows.take))
            if emb.dp_ec is not None:
                parts = [
                    _ReplicatedRows(module.weight, opt)
                    for module in emb.dp_ec.embeddings.values()
                    for opt in getattr(module.weight, "_in_backward_optimizers", [])
                ]
                self.replicated.extend(parts)
                if parts:
                    hook = self._replicated_hook(parts)
                    self._handles.append(emb.dp_ec.register_forward_pre_hook(hook))
        self.host_step = any(k.host_step for k in self.kernels)

    @staticmethod
    def _replicated_hook(parts: list[_ReplicatedRows]) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if not (torch.is_grad_enabled() and module.training):
                return
            for part in parts:
                part.take()

        return hook

    @torch.no_grad()
    def restore(self, found_inf: torch.Tensor) -> None:
        """After backward: ``found_inf`` ([1] float, 1.0 where the step overflowed on any rank)."""
        skip = found_inf.reshape(()) > 0
        for part in [*self.kernels, *self.replicated]:
            part.restore(skip.to(part.device))
        if self.host_step:
            with allowed_sync(FUSED_ADAM_SKIP):
                skipped = bool(skip)
            if skipped:
                for part in self.kernels:
                    if part.host_step:
                        part.host_counter_back()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
