"""Exponential moving average of the weights (``TrainerArgs.ema_decay``).

After every optimizer step ``avg <- avg + (1 - d_t) (w - avg)`` over every weight the
optimizers update: the dense parameters (their float32 masters under bfloat16/float16) and
this rank's part of every embedding table (data-parallel tables whole, model-parallel ones
their local shards). ``d_t = min(decay, (1 + t) / (10 + t))`` after t updates, so the
average forgets the initial weights within the first steps instead of being pulled towards
them for ~1 / (1 - decay) steps. Evaluation and the best checkpoint (hence the test split)
use the average (:meth:`WeightAverage.swapped`); training always continues from the raw
weights. The average is float32 and lives beside the weights (one more copy of them; while
it is swapped in, a second, transient copy holds the raw weights).

Checkpoints carry it (exact resume, any world size): the dense part in the dense file
(``"ema"``: child -> parameter -> tensor, like ``"model"``; ``"ema_updates"``), the tables'
part through DCP under ``embeddings_ema.<weight key>``
(``hstu.training.checkpoint.EMA_TABLES_KEY``), sharded like the weight itself, so a resume on
another world size reshards it as it reshards the tables. A weights-only load
(``hstu.training.checkpoint_manager.load_weights``, which ``hstu.export`` uses) of a
checkpoint that has an average takes the average.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hstu.training.checkpoint import state_tensors

# table weights among embedding_state_dict's keys (not optimizer state, not remapper buffers)
_TABLE_WEIGHT = re.compile(r"(^|\.)(dp_)?tables\..*\.weight$")


def is_table_weight(key: str) -> bool:
    return _TABLE_WEIGHT.search(key) is not None


def _like(value: Any, locals_: list[torch.Tensor]) -> Any:
    """A value sharded like ``value`` (a ShardedTensor, or a replicated tensor) whose local
    parts are ``locals_`` (what DCP saves, or fills in place on a load)."""
    if hasattr(value, "local_shards"):
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

        shards = [
            Shard(tensor=t, metadata=s.metadata) for t, s in zip(locals_, value.local_shards())
        ]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group
        )
    return locals_[0]


class WeightAverage:
    """The average of a model's weights (see the module docstring).

    ``dense``: child name -> module (the checkpoint's dense children); ``tables``: the
    tables' live state (``embedding_state_dict``); ``optimizer``: gives the float32 master of
    a half-precision parameter (``master_of``), or None."""

    def __init__(
        self, dense: dict[str, nn.Module], tables: dict[str, Any], optimizer: Any,
        decay: float,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        # dense: ((child, name), tensor the optimizer updates, tensor the forward reads)
        self.dense: list[tuple[tuple[str, str], torch.Tensor, torch.Tensor | None]] = []
        for child_name, child in dense.items():
            for name, p in child.named_parameters():
                if not p.requires_grad:
                    continue
                master = optimizer.master_of(p) if optimizer is not None else None
                self.dense.append(((child_name, name), p if master is None else master,
                                   None if master is None else p))
        # tables: key -> (live value, its local tensors)
        self.tables: dict[str, tuple[Any, list[torch.Tensor]]] = {
            key: (value, state_tensors(value))
            for key, value in tables.items() if is_table_weight(key)
        }
        self._live = [t for _, t, _ in self.dense] + [
            t for _, ts in self.tables.values() for t in ts
        ]
        self.shadow = [t.detach().float().clone() for t in self._live]
        n = len(self.dense)
        self._dense_shadow = self.shadow[:n]
        self._table_shadow: dict[str, list[torch.Tensor]] = {}
        for key, (_, ts) in self.tables.items():
            self._table_shadow[key] = self.shadow[n : n + len(ts)]
            n += len(ts)

    def current_decay(self) -> float:
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the average towards the weights."""
        weight = 1.0 - self.current_decay()
        live = [t if t.dtype == torch.float32 else t.float() for t in self._live]
        torch._foreach_lerp_(self.shadow, live, weight)
        self.num_updates += 1

    @torch.no_grad()
    def restart(self) -> None:
        """Start over from the current weights (a resume from a checkpoint without one)."""
        for s, t in zip(self.shadow, self._live):
            s.copy_(t)
        self.num_updates = 0

    @torch.no_grad()
    def _load(self, values: list[torch.Tensor]) -> None:
        for t, v in zip(self._live, values):
            t.copy_(v)
        for (_, _, forward), v in zip(self.dense, values):
            if forward is not None:
                forward.copy_(v)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the model's weights for the duration; the raw weights after."""
        backup = [t.detach().clone() for t in self._live]
        self._load(self.shadow)
        try:
            yield
        finally:
            self._load(backup)

    # ------------------------------------------------------------------ checkpoints
    def dense_state(self) -> dict[str, Any]:
        """``{"ema": {child: {name: tensor}}, "ema_updates": n}`` for the dense file."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for ((child, name), _, _), s in zip(self.dense, self._dense_shadow):
            out.setdefault(child, {})[name] = s.detach().clone()
        return {"ema": out, "ema_updates": self.num_updates}

    @torch.no_grad()
    def load_dense_state(self, state: dict[str, Any], where: str) -> None:
        from hstu.training.checkpoint import CheckpointError

        saved = state["ema"]
        for ((child, name), _, _), s in zip(self.dense, self._dense_shadow):
            value = saved.get(child, {}).get(name)
            if value is None or value.shape != s.shape:
                raise CheckpointError(
                    f"checkpoint {where}: its weight average has no {child}.{name} of shape "
                    f"{tuple(s.shape)}"
                )
            s.copy_(value)
        self.num_updates = int(state["ema_updates"])

    def table_state(self) -> dict[str, Any]:
        """Weight key -> the average, sharded like the weight (DCP saves it, or fills it)."""
        out = {}
        for key, (value, ts) in self.tables.items():
            shadows = self._table_shadow[key]
            # float32 tables: the shadows themselves (a load fills them in place)
            parts = [s if t.dtype == torch.float32 else s.to(t.dtype) for s, t in zip(shadows, ts)]
            out[key] = _like(value, parts)
        return out

    @torch.no_grad()
    def load_table_state(self, state: dict[str, Any]) -> None:
        """After DCP filled ``table_state()``'s values: into the shadows (a no-op for
        float32 tables, filled in place)."""
        for key, shadows in self._table_shadow.items():
            for s, part in zip(shadows, state_tensors(state[key])):
                if part.data_ptr() != s.data_ptr():
                    s.copy_(part)
