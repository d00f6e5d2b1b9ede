"""HSTU layers and block (Megatron tensor parallel), ranking and retrieval models.

Nothing here imports gin; the builder reads the argument dataclasses explicitly.
"""

from hstu.model.builder import LayerVariant, ModelDataInfo, build_block, build_model
from hstu.model.hstu_block import HSTUBlock
from hstu.model.hstu_layer import HSTULayer
from hstu.model.metrics import MetricAccumulator, retrieval_metrics
from hstu.model.ranking import RankingModel
from hstu.model.retrieval import RetrievalEval, RetrievalModel

__all__ = [
    "HSTUBlock",
    "HSTULayer",
    "LayerVariant",
    "MetricAccumulator",
    "ModelDataInfo",
    "RankingModel",
    "RetrievalEval",
    "RetrievalModel",
    "build_block",
    "build_model",
    "retrieval_metrics",
]
