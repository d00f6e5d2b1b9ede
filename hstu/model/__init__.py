"""HSTU layers and block (Megatron tensor parallel), ranking and retrieval models.

Nothing here imports gin; the builder reads the argument dataclasses explicitly. The names
below load on first use, so that the torch-only modules (hstu_layer, hstu_block, tokens)
import without torchrec: the serving model (hstu.serving.model) is built from them.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "LayerOptions": "builder", "ModelDataInfo": "builder", "build_block": "builder",
    "build_model": "builder", "research_options": "builder", "HSTUBlock": "hstu_block",
    "HSTULayer": "hstu_layer", "MetricAccumulator": "metrics", "retrieval_metrics": "metrics",
    "RankingModel": "ranking", "RetrievalEval": "retrieval", "RetrievalModel": "retrieval",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'hstu.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hstu.model.{_HOME[name]}"), name)
