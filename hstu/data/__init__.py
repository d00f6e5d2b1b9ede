"""Data: preprocessing of raw logs, datasets and loaders of jagged batches, synthetic data.

    from hstu.data import build_data
    train_loader, eval_loader, info = build_data(dataset_args, "retrieval", 128, 128, rank, world_size, seed)

See docs/data.md.
"""

from hstu.data.batch import Batch
from hstu.data.build import DataInfo, build_data
from hstu.data.errors import DataError

__all__ = ["Batch", "DataError", "DataInfo", "build_data"]
