"""build_all: checks that need the dataset's facts, made before any table or model exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hstu.args import ConfigError
from hstu.config import load_config
from hstu.training.builder import build_all
from hstu.training.distributed import DistEnv

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("clean_gin")


def _single_process() -> DistEnv:
    return DistEnv(
        rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo",
        tp_size=1, tp_rank=0, dp_size=1, dp_rank=0, tp_group=None, dp_group=None,
    )


def test_bce_head_on_rating_classes_stops_the_build(tmp_path):
    """The synthetic ratings are 5 classes: a 1-wide head would learn bit 0, their parity."""
    cfg = load_config(
        str(ROOT / "configs" / "debug_ranking.gin"),
        [
            f'DatasetArgs.dataset_path="{tmp_path / "synthetic"}"',  # generated on first use
            "RankingArgs.prediction_head_arch=[16, 1]",
        ],
        task="ranking",
    )
    pattern = (
        r"^RankingArgs\.prediction_head_arch: last width 1 == RankingArgs\.num_tasks .* the "
        r"synthetic actions are 5 classes in \[0, 5\)"
    )
    with pytest.raises(ConfigError, match=pattern):
        build_all(cfg, _single_process())
