"""The trainer of the debug presets, for the bodies that run_multiprocess runs on each rank."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hstu.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def debug_trainer(task: str, tmp: str, run_dir: str, params: Sequence[str] = ()) -> Trainer:
    """A Trainer of configs/debug_<task>.gin on this process's ranks (gin cleared first,
    seeded), over the synthetic data under ``tmp``/data, writing to ``run_dir``; ``params``
    are gin bindings applied after the file."""
    import gin
    import torch.distributed as dist

    from hstu.config import load_config
    from hstu.training.distributed import init_distributed, set_seed
    from hstu.training.trainer import Trainer

    gin.clear_config()
    cfg = load_config(
        os.path.join(ROOT, "configs", f"debug_{task}.gin"),
        [f'DatasetArgs.dataset_path="{os.path.join(tmp, "data", "synthetic")}"', *params],
        task=task,
        world_size=dist.get_world_size(),
    )
    env = init_distributed(cfg.tp.tensor_model_parallel_size)
    set_seed(cfg.trainer.seed)
    return Trainer(cfg, env, run_dir, "")
