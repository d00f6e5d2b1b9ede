"""Shared helpers of the embedding tests (module level: pickled into spawned ranks)."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.args import DynamicEmbeddingArgs, EmbeddingArgs, OptimizerArgs
from hstu.embeddings import build_embedding_collection, shard_embeddings

DIM = 4
SEED = 11


def tables(mp_rows: int = 24, dp_rows: int = 10, dynamic_capacity: int | None = None) -> list[EmbeddingArgs]:
    out: list[EmbeddingArgs] = [
        EmbeddingArgs(feature_names=["a"], table_name="ta", item_vocab_size_or_capacity=mp_rows,
                      sharding_type="model_parallel"),
        EmbeddingArgs(feature_names=["b"], table_name="tb", item_vocab_size_or_capacity=dp_rows,
                      sharding_type="data_parallel"),
    ]
    if dynamic_capacity:
        out.append(DynamicEmbeddingArgs(
            feature_names=["c"], table_name="tc", item_vocab_size_or_capacity=10**12,
            item_vocab_gpu_capacity=dynamic_capacity, evict_strategy="lru"))
    return out


def optimizer(name: str, lr: float = 0.5) -> OptimizerArgs:
    return OptimizerArgs(optimizer_str="sgd", learning_rate=lr, sparse_optimizer_str=name)


def build(tbls, opt: OptimizerArgs, sharded: bool, overrides=None):
    dims = {t.table_name: DIM for t in tbls}
    # sharded: built on the meta device, each rank allocating its own shards (the trainer's path)
    emb = build_embedding_collection(tbls, dims, "cpu", seed=SEED,
                                     sparse_optimizer=opt.resolved_sparse_optimizer_str,
                                     materialize=not sharded)
    if sharded:
        emb, plan = shard_embeddings(emb, tbls, opt, "cpu", sharding_overrides=overrides)
        return emb, plan
    return emb, None


def kjt(per_key: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    """{feature: [ids of sample 0, ids of sample 1, ...]} -> KJT (same B for every key)."""
    keys = list(per_key)
    values, lengths = [], []
    for k in keys:
        for sample in per_key[k]:
            values.extend(sample)
            lengths.append(len(sample))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64))


def slice_samples(per_key: dict[str, list[list[int]]], rank: int, world: int) -> dict[str, list[list[int]]]:
    out = {}
    for k, samples in per_key.items():
        n = len(samples) // world
        out[k] = samples[rank * n:(rank + 1) * n]
    return out


UPSTREAM = torch.tensor([1.0, -2.0, 0.5, 3.0])


def train_step(emb, batch: KeyedJaggedTensor, scale: float = 1.0) -> None:
    """loss = scale * sum over ids of <embedding, UPSTREAM>: each occurrence adds scale *
    UPSTREAM to its row's gradient (scale = world size undoes the mean over ranks)."""
    emb.train()
    out = emb.lookup(batch)
    loss = scale * sum((jt.values() * UPSTREAM).sum() for jt in out.values())
    loss.backward()


def lookup(emb, per_key: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    emb.eval()
    with torch.no_grad():
        out = emb.lookup(kjt(per_key))
    return {k: v.values().clone() for k, v in out.items()}
