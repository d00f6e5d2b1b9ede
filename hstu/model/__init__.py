"""HSTU layers and block (Megatron tensor parallel), ranking and retrieval models.

Nothing here imports gin; the builder reads the argument dataclasses explicitly.
"""

from hstu.model.builder import (
    LayerOptions,
    ModelDataInfo,
    build_block,
    build_model,
    research_options,
)
from hstu.model.hstu_block import HSTUBlock
from hstu.model.hstu_layer import HSTULayer
from hstu.model.metrics import MetricAccumulator, retrieval_metrics
from hstu.model.ranking import RankingModel
from hstu.model.retrieval import RetrievalEval, RetrievalModel

__all__ = [
    "HSTUBlock",
    "HSTULayer",
    "LayerOptions",
    "MetricAccumulator",
    "ModelDataInfo",
    "RankingModel",
    "RetrievalEval",
    "RetrievalModel",
    "build_block",
    "build_model",
    "research_options",
    "retrieval_metrics",
]
