"""Checkpoint hooks for the embedding tables (torch.distributed.checkpoint compatible).

``embedding_state_dict(model)`` returns a flat dict whose model_parallel entries are
ShardedTensors (weights and fused optimizer state) and whose replicated entries
(data_parallel tables and their optimizer state, dynamic-table remapper state) are plain
tensors identical on every rank. ``hstu.training.checkpoint_manager.TableState`` saves it with
DCP; to restore, build and shard the model for the new world size, take ``state =
embedding_state_dict(model)``, ``dcp.load(state, ...)`` (fills it in place, resharding as
needed) and ``load_embedding_state_dict(model, state)``. The keys differ between ranks (see
``optim`` below): DCP writes the union of them into the checkpoint's metadata, and a check
of a model against a checkpoint must compare the union over the ranks
(``hstu.training.checkpoint.model_keys``), not one rank's keys.

Keys, per HstuEmbeddings at module path P:
    P.tables.embeddings.<table>.weight           [C, D]
    P.optim.embeddings.<table>.weight.<state>    fused (model_parallel) optimizer state; only
                                                 on the ranks holding a shard of the table
                                                 (table_wise, column_wise: not on every rank)
    P.dp_tables.embeddings.<table>.weight        data_parallel tables (replicated)
    P.dense_optim.<table>.<state>                their row-sparse optimizer state and step
    P.remappers.<table>.<buffer>                 dynamic tables: id->slot map and metadata
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from hstu.embeddings.collection import HstuEmbeddings


def _modules(model: nn.Module) -> list[tuple[str, HstuEmbeddings]]:
    return [
        (n + "." if n else "", m)
        for n, m in model.named_modules()
        if isinstance(m, HstuEmbeddings)
    ]


def _dense_optimizers(emb: HstuEmbeddings) -> list[tuple[str, torch.Tensor, Any]]:
    """(table, weight, optimizer) of the replicated data_parallel tables."""
    out: list[tuple[str, torch.Tensor, Any]] = []
    if emb.dp_ec is None:
        return out
    for name, module in emb.dp_ec.embeddings.items():
        weight = module.weight
        for opt in getattr(weight, "_in_backward_optimizers", []):
            if hasattr(opt, "init_state"):
                opt.init_state(weight)
            out.append((name, weight, opt))
    return out


def embedding_state_dict(model: nn.Module) -> dict[str, Any]:
    """Weights, optimizer states and dynamic-table state of every HstuEmbeddings in model."""
    state: dict[str, Any] = {}
    for prefix, emb in _modules(model):
        tables = emb.ec.module if isinstance(emb.ec, DistributedModelParallel) else emb.ec
        state.update({f"{prefix}tables.{k}": v for k, v in tables.state_dict().items()})
        if emb.dp_ec is not None:
            state.update({f"{prefix}dp_tables.{k}": v for k, v in emb.dp_ec.state_dict().items()})
        if isinstance(emb.ec, DistributedModelParallel):
            for key, opt_state in emb.ec.fused_optimizer.state_dict()["state"].items():
                for name, value in opt_state.items():
                    state[f"{prefix}optim.{key}.{name}"] = value
        for table, weight, opt in _dense_optimizers(emb):
            for name, value in opt.state[weight].items():
                state[f"{prefix}dense_optim.{table}.{name}"] = value
        state.update({f"{prefix}remappers.{k}": v for k, v in emb.remappers.state_dict().items()})
    return state


def _under(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` whose key starts with ``prefix``, the prefix cut off."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def load_embedding_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Restores what :func:`embedding_state_dict` produced (after dcp.load filled it)."""
    for prefix, emb in _modules(model):
        sharded = isinstance(emb.ec, DistributedModelParallel)
        tables = emb.ec.module if sharded else emb.ec
        tables.load_state_dict(_under(state, prefix + "tables."))
        if emb.dp_ec is not None:
            emb.dp_ec.load_state_dict(_under(state, prefix + "dp_tables."))
        if sharded:
            fused = emb.ec.fused_optimizer
            current = fused.state_dict()
            for key, opt_state in current["state"].items():
                for name in list(opt_state):
                    opt_state[name] = state[f"{prefix}optim.{key}.{name}"]
            fused.load_state_dict(current)
        for table, weight, opt in _dense_optimizers(emb):
            for name, value in opt.state[weight].items():
                value.copy_(state[f"{prefix}dense_optim.{table}.{name}"])
        if emb.remappers:
            emb.remappers.load_state_dict(_under(state, prefix + "remappers."))
