"""Data: preprocessing of raw logs, datasets and loaders of jagged batches, synthetic data.

    from hstu.data import build_data
    train_loader, eval_loader, info = build_data(
        dataset_args, "retrieval", 128, 128, rank, world_size, seed
    )

See docs/data.md.
"""

from typing import Any

from hstu.data.errors import DataError
from hstu.data.info import DataInfo

__all__ = ["Batch", "DataError", "DataInfo", "build_data"]


def __getattr__(name: str) -> Any:
    # Batch and build_data need torch; imported on first use, so that the torch-free parts
    # (preprocessing checks, sizes from metadata) start fast.
    if name == "Batch":
        from hstu.data.batch import Batch

        return Batch
    if name == "build_data":
        from hstu.data.build import build_data

        return build_data
    raise AttributeError(f"module 'hstu.data' has no attribute {name!r}")
