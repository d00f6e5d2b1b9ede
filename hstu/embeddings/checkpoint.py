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
    out = []
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
        for key, value in tables.state_dict().items():
            state[f"{prefix}tables.{key}"] = value
        if emb.dp_ec is not None:
            for key, value in emb.dp_ec.state_dict().items():
                state[f"{prefix}dp_tables.{key}"] = value
        if isinstance(emb.ec, DistributedModelParallel):
            for key, opt_state in emb.ec.fused_optimizer.state_dict()["state"].items():
                for name, value in opt_state.items():
                    state[f"{prefix}optim.{key}.{name}"] = value
        for table, weight, opt in _dense_optimizers(emb):
            st = opt.state[weight]
            for name, value in st.items():
                state[f"{prefix}dense_optim.{table}.{name}"] = value
        for key, value in emb.remappers.state_dict().items():
            state[f"{prefix}remappers.{key}"] = value
    return state


@torch.no_grad()
def load_embedding_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Restores what :func:`embedding_state_dict` produced (after dcp.load filled it)."""
    for prefix, emb in _modules(model):
        sharded = isinstance(emb.ec, DistributedModelParallel)
        tables = emb.ec.module if sharded else emb.ec
        table_state = {
            k[len(prefix) + 7 :]: v for k, v in state.items() if k.startswith(prefix + "tables.")
        }
        tables.load_state_dict(table_state)
        if emb.dp_ec is not None:
            n = len(prefix) + 10
            emb.dp_ec.load_state_dict(
                {k[n:]: v for k, v in state.items() if k.startswith(prefix + "dp_tables.")}
            )
        if sharded:
            fused = emb.ec.fused_optimizer
            current = fused.state_dict()
            for key, opt_state in current["state"].items():
                for name in list(opt_state):
                    opt_state[name] = state[f"{prefix}optim.{key}.{name}"]
            fused.load_state_dict(current)
        for table, weight, opt in _dense_optimizers(emb):
            st = opt.state[weight]
            for name, value in st.items():
                value.copy_(state[f"{prefix}dense_optim.{table}.{name}"])
        remap_state = {
            k[len(prefix) + 10 :]: v
            for k, v in state.items()
            if k.startswith(prefix + "remappers.")
        }
        if emb.remappers:
            emb.remappers.load_state_dict(remap_state)
