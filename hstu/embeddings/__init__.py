"""Embedding tables: TorchRec collections, sharding plan, dynamic (LRU/LFU) tables."""

from hstu.embeddings.checkpoint import embedding_state_dict, load_embedding_state_dict
from hstu.embeddings.collection import HstuEmbeddings, TableSpec, build_embedding_collection
from hstu.embeddings.dynamic import DynamicIdRemapper, fresh_rows
from hstu.embeddings.multi import EmbeddingsByDim, build_embeddings
from hstu.embeddings.sharding import (
    TablePlacement,
    fused_optimizer,
    replicated_optimizers,
    shard_embeddings,
    sparse_optimizer_spec,
)

__all__ = [
    "DynamicIdRemapper",
    "EmbeddingsByDim",
    "HstuEmbeddings",
    "TablePlacement",
    "TableSpec",
    "build_embedding_collection",
    "build_embeddings",
    "embedding_state_dict",
    "fresh_rows",
    "fused_optimizer",
    "load_embedding_state_dict",
    "replicated_optimizers",
    "shard_embeddings",
    "sparse_optimizer_spec",
]
